//! Overload fails open. While the router cannot take more connections (its connection limit,
//! or the process is out of file descriptors) it takes its listeners out of the liveness
//! sockmap: the kernel then leaves new connections alone and they go straight to their
//! original destination instead of queueing behind a full router. Once the connections served
//! fall to a low-water mark, the listeners go back in.

use std::{
    os::fd::AsFd,
    sync::{
        Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpListener;

use super::RouterKernel;
use super::log_limit::LogLimit;

/// Why the router is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `--max-connections` reached.
    Connections,
    /// `accept()` or `socket()` failed for lack of file descriptors or memory.
    Resources,
}

impl Cause {
    pub const fn label(self) -> &'static str {
        match self {
            Cause::Connections => "connection limit",
            Cause::Resources => "file descriptor limit",
        }
    }
}

pub struct Overload {
    /// The workers' listeners per liveness slot. Only a listener still open can be registered
    /// again: once every worker has closed its copy (draining), none comes back.
    listeners: Mutex<Vec<(u32, Weak<TcpListener>)>>,
    out: AtomicBool,
    /// Connections served at or below which the listeners go back in.
    resume_at: AtomicUsize,
    log: LogLimit,
}

impl Default for Overload {
    fn default() -> Self {
        Overload {
            listeners: Mutex::default(),
            out: AtomicBool::new(false),
            resume_at: AtomicUsize::new(0),
            log: LogLimit::new(Duration::from_secs(10)),
        }
    }
}

/// The low-water mark: 90 % of where the router filled up.
fn low_water(full_at: usize) -> usize {
    full_at - full_at / 10
}

impl Overload {
    /// A worker's listener for `slot`, for registering again after an overload.
    pub fn add_listener(&self, slot: u32, l: Weak<TcpListener>) {
        if let Ok(mut v) = self.listeners.lock() {
            v.retain(|(_, w)| w.strong_count() > 0);
            v.push((slot, l));
        }
    }

    /// Whether the router has taken itself out.
    pub fn is_out(&self) -> bool {
        self.out.load(Ordering::Relaxed)
    }

    /// The router is full with `active` connections: out of the liveness map (once). Returns
    /// whether it left the map now.
    pub fn enter(
        &self,
        socks: &Mutex<Box<dyn RouterKernel>>,
        active: usize,
        full_at: usize,
        cause: Cause,
    ) -> bool {
        if self.is_out() {
            return false;
        }
        // The lock orders enter and leave, so the flag always says what the map holds.
        let Ok(mut socks) = socks.lock() else {
            return false;
        };
        if self.out.swap(true, Ordering::Relaxed) {
            return false;
        }
        self.resume_at
            .store(low_water(full_at.max(1)), Ordering::Relaxed);
        let slots = self.slots();
        for slot in &slots {
            if let Err(error) = socks.deregister(*slot) {
                tracing::error!(%error, slot, "cannot take the router out of the liveness map");
            }
        }
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(
                cause = cause.label(),
                active,
                resume_at = low_water(full_at.max(1)),
                suppressed,
                "router full: it left the liveness map, new connections go straight to their \
                 destination until it has room again"
            );
        }
        true
    }

    /// Puts the listeners back once `active` fell to the low-water mark. Returns whether it
    /// did now.
    pub fn maybe_leave(&self, socks: &Mutex<Box<dyn RouterKernel>>, active: usize) -> bool {
        if !self.is_out() || active > self.resume_at.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(mut socks) = socks.lock() else {
            return false;
        };
        if !self.out.swap(false, Ordering::Relaxed) {
            return false;
        }
        // A slot another router filled meanwhile (a successor during an upgrade) is left to it.
        register_empty(socks.as_mut(), &self.listeners);
        tracing::info!(active, "router has room again: back in the liveness map");
        true
    }

    /// While the router has room, puts its listeners back in liveness slots found empty: a
    /// peer that shares the address (the other agent during an upgrade) may have cleared the
    /// slot when it filled up. Occupied slots are left alone.
    pub fn reassert(&self, socks: &Mutex<Box<dyn RouterKernel>>) {
        if self.is_out() {
            return;
        }
        let Ok(mut socks) = socks.lock() else { return };
        if self.is_out() {
            return;
        }
        for slot in register_empty(socks.as_mut(), &self.listeners) {
            tracing::info!(slot, "router registered again: its liveness slot was empty");
        }
    }

    fn slots(&self) -> Vec<u32> {
        let mut slots: Vec<u32> = self
            .listeners
            .lock()
            .map(|v| v.iter().map(|(s, _)| *s).collect())
            .unwrap_or_default();
        slots.sort_unstable();
        slots.dedup();
        slots
    }
}

/// Registers a listener in every empty slot one is open for; returns the slots filled.
fn register_empty(
    socks: &mut dyn RouterKernel,
    listeners: &Mutex<Vec<(u32, Weak<TcpListener>)>>,
) -> Vec<u32> {
    let occupied = match socks.occupied() {
        Ok(bits) => bits,
        Err(error) => {
            tracing::warn!(%error, "cannot tell which liveness slots are filled");
            return Vec::new();
        }
    };
    let listeners: Vec<_> = listeners.lock().map(|v| v.clone()).unwrap_or_default();
    let mut done = Vec::new();
    for (slot, l) in listeners {
        if done.contains(&slot) || slot >= 32 || occupied & (1 << slot) != 0 {
            continue;
        }
        let Some(l) = l.upgrade() else { continue };
        match socks.register(slot, l.as_fd()) {
            Ok(()) => done.push(slot),
            Err(error) => tracing::error!(%error, slot, "cannot register the router again"),
        }
    }
    done
}

/// Whether an error means the process ran out of descriptors or memory (not a bad peer).
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_water_is_ninety_percent() {
        assert_eq!(low_water(100), 90);
        assert_eq!(low_water(16_384), 14_746);
        assert_eq!(low_water(1), 1);
    }

    #[test]
    fn exhaustion_is_recognised() {
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
