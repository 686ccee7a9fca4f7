//! redirect's node agent as a library: routing data and decisions, the control-plane sources,
//! the sync from desired state to the kernel maps, the eBPF loader, the node router, the admin
//! endpoint and the `redirectctl` debugging commands.

pub mod admin;
pub mod agent;
pub mod cgroup;
pub mod controller;
pub mod crd;
pub mod ctl;
mod error_chain;
pub mod forkslice;
pub mod k8s;
pub mod loader;
pub mod router;
pub mod routing;
pub mod slice;
pub mod source;
pub mod store;
pub mod sync;
