//! The router's kernel boundary: the liveness slots of its listeners (`router_socks_v1`) and the
//! original destinations `sock_ops` records (`conns_v1`). [`RouterSocks`] implements it over the
//! pinned maps; [`MemoryKernel`], over plain tables, so the router's HTTP logic runs in tests
//! without root.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, BorrowedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use redirect_common::{MAP_CONNS, MAP_ROUTER_SOCKS, OrigDst, SockAddr};

use crate::loader::{ConnsTaker, RouterSockError, RouterSocks};

/// The liveness slots and the connection table's upkeep. Callers serialise through one lock
/// (registration order matters); taking records goes through [`OrigDsts`] instead.
pub trait RouterKernel: Send + 'static {
    /// Puts a listening socket in `slot`: the kernel redirects to the router while it is there.
    fn register(&mut self, slot: u32, listener: BorrowedFd<'_>) -> Result<(), RouterSockError>;
    /// Empties `slot` (no error when it is empty already).
    fn deregister(&mut self, slot: u32) -> Result<(), RouterSockError>;
    /// Which slots hold a socket, whoever's (bit n: slot n).
    fn occupied(&self) -> Result<u32, RouterSockError>;
    /// Removes records older than `max_age` (connections that never reached the router);
    /// returns how many.
    fn sweep(&mut self, max_age: Duration) -> usize;
    /// A handle for taking records from any thread, without the lock.
    fn orig_dsts(&self) -> Result<Box<dyn OrigDsts>, RouterSockError>;
}

/// Taking original destinations, once each.
pub trait OrigDsts: Send + Sync + 'static {
    /// The original destination recorded for a client's source address, removed as it is read:
    /// `Ok(None)` when there is none; an error when the map cannot be read (never taken for
    /// "none": that would refuse the client silently).
    fn take(&self, src: &SockAddr) -> Result<Option<OrigDst>, RouterSockError>;

    /// A slower way this kernel makes takes go, for `/status`.
    fn fallback(&self) -> Option<&'static str> {
        None
    }
}

impl RouterKernel for RouterSocks {
    fn register(&mut self, slot: u32, listener: BorrowedFd<'_>) -> Result<(), RouterSockError> {
        RouterSocks::register(self, slot, &listener.as_raw_fd())
    }

    fn deregister(&mut self, slot: u32) -> Result<(), RouterSockError> {
        RouterSocks::deregister(self, slot)
    }

    fn occupied(&self) -> Result<u32, RouterSockError> {
        RouterSocks::occupied(self)
    }

    fn sweep(&mut self, max_age: Duration) -> usize {
        RouterSocks::sweep(self, max_age)
    }

    fn orig_dsts(&self) -> Result<Box<dyn OrigDsts>, RouterSockError> {
        Ok(Box::new(self.conns_taker()?))
    }
}

impl OrigDsts for ConnsTaker {
    fn take(&self, src: &SockAddr) -> Result<Option<OrigDst>, RouterSockError> {
        ConnsTaker::take(self, src)
    }

    fn fallback(&self) -> Option<&'static str> {
        self.split().then_some(
            "conns_v1: lookup, then delete (no lookup-and-delete on hash maps before Linux 5.14)",
        )
    }
}

/// The kernel's side kept in memory: what tests record and read back. Clones share the tables.
#[derive(Clone, Default)]
pub struct MemoryKernel {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
struct MemoryState {
    /// The registered listener's descriptor per slot.
    slots: [Option<i32>; 2],
    conns: HashMap<SockAddr, OrigDst>,
    /// Takes fail, as a map the kernel refuses to read would.
    broken: bool,
}

impl MemoryKernel {
    /// Records a connection from `src` to `orig`, as `sock_ops` does before the SYN.
    pub fn record(&self, src: SockAddr, orig: OrigDst) {
        self.lock().conns.insert(src, orig);
    }

    /// Makes every take fail from now on.
    pub fn break_takes(&self) {
        self.lock().broken = true;
    }

    /// Records not taken yet.
    pub fn pending(&self) -> usize {
        self.lock().conns.len()
    }

    /// Which slots hold a listener (bit n: slot n).
    pub fn registered(&self) -> u32 {
        slot_bits(&self.lock().slots)
    }

    /// Empties a slot behind the router's back, as a peer router sharing the address may.
    pub fn clear(&self, slot: u32) {
        if let Some(s) = self.lock().slots.get_mut(slot as usize) {
            *s = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A test that panicked while holding the lock fails anyway; the tables stay readable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn slot_bits(slots: &[Option<i32>; 2]) -> u32 {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_some())
        .fold(0, |bits, (i, _)| bits | 1 << i)
}

impl RouterKernel for MemoryKernel {
    fn register(&mut self, slot: u32, listener: BorrowedFd<'_>) -> Result<(), RouterSockError> {
        let mut state = self.lock();
        let s = state
            .slots
            .get_mut(slot as usize)
            .ok_or_else(|| RouterSockError::new(MAP_ROUTER_SOCKS, format!("no slot {slot}")))?;
        *s = Some(listener.as_raw_fd());
        Ok(())
    }

    fn deregister(&mut self, slot: u32) -> Result<(), RouterSockError> {
        self.clear(slot);
        Ok(())
    }

    fn occupied(&self) -> Result<u32, RouterSockError> {
        Ok(self.registered())
    }

    fn sweep(&mut self, _max_age: Duration) -> usize {
        0
    }

    fn orig_dsts(&self) -> Result<Box<dyn OrigDsts>, RouterSockError> {
        Ok(Box::new(self.clone()))
    }
}

impl OrigDsts for MemoryKernel {
    fn take(&self, src: &SockAddr) -> Result<Option<OrigDst>, RouterSockError> {
        let mut state = self.lock();
        if state.broken {
            return Err(RouterSockError::new(
                MAP_CONNS,
                "taking a record: broken on purpose",
            ));
        }
        Ok(state.conns.remove(src))
    }
}
