//! The node agent's main loop: attach the programs, start the router, and keep the kernel maps
//! equal to the desired state of the current source.

pub mod allocator;
pub mod last_good;
pub mod run_loop;
mod sync_loop;

pub use run_loop::{LoopContext, LoopError, RouterHandle, StartRouter, run};
pub use sync_loop::{SyncOutcome, Syncer};
