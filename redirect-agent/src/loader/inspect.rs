//! Read-only views of what is pinned: links and the programs they run, map fill levels, router
//! liveness (as `connect4` sees it), the original-destination table and the trace switch. Used by
//! `redirectctl` (which works while the agent is down) and by the agent's `/metrics`.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::SystemTime,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use redirect_common::{
    ALL_MAPS, CGROUP_PROGRAMS, MAP_CONNS, MAP_ROUTER_SOCKS, MAP_TRACE_CTL, MAP_TRACE_EVENTS,
    MAP_TRACE_STATS, OrigDst, RECORD_PROGRAMS, SockAddr, TRACE_OFF, TRACE_STAT_DROPPED,
    TRACE_STAT_EMITTED, TraceControl, TraceEvent,
};

use super::sys;
use crate::sync::MapError;

fn other(map: &'static str, e: impl std::fmt::Display) -> MapError {
    MapError::Other {
        map,
        reason: e.to_string(),
    }
}

fn open_data(pin_dir: &Path, name: &'static str) -> Result<MapData, MapError> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).map_err(|e| other(name, format!("opening {}: {e}", path.display())))
}

fn open(pin_dir: &Path, name: &'static str) -> Result<Map, MapError> {
    Map::from_map_data(open_data(pin_dir, name)?).map_err(|e| other(name, e))
}

/// One pinned program link.
#[derive(Clone, Debug)]
pub struct LinkStatus {
    pub program: &'static str,
    pub pin: PathBuf,
    /// None when the pin is missing or unreadable (`error` says why).
    pub link: Option<sys::LinkInfo>,
    pub prog_name: Option<String>,
    /// When the program the link runs was loaded (the agent's last start, as programs are
    /// swapped into existing links).
    pub prog_loaded_at: Option<SystemTime>,
    pub error: Option<String>,
}

/// The link of every program at the cgroup root, pinned or not, and of the record hook in use
/// (both record hooks, as missing, when neither is pinned).
pub fn links(pin_dir: &Path) -> Vec<LinkStatus> {
    let progs: Vec<aya::programs::ProgramInfo> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .collect();
    let pinned: Vec<_> = RECORD_PROGRAMS
        .iter()
        .filter(|(_, link)| pin_dir.join(link).exists())
        .collect();
    let record = if pinned.is_empty() {
        RECORD_PROGRAMS.iter().collect()
    } else {
        pinned
    };
    CGROUP_PROGRAMS
        .iter()
        .chain(record)
        .map(|(program, link_name)| {
            let pin = pin_dir.join(link_name);
            let mut st = LinkStatus {
                program,
                pin: pin.clone(),
                link: None,
                prog_name: None,
                prog_loaded_at: None,
                error: None,
            };
            if !pin.exists() {
                st.error = Some("not pinned".into());
                return st;
            }
            match sys::obj_get(&pin).and_then(|fd| sys::link_details(&fd)) {
                Ok(info) => {
                    if let Some(p) = progs.iter().find(|p| p.id() == info.prog_id) {
                        st.prog_name = p.name_as_str().map(str::to_string);
                        st.prog_loaded_at = p.loaded_at();
                    }
                    st.link = Some(info);
                }
                Err(e) => st.error = Some(e.to_string()),
            }
            st
        })
        .collect()
}

/// How full one pinned map is.
#[derive(Clone, Debug)]
pub struct MapFill {
    pub name: &'static str,
    pub map_type: String,
    pub id: u32,
    /// Entries present; None where the kernel cannot list them (socket storage, ring buffer).
    pub entries: Option<u64>,
    /// `max_entries` (bytes for the ring buffer).
    pub max_entries: u32,
    pub error: Option<String>,
}

/// Fill level of every map in `ALL_MAPS`.
pub fn map_fill(pin_dir: &Path) -> Vec<MapFill> {
    ALL_MAPS
        .iter()
        .map(|name| {
            let mut f = MapFill {
                name,
                map_type: String::new(),
                id: 0,
                entries: None,
                max_entries: 0,
                error: None,
            };
            let data = match open_data(pin_dir, name) {
                Ok(d) => d,
                Err(e) => {
                    f.error = Some(e.to_string());
                    return f;
                }
            };
            if let Ok(info) = data.info() {
                f.id = info.id();
                f.max_entries = info.max_entries();
                f.map_type = info
                    .map_type()
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_else(|_| "unknown".into());
            }
            f.entries = match Map::from_map_data(data) {
                Ok(Map::HashMap(d)) | Ok(Map::LruHashMap(d)) => {
                    Some(sys::count_keys(d.fd().as_fd(), u64::from(f.max_entries)))
                }
                Ok(Map::Array(_)) | Ok(Map::PerCpuArray(_)) => Some(u64::from(f.max_entries)),
                Ok(Map::SockMap(d)) => sys::sockmap_occupied(&d.fd().as_fd())
                    .map(|bits| u64::from(bits.count_ones()))
                    .ok(),
                _ => None,
            };
            f
        })
        .collect()
}

/// Which router listeners are in `router_socks_v1`: `[v4, v6]`, exactly what `connect4`/
/// `connect6` check before redirecting to the router.
pub fn router_alive(pin_dir: &Path) -> Result<[bool; 2], MapError> {
    let data = open_data(pin_dir, MAP_ROUTER_SOCKS)?;
    let bits = sys::sockmap_occupied(&data.fd().as_fd()).map_err(|e| {
        other(
            MAP_ROUTER_SOCKS,
            format!("probing the router sockets (BPF_PROG_TEST_RUN): {e}"),
        )
    })?;
    Ok([bits & 1 != 0, bits & 2 != 0])
}

/// Every entry of `conns_v1`: client source address → original destination.
pub fn conns(pin_dir: &Path) -> Result<Vec<(SockAddr, OrigDst)>, MapError> {
    let map: HashMap<MapData, SockAddr, OrigDst> = open(pin_dir, MAP_CONNS)?
        .try_into()
        .map_err(|e| other(MAP_CONNS, e))?;
    map.iter()
        .map(|r| r.map_err(|e| other(MAP_CONNS, e)))
        .collect()
}

/// The trace switch as it is now.
pub fn trace_control(pin_dir: &Path) -> Result<TraceControl, MapError> {
    let ctl: Array<MapData, TraceControl> = open(pin_dir, MAP_TRACE_CTL)?
        .try_into()
        .map_err(|e| other(MAP_TRACE_CTL, e))?;
    ctl.get(&0, 0).map_err(|e| other(MAP_TRACE_CTL, e))
}

/// Trace events emitted and dropped since the maps were created (summed over CPUs).
pub fn trace_stats(pin_dir: &Path) -> Result<(u64, u64), MapError> {
    let stats: PerCpuArray<MapData, u64> = open(pin_dir, MAP_TRACE_STATS)?
        .try_into()
        .map_err(|e| other(MAP_TRACE_STATS, e))?;
    let sum = |i: u32| -> Result<u64, MapError> {
        Ok(stats
            .get(&i, 0)
            .map_err(|e| other(MAP_TRACE_STATS, e))?
            .iter()
            .sum())
    };
    Ok((sum(TRACE_STAT_EMITTED)?, sum(TRACE_STAT_DROPPED)?))
}

/// A tracer heartbeat older than this means the tracer is gone.
pub const TRACE_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a tracer renews its heartbeat.
pub const TRACE_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// Turns tracing off when the tracer that turned it on stopped renewing its heartbeat (it was
/// killed). Returns the stale control entry it cleared, if any.
pub fn clear_stale_trace(pin_dir: &Path) -> Result<Option<TraceControl>, MapError> {
    let mut ctl: Array<MapData, TraceControl> = open(pin_dir, MAP_TRACE_CTL)?
        .try_into()
        .map_err(|e| other(MAP_TRACE_CTL, e))?;
    let c = ctl.get(&0, 0).map_err(|e| other(MAP_TRACE_CTL, e))?;
    let age = super::kernel_maps::monotonic_ns().saturating_sub(c.heartbeat_ns);
    if c.mode == TRACE_OFF || age < TRACE_STALE_AFTER.as_nanos() as u64 {
        return Ok(None);
    }
    ctl.set(0, &TraceControl::default(), 0)
        .map_err(|e| other(MAP_TRACE_CTL, e))?;
    Ok(Some(c))
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(
        "another trace is running (pid {pid}, heartbeat {age_ms} ms ago); one reader at a time"
    )]
    Busy { pid: u32, age_ms: u64 },
}

/// A running trace: the switch is on while this lives (dropping it switches tracing off).
pub struct TraceSession {
    ctl: Array<MapData, TraceControl>,
    ring: RingBuf<MapData>,
    mine: TraceControl,
}

impl TraceSession {
    /// Turns tracing on in `mode` (`TRACE_FORKED` or `TRACE_ALL`). Refuses when another live
    /// tracer holds the switch; takes over a stale one.
    pub fn start(pin_dir: &Path, mode: u32) -> Result<Self, TraceError> {
        let mut ctl: Array<MapData, TraceControl> = open(pin_dir, MAP_TRACE_CTL)?
            .try_into()
            .map_err(|e| other(MAP_TRACE_CTL, e))?;
        let ring: RingBuf<MapData> = open(pin_dir, MAP_TRACE_EVENTS)?
            .try_into()
            .map_err(|e| other(MAP_TRACE_EVENTS, e))?;
        let now = super::kernel_maps::monotonic_ns();
        let cur = ctl.get(&0, 0).map_err(|e| other(MAP_TRACE_CTL, e))?;
        let age = now.saturating_sub(cur.heartbeat_ns);
        if cur.mode != TRACE_OFF && age < TRACE_STALE_AFTER.as_nanos() as u64 {
            return Err(TraceError::Busy {
                pid: cur.pid,
                age_ms: age / 1_000_000,
            });
        }
        let mine = TraceControl {
            mode,
            pid: std::process::id(),
            heartbeat_ns: now,
        };
        ctl.set(0, &mine, 0).map_err(|e| other(MAP_TRACE_CTL, e))?;
        let mut s = TraceSession { ctl, ring, mine };
        // Events left from an earlier trace are not this trace's.
        while s.ring.next().is_some() {}
        Ok(s)
    }

    /// Renews the heartbeat (call about every [`TRACE_HEARTBEAT`]).
    pub fn heartbeat(&mut self) -> Result<(), MapError> {
        self.mine.heartbeat_ns = super::kernel_maps::monotonic_ns();
        self.ctl
            .set(0, &self.mine, 0)
            .map_err(|e| other(MAP_TRACE_CTL, e))
    }

    /// The next event, if one is waiting.
    pub fn next_event(&mut self) -> Option<TraceEvent> {
        let item = self.ring.next()?;
        if item.len() < std::mem::size_of::<TraceEvent>() {
            return None;
        }
        // SAFETY: the programs write whole `TraceEvent`s (a `#[repr(C)]` of integers); the
        // ring buffer gives 8-byte aligned records, read unaligned anyway.
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceEvent>()) })
    }

    /// The ring buffer's descriptor, readable when events wait (for poll/epoll).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ring.as_fd()
    }

    /// Switches tracing off, unless someone else took the switch over meanwhile.
    pub fn stop(&mut self) {
        if let Ok(cur) = self.ctl.get(&0, 0)
            && cur.mode != TRACE_OFF
            && cur.pid == self.mine.pid
        {
            let _ = self.ctl.set(0, &TraceControl::default(), 0);
        }
        self.mine.mode = TRACE_OFF;
    }
}

impl Drop for TraceSession {
    fn drop(&mut self) {
        self.stop();
    }
}
