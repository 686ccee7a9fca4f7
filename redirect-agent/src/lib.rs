//! redirect's node agent as a library: routing data and decisions, the control-plane sources,
//! the sync from desired state to the kernel maps, the eBPF loader and the node router.

pub mod agent;
pub mod cgroup;
pub mod crd;
pub mod loader;
pub mod router;
pub mod routing;
pub mod source;
pub mod store;
pub mod sync;
