//! Every type that crosses the kernel boundary, in one place.
//!
//! Rules: `#[repr(C)]`, no implicit padding (explicit `_pad` fields), integers instead of
//! `bool`/`Option`, and a size assertion beside each type. Both the eBPF programs and the agent
//! use these definitions, so a layout change cannot drift between them.
#![no_std]

// Userspace gets std, for the conversions to and from `std::net`.
#[cfg(feature = "user")]
extern crate std;

pub mod connect;
pub mod maps;
#[cfg(feature = "user")]
mod net;
pub mod origin;
pub mod peer;
pub mod reason;

pub use maps::*;
pub use origin::OriginCacheEntry;
pub use peer::PeerSlot;
pub use reason::Reason;
