//! The node agent's main loop: attach the programs, start the router, and keep the kernel maps
//! equal to the desired state of the current sources.

mod sync_loop;

pub use sync_loop::{SyncOutcome, Syncer};
