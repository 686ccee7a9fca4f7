//! The last good state, kept beside the pins so that a restarted agent routes with it at once.
//!
//! The kernel maps survive a restart but hold only ids; the router also needs the names behind
//! them (which routing key is which id, each sandbox's fallback). After every sync that applied
//! without failure the agent writes the whole `Tables` as a versioned JSON document. bpffs takes
//! no regular files, so the document lives in a pinned array map (`state_v1`) in the pin
//! directory: it exists exactly as long as the pins it describes (a reboot or `cleanup` removes
//! both), and needs no other volume in a container. It is replaced atomically: written into a
//! new map, pinned under a temporary name, then renamed over the old pin.
//!
//! At start the document is used only when its kernel part equals what the pinned maps hold: a
//! later failed sync or another writer may have changed the maps since, and then neither is
//! trusted for the router until the first sync.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use redirect_common::{
    ForkEndpoints, ForkKey, MAX_FORK_ENDPOINTS, RouterConfig, ServiceValue, SockAddr, WorkloadValue,
};
use serde::{Deserialize, Serialize};

use crate::{
    loader::sys,
    routing::{KeyInfo, PortProtocol, ServiceName, Tables},
};

/// Pin name of the document (the version is that of the pin's layout, as for the maps).
pub const STATE_PIN: &str = "state_v1";
/// Where a write pins the new document before renaming it over `STATE_PIN`.
pub const STATE_PIN_TMP: &str = "state_v1_tmp";
/// Version of the JSON document.
pub const STATE_VERSION: u32 = 1;
/// Bytes per array entry of the pinned document.
const CHUNK: usize = 32 * 1024;
/// Largest document accepted (a node's tables are small: only forked services and local forks).
const MAX_DOC: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("persisted state {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("persisted state {path}: not a valid document: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("persisted state {path}: version {found}, this agent reads version {STATE_VERSION}")]
    Version { path: String, found: u32 },
}

/// Where the document is kept.
pub trait StateStore: Send {
    /// The stored bytes, `None` when nothing was stored yet (a first start, or an agent that
    /// predates persistence).
    fn load(&self) -> Result<Option<Vec<u8>>, StateError>;
    /// Replaces the stored bytes, all or nothing.
    fn save(&self, bytes: &[u8]) -> Result<(), StateError>;
    /// For messages.
    fn describe(&self) -> String;
}

/// The document pinned in the pin directory.
pub struct PinnedState {
    dir: PathBuf,
}

impl PinnedState {
    pub fn new(pin_dir: &Path) -> Self {
        PinnedState {
            dir: pin_dir.to_path_buf(),
        }
    }
}

impl StateStore for PinnedState {
    fn load(&self) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join(STATE_PIN);
        let io_err = |e: io::Error| StateError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        let fd = match sys::obj_get(&path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let shape = sys::map_shape(&fd).map_err(io_err)?;
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.display().to_string(),
            reason,
        };
        let total = shape.value_size as usize * shape.max_entries as usize;
        if shape.map_type != sys::MAP_TYPE_ARRAY
            || shape.key_size != 4
            || shape.value_size == 0
            || total > MAX_DOC + CHUNK
        {
            return Err(corrupt(format!("unexpected map shape {shape:?}")));
        }
        let mut blob = vec![0u8; total];
        for (i, chunk) in blob.chunks_mut(shape.value_size as usize).enumerate() {
            sys::array_lookup(&fd, i as u32, chunk).map_err(io_err)?;
        }
        unframe(&blob).map(|b| Some(b.to_vec())).map_err(corrupt)
    }

    fn save(&self, bytes: &[u8]) -> Result<(), StateError> {
        let tmp = self.dir.join(STATE_PIN_TMP);
        let io_err = |e: io::Error| StateError::Io {
            path: tmp.clone(),
            reason: e.to_string(),
        };
        let blob = frame(bytes);
        // A write cut short by a crash leaves the temporary pin: it never counts, replace it.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(e)),
            _ => {}
        }
        let fd = sys::array_create("redirect_state", CHUNK as u32, (blob.len() / CHUNK) as u32)
            .map_err(io_err)?;
        for (i, chunk) in blob.chunks(CHUNK).enumerate() {
            sys::array_update(&fd, i as u32, chunk).map_err(io_err)?;
        }
        sys::obj_pin(&fd, &tmp).map_err(io_err)?;
        // rename(2) within bpffs replaces the old pin at once: a reader sees one or the other.
        let path = self.dir.join(STATE_PIN);
        std::fs::rename(&tmp, &path).map_err(|e| StateError::Io {
            path,
            reason: e.to_string(),
        })
    }

    fn describe(&self) -> String {
        self.dir.join(STATE_PIN).display().to_string()
    }
}

/// An in-memory store (tests).
#[derive(Clone, Default)]
pub struct MemoryState(pub Arc<Mutex<Option<Vec<u8>>>>);

impl StateStore for MemoryState {
    fn load(&self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
    fn save(&self, bytes: &[u8]) -> Result<(), StateError> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes.to_vec());
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Length (u64, little endian), document, zeros up to a whole number of chunks.
fn frame(doc: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(8 + doc.len() + CHUNK);
    blob.extend_from_slice(&(doc.len() as u64).to_le_bytes());
    blob.extend_from_slice(doc);
    blob.resize(blob.len().div_ceil(CHUNK) * CHUNK, 0);
    blob
}

fn unframe(blob: &[u8]) -> Result<&[u8], String> {
    let len = blob
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
        .ok_or("shorter than its length field")?;
    blob.get(8..8usize.saturating_add(len))
        .ok_or_else(|| format!("says {len} bytes, holds {}", blob.len().saturating_sub(8)))
}

/// The JSON document: the tables as the maps hold them, plus the names the router needs.
#[derive(Serialize, Deserialize)]
struct Doc {
    version: u32,
    /// The node's pods by address (the router opens upstream sockets in their namespaces).
    pods: Vec<(IpAddr, String)>,
    services: Vec<(Addr, u32, u32)>,
    forks: Vec<Fork>,
    workloads: Vec<(u64, u32)>,
    router: Router,
    service_names: Vec<(u32, String, String, String)>,
    /// How the router treats each forked port (declared HTTP or detected).
    #[serde(default)]
    service_protocols: Vec<(u32, PortProtocol)>,
    keys: Vec<Key>,
}

/// Only the version, read first so that a future layout is reported as such, not as corrupt.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct Addr {
    ip: [u32; 4],
    port: u16,
}

#[derive(Serialize, Deserialize)]
struct Fork {
    key_id: u32,
    service_id: u32,
    count: u32,
    count_v4: u32,
    endpoints: Vec<Addr>,
}

#[derive(Serialize, Deserialize)]
struct Router {
    v4: Addr,
    v6: Addr,
    mark: u32,
}

#[derive(Serialize, Deserialize)]
struct Key {
    id: u32,
    key: String,
    owners: Vec<String>,
    fallback_to_baseline: bool,
}

impl From<&SockAddr> for Addr {
    fn from(a: &SockAddr) -> Self {
        Addr {
            ip: a.ip,
            port: a.port,
        }
    }
}

impl From<&Addr> for SockAddr {
    fn from(a: &Addr) -> Self {
        SockAddr::v6(a.ip, a.port)
    }
}

/// What a restarted agent starts from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Saved {
    pub tables: Tables,
    pub pods: Vec<(IpAddr, String)>,
}

/// The document for `saved`.
pub fn encode(saved: &Saved) -> Vec<u8> {
    let t = &saved.tables;
    let doc = Doc {
        version: STATE_VERSION,
        pods: saved.pods.clone(),
        services: t
            .services
            .iter()
            .map(|(k, v)| (k.into(), v.service_id, v.flags))
            .collect(),
        forks: t
            .forks
            .iter()
            .map(|(k, v)| Fork {
                key_id: k.key_id,
                service_id: k.service_id,
                count: v.count,
                count_v4: v.count_v4,
                endpoints: v.endpoints.iter().map(Addr::from).collect(),
            })
            .collect(),
        workloads: t.workloads.iter().map(|(k, v)| (*k, v.key_id)).collect(),
        router: Router {
            v4: (&t.router.v4).into(),
            v6: (&t.router.v6).into(),
            mark: t.router.mark,
        },
        service_names: t
            .service_names
            .iter()
            .map(|(id, n)| (*id, n.namespace.clone(), n.name.clone(), n.port.clone()))
            .collect(),
        service_protocols: t
            .service_protocols
            .iter()
            .map(|(id, p)| (*id, *p))
            .collect(),
        keys: t
            .keys
            .iter()
            .map(|(id, k)| Key {
                id: *id,
                key: k.key.clone(),
                owners: k.owners.clone(),
                fallback_to_baseline: k.fallback_to_baseline,
            })
            .collect(),
    };
    // Serializing plain structs, strings and numbers cannot fail.
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The state in `bytes`; `what` names the store in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<Saved, StateError> {
    let corrupt = |e: serde_json::Error| StateError::Corrupt {
        path: what.to_string(),
        reason: e.to_string(),
    };
    let v: VersionOnly = serde_json::from_slice(bytes).map_err(corrupt)?;
    if v.version != STATE_VERSION {
        return Err(StateError::Version {
            path: what.to_string(),
            found: v.version,
        });
    }
    let doc: Doc = serde_json::from_slice(bytes).map_err(corrupt)?;
    let mut t = Tables::default();
    for (a, service_id, flags) in &doc.services {
        t.services.insert(
            a.into(),
            ServiceValue {
                service_id: *service_id,
                flags: *flags,
            },
        );
    }
    for f in &doc.forks {
        if f.endpoints.len() != MAX_FORK_ENDPOINTS {
            return Err(StateError::Corrupt {
                path: what.to_string(),
                reason: format!(
                    "fork ({}, {}) has {} endpoint slots, not {MAX_FORK_ENDPOINTS}",
                    f.key_id,
                    f.service_id,
                    f.endpoints.len()
                ),
            });
        }
        let mut v = ForkEndpoints {
            count: f.count,
            count_v4: f.count_v4,
            ..Default::default()
        };
        for (slot, a) in v.endpoints.iter_mut().zip(&f.endpoints) {
            *slot = a.into();
        }
        t.forks.insert(
            ForkKey {
                key_id: f.key_id,
                service_id: f.service_id,
            },
            v,
        );
    }
    for (cgroup, key_id) in &doc.workloads {
        t.workloads.insert(
            *cgroup,
            WorkloadValue {
                key_id: *key_id,
                _pad: 0,
            },
        );
    }
    t.router = RouterConfig {
        v4: (&doc.router.v4).into(),
        v6: (&doc.router.v6).into(),
        mark: doc.router.mark,
        _pad: 0,
    };
    for (id, namespace, name, port) in doc.service_names {
        t.service_names.insert(
            id,
            Arc::new(ServiceName {
                namespace,
                name,
                port,
            }),
        );
    }
    t.service_protocols = doc.service_protocols.into_iter().collect();
    for k in doc.keys {
        t.keys.insert(
            k.id,
            Arc::new(KeyInfo {
                key: k.key,
                owners: k.owners,
                fallback_to_baseline: k.fallback_to_baseline,
            }),
        );
    }
    Ok(Saved {
        tables: t,
        pods: doc.pods,
    })
}

/// Whether `saved` describes exactly what the kernel maps hold (`pinned`, read from them).
pub fn matches_maps(saved: &Tables, pinned: &Tables) -> bool {
    saved.services == pinned.services
        && saved.forks == pinned.forks
        && saved.workloads == pinned.workloads
        && saved.router == pinned.router
}

/// What start-up made of the stored state.
#[derive(Debug)]
pub enum Restore {
    /// The stored state matches the pinned maps: the router may serve it at once.
    Use(Saved),
    /// Nothing stored (first start, or an agent from before persistence).
    Missing,
    /// Stored but not usable (unreadable, corrupt, another version, or stale): the reason.
    Ignored(String),
}

/// Loads the stored state and checks it against the pinned maps.
pub fn restore(store: &dyn StateStore, pinned: &Tables) -> Restore {
    let bytes = match store.load() {
        Ok(Some(b)) => b,
        Ok(None) => return Restore::Missing,
        Err(e) => return Restore::Ignored(e.to_string()),
    };
    let saved = match decode(&bytes, &store.describe()) {
        Ok(s) => s,
        Err(e) => return Restore::Ignored(e.to_string()),
    };
    if !matches_maps(&saved.tables, pinned) {
        return Restore::Ignored(format!(
            "persisted state {}: differs from what the pinned maps hold (they changed after it \
             was written)",
            store.describe()
        ));
    }
    Restore::Use(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> Saved {
        Saved {
            tables: Tables::sample(),
            pods: vec![("10.200.1.9".parse().unwrap(), "uid-1".into())],
        }
    }

    /// The kernel part of `t` alone, as `RedirectMaps::read` returns it.
    fn kernel_part(t: &Tables) -> Tables {
        Tables {
            services: t.services.clone(),
            forks: t.forks.clone(),
            workloads: t.workloads.clone(),
            router: t.router,
            ..Default::default()
        }
    }

    #[test]
    fn the_tables_with_names_and_keys_round_trip_through_the_document() {
        let s = saved();
        assert_eq!(decode(&encode(&s), "test").unwrap(), s);
    }

    #[test]
    fn a_state_that_matches_the_pinned_maps_is_used_with_its_names() {
        let store = MemoryState::default();
        store.save(&encode(&saved())).unwrap();
        match restore(&store, &kernel_part(&Tables::sample())) {
            Restore::Use(s) => assert_eq!(s.tables.keys[&3].key, "feature-x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_state_the_maps_moved_away_from_is_ignored_as_stale() {
        let store = MemoryState::default();
        store.save(&encode(&saved())).unwrap();
        let mut pinned = kernel_part(&Tables::sample());
        pinned.forks.clear();
        match restore(&store, &pinned) {
            Restore::Ignored(why) => assert!(why.contains("differs from"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_stored_state_is_an_upgrade_from_an_agent_without_one() {
        let store = MemoryState::default();
        assert!(matches!(
            restore(&store, &Tables::default()),
            Restore::Missing
        ));
    }

    #[test]
    fn a_corrupt_document_is_ignored_with_its_reason() {
        let store = MemoryState::default();
        store.save(b"{\"version\": 1, \"pods\": [tru").unwrap();
        match restore(&store, &Tables::default()) {
            Restore::Ignored(why) => {
                assert!(why.contains("memory: not a valid document"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_document_of_another_version_is_ignored_naming_both_versions() {
        let mut doc: serde_json::Value = serde_json::from_slice(&encode(&saved())).unwrap();
        doc["version"] = 2.into();
        let e = decode(&serde_json::to_vec(&doc).unwrap(), "s").unwrap_err();
        assert_eq!(
            e.to_string(),
            "persisted state s: version 2, this agent reads version 1"
        );
    }

    #[test]
    fn a_truncated_frame_is_reported_not_read_past_its_end() {
        let mut blob = frame(b"{}");
        blob.truncate(9);
        assert!(unframe(&blob).unwrap_err().contains("says 2 bytes"));
        assert_eq!(unframe(&frame(b"{}")).unwrap(), b"{}");
    }

    /// A pin directory on bpffs, or `None` (with a message) when this host has none we may use.
    fn bpffs_dir(name: &str) -> Option<PathBuf> {
        let base = Path::new("/sys/fs/bpf");
        if !crate::loader::is_bpffs(base) {
            eprintln!("skipped: no bpffs at {}", base.display());
            return None;
        }
        let dir = base.join(format!("redirect-unit-{name}-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_err() {
            eprintln!("skipped: cannot create {} (not root?)", dir.display());
            return None;
        }
        Some(dir)
    }

    #[test]
    fn the_pinned_document_is_replaced_whole_and_a_leftover_temporary_pin_never_counts() {
        let Some(dir) = bpffs_dir("atomic") else {
            return;
        };
        let store = PinnedState::new(&dir);
        assert!(store.load().unwrap().is_none(), "nothing pinned yet");
        let first = encode(&saved());
        if let Err(e) = store.save(&first) {
            let _ = std::fs::remove_dir(&dir);
            eprintln!("skipped: cannot create maps here: {e}");
            return;
        }
        // A writer that crashed after pinning its temporary map: readers still see `first`.
        let big = vec![b' '; 3 * CHUNK + 5];
        let fd = sys::array_create("t", CHUNK as u32, 4).unwrap();
        sys::obj_pin(&fd, &dir.join(STATE_PIN_TMP)).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), first);
        // The next write replaces both; a document over several chunks reads back whole.
        let mut second = encode(&saved());
        second.extend_from_slice(&big);
        store.save(&second).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), second);
        assert!(!dir.join(STATE_PIN_TMP).exists());
        let _ = std::fs::remove_file(dir.join(STATE_PIN));
        let _ = std::fs::remove_dir(&dir);
    }
}
