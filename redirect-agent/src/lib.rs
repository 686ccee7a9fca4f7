//! redirect's node agent as a library: routing data and decisions, the control-plane sources,
//! the sync from desired state to the kernel maps, the eBPF loader and the node router.

pub mod routing;
