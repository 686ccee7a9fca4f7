//! Names for the ids in the maps (from the agent's `/tables`), and cgroup ids → paths → pods
//! (from a bounded scan of the cgroup2 mount).

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::{
    admin::api::TablesDoc,
    cgroup::{cgroup2_mount, pod_uid_of_cgroup},
    routing::Tables,
};

use super::AdminClient;

/// What the agent knows by name; empty (with `error` set) when its admin API does not answer.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub doc: Option<TablesDoc>,
    /// Names (and the routing keys) from the agent, as `Tables`.
    pub tables: Tables,
    /// Why there are no names.
    pub error: Option<String>,
}

impl Names {
    pub fn fetch(admin: &AdminClient) -> Self {
        match admin.tables() {
            Ok(doc) => Names {
                tables: doc.to_tables(),
                doc: Some(doc),
                error: None,
            },
            Err(e) => Names {
                error: Some(e),
                ..Default::default()
            },
        }
    }

    pub fn reachable(&self) -> bool {
        self.doc.is_some()
    }

    /// `namespace/name:port` of a service port id.
    pub fn service(&self, id: u32) -> Option<String> {
        self.tables.service_names.get(&id).map(|n| n.to_string())
    }

    /// What a service port id declares (`http` or `detect`), when the agent knows the port.
    pub fn protocol(&self, id: u32) -> Option<String> {
        self.tables.service_names.get(&id)?;
        let p = self.tables.service_protocols.get(&id).copied();
        Some(p.unwrap_or_default().to_string())
    }

    /// The routing key of a key id.
    pub fn key(&self, id: u32) -> Option<String> {
        self.tables.keys.get(&id).map(|k| k.key.clone())
    }

    /// `namespace/name` of a pod uid.
    pub fn pod(&self, uid: &str) -> Option<String> {
        self.doc
            .as_ref()?
            .pods
            .iter()
            .find(|p| p.uid == uid)
            .map(|p| format!("{}/{}", p.namespace, p.name))
    }

    /// The uid of a pod named `namespace/name` (or `name` in `default`).
    pub fn pod_uid(&self, name: &str) -> Option<String> {
        let (ns, n) = name.split_once('/').unwrap_or(("default", name));
        self.doc
            .as_ref()?
            .pods
            .iter()
            .find(|p| p.namespace == ns && p.name == n)
            .map(|p| p.uid.clone())
    }

    /// Service ids whose name matches `s` (`ns/name:port`, `ns/name`, or `name`).
    pub fn service_ids(&self, s: &str) -> Vec<u32> {
        self.tables
            .service_names
            .iter()
            .filter(|(_, n)| {
                let full = n.to_string();
                let ns_name = format!("{}/{}", n.namespace, n.name);
                s == full || s == ns_name || s == n.name
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Key ids whose routing key or owning sandbox (`ns/name` or `name`) is `s`.
    pub fn key_ids(&self, s: &str) -> Vec<u32> {
        self.tables
            .keys
            .iter()
            .filter(|(_, k)| {
                k.key == s
                    || k.owners
                        .iter()
                        .any(|o| o == s || o.split_once('/').is_some_and(|(_, n)| n == s))
            })
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Most directory entries one cgroup scan looks at.
pub const MAX_SCAN_ENTRIES: usize = 200_000;
/// Deepest level below the cgroup2 mount a scan descends to.
pub const MAX_SCAN_DEPTH: usize = 16;

/// cgroup ids (inode numbers) → paths, from one bounded scan of the cgroup2 mount.
#[derive(Clone, Debug, Default)]
pub struct CgroupIndex {
    pub mount: Option<PathBuf>,
    paths: HashMap<u64, PathBuf>,
    /// The scan stopped at its entry limit: some cgroups are missing.
    pub truncated: bool,
}

impl CgroupIndex {
    /// Scans the cgroup2 mount of this process's mount namespace.
    pub fn scan() -> Self {
        let Ok(Some(mount)) = cgroup2_mount() else {
            return CgroupIndex::default();
        };
        Self::scan_at(&mount)
    }

    pub fn scan_at(mount: &Path) -> Self {
        let mut idx = CgroupIndex {
            mount: Some(mount.to_path_buf()),
            ..Default::default()
        };
        if let Ok(m) = fs::metadata(mount) {
            idx.paths.insert(m.ino(), mount.to_path_buf());
        }
        let mut budget = MAX_SCAN_ENTRIES;
        let mut stack = vec![(mount.to_path_buf(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if budget == 0 {
                    idx.truncated = true;
                    return idx;
                }
                budget -= 1;
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if let Ok(m) = e.metadata() {
                    idx.paths.insert(m.ino(), e.path());
                }
                if depth + 1 < MAX_SCAN_DEPTH {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        idx
    }

    pub fn path(&self, id: u64) -> Option<&Path> {
        self.paths.get(&id).map(PathBuf::as_path)
    }

    /// The pod cgroup directory of a pod uid.
    pub fn pod_cgroup(&self, uid: &str) -> Option<&Path> {
        self.paths
            .values()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(pod_uid_of_cgroup)
                    .is_some_and(|u| u == uid)
            })
            .map(PathBuf::as_path)
    }
}

/// The pod uid a cgroup path belongs to (the nearest `pod<uid>` component, from the leaf up).
pub fn pod_uid_of_path(path: &Path) -> Option<String> {
    path.ancestors()
        .filter_map(|p| p.file_name()?.to_str())
        .find_map(pod_uid_of_cgroup)
}

/// cgroup ids from the root of the hierarchy (level 0) down to `dir`, as
/// `bpf_get_current_ancestor_cgroup_id` walks them.
pub fn ancestors(mount: &Path, dir: &Path) -> std::io::Result<Vec<u64>> {
    let rel = dir.strip_prefix(mount).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not below {}", dir.display(), mount.display()),
        )
    })?;
    let mut ids = vec![fs::metadata(mount)?.ino()];
    let mut cur = mount.to_path_buf();
    for part in rel.components() {
        cur.push(part);
        ids.push(fs::metadata(&cur)?.ino());
    }
    Ok(ids)
}

/// A caller, named as well as possible: `pod default/client`, else the cgroup path, else the id.
pub fn describe_cgroup(id: u64, idx: &CgroupIndex, names: &Names) -> (Option<String>, String) {
    let Some(path) = idx.path(id) else {
        return (None, format!("cgroup {id}"));
    };
    let label = match pod_uid_of_path(path) {
        Some(uid) => match names.pod(&uid) {
            Some(p) => format!("pod {p}"),
            None => format!("pod uid {uid}"),
        },
        None => path.display().to_string(),
    };
    (Some(path.display().to_string()), label)
}
