//! From desired state to the kernel: `desired(&Store) -> Tables`, `diff(current, desired) -> Ops`,
//! `apply(ops, &mut impl RedirectMaps)`.

pub mod maps;

pub use maps::{MapError, RedirectMaps};
