//! The pinned maps, opened by path: the agent's `RedirectMaps`, the router's liveness socket and
//! connection table, and the counters. Works whether or not an agent is running.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError as AyaMapError, PerCpuArray, SockMap};
use redirect_common::{
    ForkEndpoints, ForkKey, MAP_CONNS, MAP_COUNTERS, MAP_FORKS, MAP_ORIGIN_GEN, MAP_ROUTER,
    MAP_ROUTER_SOCKS, MAP_SERVICES, MAP_WORKLOADS, MAX_FORKS, MAX_SERVICES, MAX_WORKLOADS, OrigDst,
    Reason, RouterConfig, ServiceValue, SockAddr, WorkloadValue,
};

use super::sys;
use crate::{
    routing::Tables,
    sync::{MapError, RedirectMaps},
};

fn open(pin_dir: &Path, name: &'static str) -> Result<Map, MapError> {
    open_map(pin_dir, name).map_err(|reason| MapError::Other { map: name, reason })
}

/// Opens a pinned map; the error says why, without the map's name.
fn open_map(pin_dir: &Path, name: &'static str) -> Result<Map, String> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    Map::from_map_data(data).map_err(|e| e.to_string())
}

fn other(map: &'static str, e: AyaMapError) -> MapError {
    MapError::Other {
        map,
        reason: e.to_string(),
    }
}

/// E2BIG from an insert means the map is full.
fn insert_err(map: &'static str, max: u32, e: AyaMapError) -> MapError {
    if let AyaMapError::SyscallError(s) = &e
        && s.io_error.raw_os_error() == Some(libc::E2BIG)
    {
        return MapError::Full { map, max };
    }
    other(map, e)
}

/// Deleting what is not there is fine: the desired state is reached either way.
fn remove_ok(map: &'static str, r: Result<(), AyaMapError>) -> Result<(), MapError> {
    match r {
        Ok(()) | Err(AyaMapError::KeyNotFound) => Ok(()),
        Err(AyaMapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(e) => Err(other(map, e)),
    }
}

/// The routing maps behind `RedirectMaps`.
pub struct KernelMaps {
    services: HashMap<MapData, SockAddr, ServiceValue>,
    forks: HashMap<MapData, ForkKey, ForkEndpoints>,
    workloads: HashMap<MapData, u64, WorkloadValue>,
    /// The generation of `workloads_v1`: incremented after every write to it, which retires
    /// every entry of the programs' caller cache (`redirect_common::origin`).
    origin_gen: Array<MapData, u64>,
    router: Array<MapData, RouterConfig>,
    counters: PerCpuArray<MapData, u64>,
}

impl KernelMaps {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, MapError> {
        Ok(KernelMaps {
            services: open(pin_dir, MAP_SERVICES)?
                .try_into()
                .map_err(|e| other(MAP_SERVICES, e))?,
            forks: open(pin_dir, MAP_FORKS)?
                .try_into()
                .map_err(|e| other(MAP_FORKS, e))?,
            workloads: open(pin_dir, MAP_WORKLOADS)?
                .try_into()
                .map_err(|e| other(MAP_WORKLOADS, e))?,
            origin_gen: open(pin_dir, MAP_ORIGIN_GEN)?
                .try_into()
                .map_err(|e| other(MAP_ORIGIN_GEN, e))?,
            router: open(pin_dir, MAP_ROUTER)?
                .try_into()
                .map_err(|e| other(MAP_ROUTER, e))?,
            counters: open(pin_dir, MAP_COUNTERS)?
                .try_into()
                .map_err(|e| other(MAP_COUNTERS, e))?,
        })
    }

    /// Retires every cached caller lookup of the programs: the next `connect()` from each cgroup
    /// walks `workloads_v1` again. Called after every write to `workloads_v1` (never before: a
    /// program that walked the old map meanwhile would cache the old answer under the new
    /// generation), and once when the agent starts, in case the previous one died between a
    /// write and its increment.
    pub fn invalidate_origin_cache(&mut self) -> Result<(), MapError> {
        let generation = self
            .origin_gen
            .get(&0, 0)
            .map_err(|e| other(MAP_ORIGIN_GEN, e))?;
        self.origin_gen
            .set(0, &generation.wrapping_add(1), 0)
            .map_err(|e| other(MAP_ORIGIN_GEN, e))
    }

    /// Decision counters, summed over CPUs, in `Reason` order.
    pub fn counters(&self) -> Result<[u64; Reason::COUNT as usize], MapError> {
        let mut out = [0u64; Reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|e| other(MAP_COUNTERS, e))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

impl RedirectMaps for KernelMaps {
    fn read(&self) -> Result<Tables, MapError> {
        let mut t = Tables::default();
        for r in self.services.iter() {
            let (k, v) = r.map_err(|e| other(MAP_SERVICES, e))?;
            t.services.insert(k, v);
        }
        for r in self.forks.iter() {
            let (k, v) = r.map_err(|e| other(MAP_FORKS, e))?;
            t.forks.insert(k, v);
        }
        for r in self.workloads.iter() {
            let (k, v) = r.map_err(|e| other(MAP_WORKLOADS, e))?;
            t.workloads.insert(k, v);
        }
        t.router = self.router.get(&0, 0).map_err(|e| other(MAP_ROUTER, e))?;
        Ok(t)
    }

    fn put_service(&mut self, key: SockAddr, value: ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(&key, &value, 0)
            .map_err(|e| insert_err(MAP_SERVICES, MAX_SERVICES, e))
    }

    fn del_service(&mut self, key: &SockAddr) -> Result<(), MapError> {
        remove_ok(MAP_SERVICES, self.services.remove(key))
    }

    fn put_fork(&mut self, key: ForkKey, value: ForkEndpoints) -> Result<(), MapError> {
        self.forks
            .insert(&key, &value, 0)
            .map_err(|e| insert_err(MAP_FORKS, MAX_FORKS, e))
    }

    fn del_fork(&mut self, key: &ForkKey) -> Result<(), MapError> {
        remove_ok(MAP_FORKS, self.forks.remove(key))
    }

    fn put_workload(&mut self, cgroup_id: u64, value: WorkloadValue) -> Result<(), MapError> {
        let put = self
            .workloads
            .insert(&cgroup_id, &value, 0)
            .map_err(|e| insert_err(MAP_WORKLOADS, MAX_WORKLOADS, e));
        // Whatever the insert did, the write is over: retire what the programs cached before.
        self.invalidate_origin_cache()?;
        put
    }

    fn del_workload(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        let del = remove_ok(MAP_WORKLOADS, self.workloads.remove(&cgroup_id));
        self.invalidate_origin_cache()?;
        del
    }

    fn set_router(&mut self, value: RouterConfig) -> Result<(), MapError> {
        self.router
            .set(0, &value, 0)
            .map_err(|e| other(MAP_ROUTER, e))
    }
}

/// A failure on the router's maps (`router_socks_v1`, `conns_v1`): which map, and why.
#[derive(Debug, thiserror::Error)]
#[error("map {map}: {reason}")]
pub struct RouterSockError {
    pub map: &'static str,
    pub reason: String,
}

impl RouterSockError {
    pub fn new(map: &'static str, reason: impl std::fmt::Display) -> Self {
        RouterSockError {
            map,
            reason: reason.to_string(),
        }
    }
}

/// The router's side of the maps: liveness registration and original-destination lookups.
pub struct RouterSocks {
    socks: SockMap<MapData>,
    conns: HashMap<MapData, SockAddr, OrigDst>,
    pub pin_dir: PathBuf,
}

impl RouterSocks {
    pub fn open(pin_dir: &Path) -> Result<Self, RouterSockError> {
        let open = |name| open_map(pin_dir, name).map_err(|e| RouterSockError::new(name, e));
        Ok(RouterSocks {
            socks: open(MAP_ROUTER_SOCKS)?
                .try_into()
                .map_err(|e| RouterSockError::new(MAP_ROUTER_SOCKS, e))?,
            conns: open(MAP_CONNS)?
                .try_into()
                .map_err(|e| RouterSockError::new(MAP_CONNS, e))?,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Puts a listening socket in the liveness sockmap at `slot`. The kernel removes it when the
    /// socket closes, so redirects stop the instant the router dies.
    pub fn register<S: AsRawFd>(&mut self, slot: u32, listener: &S) -> Result<(), RouterSockError> {
        self.socks
            .set(slot, listener, 0)
            .map_err(|e| RouterSockError::new(MAP_ROUTER_SOCKS, e))
    }

    /// Empties the liveness slot: the kernel stops redirecting to this router (fail open)
    /// while its listener stays open. Emptying an empty slot is no error.
    pub fn deregister(&mut self, slot: u32) -> Result<(), RouterSockError> {
        match self.socks.clear_index(&slot) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(RouterSockError::new(MAP_ROUTER_SOCKS, e)),
        }
    }

    /// Which liveness slots hold a socket (bit 0: slot 0, bit 1: slot 1), whoever's.
    pub fn occupied(&self) -> Result<u32, RouterSockError> {
        use std::os::fd::AsFd;
        sys::sockmap_occupied(&self.socks.fd().as_fd()).map_err(|e| {
            RouterSockError::new(
                MAP_ROUTER_SOCKS,
                format!("probing the router sockets (BPF_PROG_TEST_RUN): {e}"),
            )
        })
    }

    /// A handle on the connection table for taking records, usable from any thread without
    /// locking.
    pub fn conns_taker(&self) -> Result<ConnsTaker, RouterSockError> {
        let path = self.pin_dir.join(MAP_CONNS);
        let fd = sys::obj_get(&path).map_err(|e| {
            RouterSockError::new(MAP_CONNS, format!("opening {}: {e}", path.display()))
        })?;
        let taker = ConnsTaker {
            fd,
            split: std::sync::atomic::AtomicBool::new(false),
        };
        // Find out now which way takes work here: the all-zero address is never a client's.
        let _ = take_with(
            &taker.fd,
            &taker.split,
            &[0u8; size_of::<SockAddr>()],
            &mut [0u8; size_of::<OrigDst>()],
        );
        Ok(taker)
    }

    /// Removes records older than `max_age` (connections that failed before reaching the
    /// router); returns how many.
    pub fn sweep(&mut self, max_age: std::time::Duration) -> usize {
        let now = monotonic_ns();
        let max = max_age.as_nanos() as u64;
        let stale: Vec<SockAddr> = self
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| now.saturating_sub(v.recorded_ns) > max)
            .map(|(k, _)| k)
            .collect();
        stale
            .iter()
            .filter(|k| self.conns.remove(k).is_ok())
            .count()
    }
}

/// Takes original-destination records out of `conns_v1`: one syscall (lookup and delete), no
/// lock, so every router thread can use it. Kernels before 5.14 have no lookup-and-delete for
/// hash maps: the first refusal switches this taker to a lookup, then a delete, for good.
pub struct ConnsTaker {
    fd: std::os::fd::OwnedFd,
    split: std::sync::atomic::AtomicBool,
}

/// What the kernel answers to a lookup-and-delete on a hash map it cannot do it for (before
/// 5.14): `ENOTSUPP`, a kernel-internal errno libc does not name.
const ENOTSUPP: i32 = 524;

/// The map calls a take needs, so the fallback can be tested without a kernel.
trait TakeCalls {
    fn lookup_and_delete(&self, key: &[u8], out: &mut [u8]) -> std::io::Result<bool>;
    fn lookup(&self, key: &[u8], out: &mut [u8]) -> std::io::Result<bool>;
    fn delete(&self, key: &[u8]) -> std::io::Result<bool>;
}

impl TakeCalls for std::os::fd::OwnedFd {
    fn lookup_and_delete(&self, key: &[u8], out: &mut [u8]) -> std::io::Result<bool> {
        sys::map_lookup_and_delete(self, key, out)
    }
    fn lookup(&self, key: &[u8], out: &mut [u8]) -> std::io::Result<bool> {
        sys::map_lookup(self, key, out)
    }
    fn delete(&self, key: &[u8]) -> std::io::Result<bool> {
        sys::map_delete(self, key)
    }
}

/// Takes `key` out of the map into `out`; `Ok(false)` when it is not there.
fn take_with(
    calls: &impl TakeCalls,
    split: &std::sync::atomic::AtomicBool,
    key: &[u8],
    out: &mut [u8],
) -> std::io::Result<bool> {
    use std::sync::atomic::Ordering::Relaxed;
    if !split.load(Relaxed) {
        match calls.lookup_and_delete(key, out) {
            Err(e) if e.raw_os_error() == Some(ENOTSUPP) => {
                if !split.swap(true, Relaxed) {
                    tracing::info!(
                        "this kernel cannot look up and delete in one call on hash maps \
                         (before Linux 5.14): the router takes original destinations with a \
                         lookup, then a delete"
                    );
                }
            }
            taken => return taken,
        }
    }
    if !calls.lookup(key, out)? {
        return Ok(false);
    }
    // Only the router connection from this source address takes its key, so nobody else
    // deletes it meanwhile but the age sweep, and then the value read is still the record.
    calls.delete(key)?;
    Ok(true)
}

impl ConnsTaker {
    /// Takes the original destination recorded for a client's source address: `Ok(None)` when
    /// there is none, an error when the map call fails.
    pub fn take(&self, src: &SockAddr) -> Result<Option<OrigDst>, RouterSockError> {
        let mut value = OrigDst::default();
        // SAFETY: both types are `#[repr(C)]` plain integers without padding (asserted in
        // redirect-common), so viewing them as bytes is sound.
        let key = unsafe {
            std::slice::from_raw_parts((src as *const SockAddr).cast::<u8>(), size_of::<SockAddr>())
        };
        let out = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut value as *mut OrigDst).cast::<u8>(),
                size_of::<OrigDst>(),
            )
        };
        match take_with(&self.fd, &self.split, key, out) {
            Ok(true) => Ok(Some(value)),
            Ok(false) => Ok(None),
            Err(e) => Err(RouterSockError::new(
                MAP_CONNS,
                format!("taking a record: {e}"),
            )),
        }
    }

    /// Whether this kernel needed the lookup-then-delete fallback.
    pub fn split(&self) -> bool {
        self.split.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod take_tests {
    use std::{
        cell::RefCell,
        collections::HashMap,
        io,
        sync::atomic::{AtomicBool, Ordering},
    };

    use super::*;

    /// A hash map behind the three calls; `one_call` answers like the kernel of that version.
    struct Fake {
        one_call: Result<(), i32>,
        map: RefCell<HashMap<Vec<u8>, Vec<u8>>>,
        one_call_tries: RefCell<u32>,
    }

    impl TakeCalls for Fake {
        fn lookup_and_delete(&self, key: &[u8], out: &mut [u8]) -> io::Result<bool> {
            *self.one_call_tries.borrow_mut() += 1;
            self.one_call.map_err(io::Error::from_raw_os_error)?;
            let found = self.lookup(key, out)?;
            self.delete(key)?;
            Ok(found)
        }
        fn lookup(&self, key: &[u8], out: &mut [u8]) -> io::Result<bool> {
            match self.map.borrow().get(key) {
                Some(v) => {
                    out.copy_from_slice(v);
                    Ok(true)
                }
                None => Ok(false),
            }
        }
        fn delete(&self, key: &[u8]) -> io::Result<bool> {
            Ok(self.map.borrow_mut().remove(key).is_some())
        }
    }

    fn fake(one_call: Result<(), i32>) -> Fake {
        let map = HashMap::from([
            (b"k1".to_vec(), b"v1".to_vec()),
            (b"k2".to_vec(), b"v2".to_vec()),
        ]);
        Fake {
            one_call,
            map: RefCell::new(map),
            one_call_tries: RefCell::new(0),
        }
    }

    #[test]
    fn a_kernel_without_lookup_and_delete_is_served_by_lookup_then_delete_from_then_on() {
        let calls = fake(Err(ENOTSUPP));
        let split = AtomicBool::new(false);
        let mut out = [0u8; 2];
        assert!(take_with(&calls, &split, b"k1", &mut out).unwrap());
        assert_eq!(&out, b"v1");
        assert!(split.load(Ordering::Relaxed));
        assert!(
            !calls.map.borrow().contains_key(b"k1".as_slice()),
            "taken, not copied"
        );
        assert!(take_with(&calls, &split, b"k2", &mut out).unwrap());
        assert!(
            !take_with(&calls, &split, b"k2", &mut out).unwrap(),
            "taken once"
        );
        assert_eq!(*calls.one_call_tries.borrow(), 1, "asked the kernel once");
    }

    #[test]
    fn other_failures_are_errors_not_a_missing_record() {
        let calls = fake(Err(libc::EPERM));
        let split = AtomicBool::new(false);
        let err = take_with(&calls, &split, b"k1", &mut [0u8; 2]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(!split.load(Ordering::Relaxed));
        let calls = fake(Ok(()));
        assert!(!take_with(&calls, &split, b"zz", &mut [0u8; 2]).unwrap());
        assert!(take_with(&calls, &split, b"k1", &mut [0u8; 2]).unwrap());
        assert!(!split.load(Ordering::Relaxed));
    }
}
