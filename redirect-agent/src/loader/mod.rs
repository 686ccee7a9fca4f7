//! Loading, attaching and pinning the eBPF programs, and the maps behind `RedirectMaps`.
//!
//! Everything is pinned under one directory (default `/sys/fs/bpf/redirect`): maps by name
//! (reused by the next agent, so routes survive restarts) and one link per program. On start,
//! existing links get the new program swapped in place (`BPF_LINK_UPDATE`, no connect missed);
//! links attached to another cgroup than the configured root are replaced.

mod attach;
mod bpffs;
pub mod inspect;
pub mod kernel_check;
mod kernel_maps;
pub mod sock_btf;
pub mod sys;

pub use attach::{AttachReport, Attached, LoaderConfig, LoaderError, RecordHook, attach, cleanup};
pub use bpffs::{ensure_bpffs, is_bpffs};
pub use kernel_maps::{ConnsTaker, KernelMaps, RouterSockError, RouterSocks, monotonic_ns};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("REDIRECT_EBPF_OBJECT"));
