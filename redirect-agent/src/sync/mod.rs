//! From desired state to the kernel: `desired(&Store) -> Tables`, `diff(current, desired) -> Ops`,
//! `apply(ops, &mut impl RedirectMaps)`.

pub mod desired;
pub mod diff;
pub mod ids;
pub mod index;
pub mod maps;

pub use desired::{Desired, DesiredState, NodeContext, desired, sockaddr};
pub use diff::{ApplyReport, Op, apply, diff, reconcile};
pub use ids::IdAllocator;
pub use maps::{MapError, MapLimits, MemoryMaps, RedirectMaps};

pub use crate::cgroup::CgroupResolver;
