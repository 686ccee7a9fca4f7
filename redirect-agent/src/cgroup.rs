//! Where the cgroup v2 hierarchy is mounted, and which cgroup belongs to which pod.
//!
//! The kernel identifies a fork pod by its pod-level cgroup id (the inode of the pod's cgroup
//! directory). Kubelet names that directory after the pod UID:
//! - cgroupfs driver (containerd, CRI-O): `kubepods/burstable/pod<uid>`;
//! - systemd driver: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
//!   '-' as '_'>.slice`.
//!
//! The depth differs between distributions (kind nests the node's hierarchy one level deeper),
//! so [`PodCgroups`] scans for the name instead of building the path.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Finds a pod's cgroup id from its UID.
pub trait CgroupResolver {
    /// The pod's cgroup id, or None when the pod has no cgroup on this node (yet).
    fn cgroup_id(&mut self, pod_uid: &str) -> Option<u64>;
}

/// A fixed table, for tests and for callers that resolve cgroups elsewhere.
impl CgroupResolver for HashMap<String, u64> {
    fn cgroup_id(&mut self, pod_uid: &str) -> Option<u64> {
        self.get(pod_uid).copied()
    }
}

/// A fixed table, for tests and for callers that resolve cgroups elsewhere.
impl CgroupResolver for std::collections::BTreeMap<String, u64> {
    fn cgroup_id(&mut self, pod_uid: &str) -> Option<u64> {
        self.get(pod_uid).copied()
    }
}

/// The cgroup v2 mount point in `/proc/self/mountinfo` text: on unified hosts
/// `/sys/fs/cgroup`, on hybrid hosts `/sys/fs/cgroup/unified`. When there are several, the one
/// that shows the whole hierarchy (root `/`) wins, then the first.
pub fn discover_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = left.split_whitespace();
        let (Some(root), Some(mount_point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
        if root == "/" {
            return Some(mount_point);
        }
        fallback.get_or_insert(mount_point);
    }
    fallback
}

/// The cgroup v2 mount point of this process's mount namespace.
pub fn cgroup2_mount() -> io::Result<Option<PathBuf>> {
    Ok(discover_cgroup2_mount(&fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pod UID a kubelet cgroup directory name stands for (normalised to the API's form with
/// dashes), or None if the name is not a pod cgroup.
pub fn pod_uid_of_cgroup(name: &str) -> Option<String> {
    let uid = if let Some(slice) = name.strip_suffix(".slice") {
        // systemd: kubepods[-qos]-pod<uid_with_underscores>.slice
        let (_, uid) = slice.rsplit_once("-pod")?;
        uid.replace('_', "-")
    } else {
        // cgroupfs: pod<uid>
        name.strip_prefix("pod")?.to_string()
    };
    let plausible = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-');
    plausible.then_some(uid)
}

/// Resolves pod UIDs to cgroup ids by scanning the cgroup tree under `root`, with a cache.
///
/// One scan indexes every pod cgroup it meets, so a sync with many new pods costs one scan.
/// Scans are bounded in depth and entries, and a miss triggers at most one scan per
/// `rescan_interval` (a pod whose cgroup does not exist yet is retried on a later sync).
#[derive(Debug)]
pub struct PodCgroups {
    root: PathBuf,
    max_depth: usize,
    max_entries: usize,
    rescan_interval: Duration,
    last_scan: Option<Instant>,
    cache: HashMap<String, u64>,
}

impl PodCgroups {
    /// Deepest directory level (below `root`) searched.
    pub const MAX_DEPTH: usize = 8;
    /// Most directory entries looked at in one scan.
    pub const MAX_ENTRIES: usize = 200_000;
    /// Minimum time between two scans caused by misses.
    pub const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

    /// A resolver over the cgroup hierarchy mounted at `root` (the cgroup2 mount, or the
    /// subtree the pods live in).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PodCgroups {
            root: root.into(),
            max_depth: Self::MAX_DEPTH,
            max_entries: Self::MAX_ENTRIES,
            rescan_interval: Self::RESCAN_INTERVAL,
            last_scan: None,
            cache: HashMap::new(),
        }
    }

    /// Changes the minimum time between two scans caused by misses.
    pub fn with_rescan_interval(mut self, interval: Duration) -> Self {
        self.rescan_interval = interval;
        self
    }

    /// Changes the scan bounds.
    pub fn with_limits(mut self, max_depth: usize, max_entries: usize) -> Self {
        self.max_depth = max_depth;
        self.max_entries = max_entries;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Forgets pods for which `keep` is false (call with the pods still known).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.cache.retain(|uid, _| keep(uid));
    }

    /// The cached id of a pod, without scanning.
    pub fn cached(&self, pod_uid: &str) -> Option<u64> {
        self.cache.get(pod_uid).copied()
    }

    /// Scans the tree now and indexes every pod cgroup found; returns how many were found.
    pub fn rescan(&mut self) -> usize {
        self.last_scan = Some(Instant::now());
        let mut found = 0;
        let mut budget = self.max_entries;
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if budget == 0 {
                    tracing::warn!(root = %self.root.display(), max_entries = self.max_entries,
                        "cgroup scan stopped at its entry limit");
                    return found;
                }
                budget -= 1;
                // Directory entries of cgroupfs are cgroups; symlinks are not followed.
                let Ok(ft) = entry.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let name = entry.file_name();
                let path = entry.path();
                if let Some(uid) = name.to_str().and_then(pod_uid_of_cgroup) {
                    if let Ok(meta) = entry.metadata() {
                        self.cache.insert(uid, meta.ino());
                        found += 1;
                    }
                    // Containers live below the pod; nothing more to find there.
                    continue;
                }
                if depth + 1 < self.max_depth {
                    stack.push((path, depth + 1));
                }
            }
        }
        found
    }
}

impl CgroupResolver for PodCgroups {
    fn cgroup_id(&mut self, pod_uid: &str) -> Option<u64> {
        if let Some(id) = self.cached(pod_uid) {
            return Some(id);
        }
        let due = self
            .last_scan
            .is_none_or(|t| t.elapsed() >= self.rescan_interval);
        if due {
            self.rescan();
        }
        self.cached(pod_uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIFIED: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 1 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 25 0:27 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:10 - bpf bpf rw,mode=700
";

    const HYBRID: &str = "\
25 1 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
";

    #[test]
    fn cgroup2_mount_is_found_on_a_unified_host() {
        assert_eq!(
            discover_cgroup2_mount(UNIFIED),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn cgroup2_mount_is_found_on_a_hybrid_host() {
        assert_eq!(
            discover_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn cgroup2_mount_prefers_the_whole_hierarchy_and_unescapes_spaces() {
        let text = "\
40 25 0:26 /kubepods /mnt/partial rw shared:9 - cgroup2 cgroup2 rw
41 25 0:26 / /mnt/with\\040space rw shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            discover_cgroup2_mount(text),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn no_cgroup2_mount_on_a_v1_only_host() {
        let v1_only: String = HYBRID.lines().filter(|l| !l.contains("cgroup2")).collect();
        assert_eq!(discover_cgroup2_mount(&v1_only), None);
    }

    #[test]
    fn pod_uids_are_read_from_both_driver_layouts() {
        let uid = "0f5c6a8e-1b2c-4d3e-9f00-123456789abc";
        assert_eq!(
            pod_uid_of_cgroup(&format!("pod{uid}")).as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid_of_cgroup("kubepods-burstable-pod0f5c6a8e_1b2c_4d3e_9f00_123456789abc.slice")
                .as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid_of_cgroup("kubepods-pod0f5c6a8e_1b2c_4d3e_9f00_123456789abc.slice").as_deref(),
            Some(uid)
        );
        for not_a_pod in [
            "kubepods",
            "kubepods.slice",
            "kubepods-burstable.slice",
            "pods",
            "system.slice",
        ] {
            assert_eq!(pod_uid_of_cgroup(not_a_pod), None, "{not_a_pod}");
        }
    }

    fn ino(p: &Path) -> u64 {
        fs::metadata(p).unwrap().ino()
    }

    #[test]
    fn pod_cgroup_is_found_with_the_cgroupfs_driver() {
        let root = tempfile::tempdir().unwrap();
        let pod = root
            .path()
            .join("kubelet/kubepods/burstable/pod11111111-2222-3333-4444-555555555555");
        fs::create_dir_all(pod.join("ctr-abc")).unwrap();
        let mut cg = PodCgroups::new(root.path());
        assert_eq!(
            cg.cgroup_id("11111111-2222-3333-4444-555555555555"),
            Some(ino(&pod))
        );
    }

    #[test]
    fn pod_cgroup_is_found_with_the_systemd_driver() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice",
        );
        fs::create_dir_all(pod.join("cri-containerd-abc.scope")).unwrap();
        let mut cg = PodCgroups::new(root.path());
        assert_eq!(
            cg.cgroup_id("11111111-2222-3333-4444-555555555555"),
            Some(ino(&pod))
        );
    }

    #[test]
    fn pod_cgroups_deeper_than_the_limit_are_not_found() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c/d/e/f/g/h/podaaaa");
        fs::create_dir_all(&deep).unwrap();
        let mut cg = PodCgroups::new(root.path()).with_rescan_interval(Duration::ZERO);
        assert_eq!(cg.cgroup_id("aaaa"), None);
        let shallow = root.path().join("a/b/c/d/e/f/g/podbbbb");
        fs::create_dir_all(&shallow).unwrap();
        assert_eq!(cg.cgroup_id("bbbb"), Some(ino(&shallow)));
    }

    #[test]
    fn a_pod_whose_cgroup_appears_later_is_found_on_a_later_scan() {
        let root = tempfile::tempdir().unwrap();
        let mut cg = PodCgroups::new(root.path()).with_rescan_interval(Duration::ZERO);
        assert_eq!(cg.cgroup_id("cafe"), None);
        let pod = root.path().join("kubepods/podcafe");
        fs::create_dir_all(&pod).unwrap();
        assert_eq!(cg.cgroup_id("cafe"), Some(ino(&pod)));
    }

    #[test]
    fn misses_do_not_rescan_before_the_interval() {
        let root = tempfile::tempdir().unwrap();
        let mut cg = PodCgroups::new(root.path()).with_rescan_interval(Duration::from_secs(3600));
        assert_eq!(cg.cgroup_id("cafe"), None);
        fs::create_dir_all(root.path().join("kubepods/podcafe")).unwrap();
        assert_eq!(cg.cgroup_id("cafe"), None);
    }

    #[test]
    fn results_are_cached_until_forgotten() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods/podbeef");
        fs::create_dir_all(&pod).unwrap();
        let mut cg = PodCgroups::new(root.path()).with_rescan_interval(Duration::from_secs(3600));
        let id = cg.cgroup_id("beef");
        fs::remove_dir(&pod).unwrap();
        assert_eq!(cg.cgroup_id("beef"), id);
        cg.retain(|_| false);
        assert_eq!(cg.cached("beef"), None);
    }

    #[test]
    fn one_scan_indexes_every_pod() {
        let root = tempfile::tempdir().unwrap();
        for uid in ["aa", "bb", "cc"] {
            fs::create_dir_all(root.path().join(format!("kubepods/besteffort/pod{uid}"))).unwrap();
        }
        let mut cg = PodCgroups::new(root.path());
        assert!(cg.cgroup_id("aa").is_some());
        assert!(cg.cached("bb").is_some() && cg.cached("cc").is_some());
    }

    #[test]
    fn scan_stops_at_its_entry_limit() {
        let root = tempfile::tempdir().unwrap();
        for i in 0..10 {
            fs::create_dir_all(root.path().join(format!("noise{i}"))).unwrap();
        }
        let mut cg = PodCgroups::new(root.path()).with_limits(8, 5);
        assert_eq!(cg.rescan(), 0);
    }
}
