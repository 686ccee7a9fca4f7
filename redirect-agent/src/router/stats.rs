//! Router outcome counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// How a connection the router accepted ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    /// No kernel-recorded original destination: refused.
    NoOrigDst,
    UpstreamFailed,
    Reset,
    AcceptError,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Forwarded,
        Outcome::NoOrigDst,
        Outcome::UpstreamFailed,
        Outcome::Reset,
        Outcome::AcceptError,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::NoOrigDst => "no_orig_dst",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Reset => "reset",
            Outcome::AcceptError => "accept_error",
        }
    }
}

#[derive(Default, Debug)]
pub struct RouterStats {
    counts: [AtomicU64; Outcome::ALL.len()],
}

impl RouterStats {
    pub fn count(&self, o: Outcome) {
        self.counts[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.counts[o as usize].load(Ordering::Relaxed)
    }
}
