//! From desired state to the kernel: `desired(&Store) -> Tables`, `diff(current, desired) -> Ops`,
//! `apply(ops, &mut impl RedirectMaps)`.

pub mod claims;
pub mod desired;
pub mod diff;
pub mod fork_table;
pub mod ids;
pub mod index;
pub mod maps;

pub use desired::{Desired, DesiredState, NodeContext, Touched, desired};
pub use diff::{ApplyReport, Op, apply, diff, diff_touched, reconcile};
pub use ids::IdAllocator;
pub use maps::{MapError, MapLimits, MemoryMaps, RedirectMaps};

pub use crate::cgroup::CgroupResolver;
