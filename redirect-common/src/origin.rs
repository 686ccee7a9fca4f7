//! Who is calling: the caller's fork pod and routing key, found by walking the caller's cgroup
//! ancestors through `workloads_v1`, and cached per task cgroup in `origin_cache_v1`.
//!
//! The walk costs one helper call and one hash lookup per cgroup level on every `connect()` to a
//! forked service. Its answer depends only on the caller's cgroup (whose ancestry never changes:
//! cgroup v2 cannot move a cgroup to another parent, and cgroup ids are never reused) and on
//! `workloads_v1`. So it is cached by cgroup id, "not a fork pod" included (most callers of a
//! forked service are baseline pods), and every entry carries the *generation* of
//! `workloads_v1` it was computed from (`origin_gen_v1`, one counter).
//!
//! Ordering that never serves a stale key:
//! - the agent writes `workloads_v1`, *then* increments the generation;
//! - the program reads the generation *before* it walks, and tags what it caches with it;
//! - an entry is used only when its generation equals the current one.
//!
//! An entry computed from a `workloads_v1` that predates a write therefore carries a generation
//! read before the increment that follows that write: from the increment on, it is a miss. The
//! two agent writes are separate syscalls, each a full barrier, microseconds apart.
//!
//! LRU maps recycle an evicted element at once, even while another CPU still reads it, so a read
//! can in principle see half of one entry and half of another. Each entry carries its own key and
//! a check word over every field: a mixed read fails the check and counts as a miss.

use core::mem::size_of;

use crate::MAX_CGROUP_LEVELS;

/// `OriginCacheEntry::is_fork`: the cgroup belongs to a fork pod.
pub const ORIGIN_FORK_POD: u32 = 1;
/// `OriginCacheEntry::is_fork`: the cgroup belongs to no fork pod (negative entry).
pub const ORIGIN_NOT_FORK_POD: u32 = 0;

/// Value of `origin_cache_v1`, keyed by the connecting task's cgroup id
/// (`bpf_get_current_cgroup_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginCacheEntry {
    /// `origin_gen_v1` read before the walk that produced this entry.
    pub generation: u64,
    /// The key of this entry, repeated (a recycled element shows another one).
    pub cgroup_id: u64,
    /// The fork pod's cgroup found by the walk; 0 in a negative entry.
    pub pod_cgroup_id: u64,
    /// Routing key of the fork pod's sandbox; 0 in a negative entry.
    pub key_id: u32,
    /// `ORIGIN_FORK_POD` or `ORIGIN_NOT_FORK_POD`.
    pub is_fork: u32,
    /// [`OriginCacheEntry::check_of`] the fields above.
    pub check: u64,
}
const _: () = assert!(size_of::<OriginCacheEntry>() == 40);

/// A 64-bit mix (the SplitMix64 finaliser): every input bit affects every output bit.
#[inline(always)]
pub(crate) const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl OriginCacheEntry {
    /// The entry recording what a walk found for `cgroup_id` at `generation`: the fork pod's
    /// cgroup and key, or `(0, 0)` (see [`walk`]).
    #[inline(always)]
    pub fn new(cgroup_id: u64, generation: u64, (pod_cgroup_id, key_id): (u64, u32)) -> Self {
        let is_fork = if pod_cgroup_id != 0 {
            ORIGIN_FORK_POD
        } else {
            ORIGIN_NOT_FORK_POD
        };
        let mut e = OriginCacheEntry {
            generation,
            cgroup_id,
            pod_cgroup_id,
            key_id,
            is_fork,
            check: 0,
        };
        e.check = e.check_of();
        e
    }

    /// The check word over every other field.
    #[inline(always)]
    pub const fn check_of(&self) -> u64 {
        let mut h = mix(self.generation ^ 0x7265_6469_7265_6374);
        h = mix(h ^ self.cgroup_id);
        h = mix(h ^ self.pod_cgroup_id);
        mix(h ^ (((self.key_id as u64) << 32) | self.is_fork as u64))
    }

    /// What this entry says about `cgroup_id` at `generation`: `None` when it cannot be used
    /// (another generation, another cgroup, or a torn read), else the walk's answer.
    #[inline(always)]
    pub fn answer(&self, cgroup_id: u64, generation: u64) -> Option<Option<(u64, u32)>> {
        if self.generation != generation
            || self.cgroup_id != cgroup_id
            || self.check != self.check_of()
        {
            return None;
        }
        Some(match self.is_fork {
            ORIGIN_FORK_POD => Some((self.pod_cgroup_id, self.key_id)),
            _ => None,
        })
    }
}

/// What finding the caller needs, in the kernel (helpers and maps) or in a test.
pub trait OriginLookups {
    /// The current generation of `workloads_v1` (`origin_gen_v1[0]`).
    fn generation(&self) -> u64;
    /// A copy of the cached entry for the task cgroup `cgroup_id`, if any.
    fn cached(&self, cgroup_id: u64) -> Option<OriginCacheEntry>;
    /// The caller's cgroup ancestor at `level` (0 is the root); 0 past the caller's own level.
    fn ancestor(&self, level: i32) -> u64;
    /// The routing key of the fork pod whose cgroup id this is, if it is one (`workloads_v1`).
    fn workload_key(&self, cgroup_id: u64) -> Option<u32>;
    /// Caches `entry` for `cgroup_id` (best effort: a failed insert only costs a walk later).
    fn remember(&self, cgroup_id: u64, entry: &OriginCacheEntry);
}

/// The pod cgroup and routing key of the caller in task cgroup `cgroup_id`, when the caller runs
/// in a fork pod: the first cgroup ancestor (from the root down) found in `workloads_v1`. Served
/// from the cache when it holds an entry of the current generation, else walked and cached.
#[inline(always)]
pub fn caller_key<L: OriginLookups>(l: &L, cgroup_id: u64) -> Option<(u64, u32)> {
    // Read before the walk: see the module documentation for why the order matters.
    let generation = l.generation();
    if let Some(entry) = l.cached(cgroup_id)
        && let Some(answer) = entry.answer(cgroup_id, generation)
    {
        return answer;
    }
    let found = walk(l);
    l.remember(
        cgroup_id,
        &OriginCacheEntry::new(cgroup_id, generation, found),
    );
    if found.0 != 0 { Some(found) } else { None }
}

/// The uncached walk over at most `MAX_CGROUP_LEVELS` ancestors: the fork pod's cgroup id and
/// routing key, or `(0, 0)` for a caller in no fork pod (no cgroup has id 0). Plain integers
/// rather than an `Option`: every path then defines every value that goes into the cache entry
/// (the verifier rejects reading a register the compiler left undefined in a `None`).
#[inline(always)]
pub fn walk<L: OriginLookups>(l: &L) -> (u64, u32) {
    for level in 0..MAX_CGROUP_LEVELS {
        let id = l.ancestor(level);
        if id == 0 {
            return (0, 0);
        }
        if let Some(key_id) = l.workload_key(id) {
            return (id, key_id);
        }
    }
    (0, 0)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::cell::{Cell, RefCell};
    use std::{collections::BTreeMap, vec::Vec};

    use super::*;

    /// A node as the program sees it: one caller's ancestry, `workloads_v1`, the cache and the
    /// generation, with the agent's write order as methods.
    #[derive(Default)]
    struct Node {
        ancestors: Vec<u64>,
        workloads: RefCell<BTreeMap<u64, u32>>,
        cache: RefCell<BTreeMap<u64, OriginCacheEntry>>,
        generation: Cell<u64>,
        walks: Cell<u32>,
    }

    impl OriginLookups for Node {
        fn generation(&self) -> u64 {
            self.generation.get()
        }
        fn cached(&self, cgroup_id: u64) -> Option<OriginCacheEntry> {
            self.cache.borrow().get(&cgroup_id).copied()
        }
        fn ancestor(&self, level: i32) -> u64 {
            if level == 0 {
                self.walks.set(self.walks.get() + 1);
            }
            self.ancestors.get(level as usize).copied().unwrap_or(0)
        }
        fn workload_key(&self, cgroup_id: u64) -> Option<u32> {
            self.workloads.borrow().get(&cgroup_id).copied()
        }
        fn remember(&self, cgroup_id: u64, entry: &OriginCacheEntry) {
            self.cache.borrow_mut().insert(cgroup_id, *entry);
        }
    }

    const ROOT: u64 = 1;
    const POD: u64 = 40;
    const CONTAINER: u64 = 41;

    impl Node {
        fn with_caller() -> Node {
            Node {
                ancestors: std::vec![ROOT, 20, 30, POD, CONTAINER],
                ..Default::default()
            }
        }
        /// What the agent does: the map write, then the generation.
        fn agent_put(&self, pod: u64, key: u32) {
            self.workloads.borrow_mut().insert(pod, key);
            self.generation.set(self.generation.get() + 1);
        }
        fn agent_del(&self, pod: u64) {
            self.workloads.borrow_mut().remove(&pod);
            self.generation.set(self.generation.get() + 1);
        }
    }

    #[test]
    fn a_fork_pod_is_found_once_then_served_from_the_cache() {
        let n = Node::with_caller();
        n.agent_put(POD, 7);
        assert_eq!(caller_key(&n, CONTAINER), Some((POD, 7)));
        assert_eq!(caller_key(&n, CONTAINER), Some((POD, 7)));
        assert_eq!(n.walks.get(), 1);
    }

    #[test]
    fn a_baseline_caller_is_cached_as_not_a_fork_pod() {
        let n = Node::with_caller();
        assert_eq!(caller_key(&n, CONTAINER), None);
        assert_eq!(caller_key(&n, CONTAINER), None);
        assert_eq!(n.walks.get(), 1);
        assert_eq!(n.cache.borrow()[&CONTAINER].is_fork, ORIGIN_NOT_FORK_POD);
    }

    #[test]
    fn removing_or_changing_a_workload_invalidates_what_was_cached() {
        let n = Node::with_caller();
        n.agent_put(POD, 7);
        assert_eq!(caller_key(&n, CONTAINER), Some((POD, 7)));
        n.agent_put(POD, 8);
        assert_eq!(caller_key(&n, CONTAINER), Some((POD, 8)));
        n.agent_del(POD);
        assert_eq!(caller_key(&n, CONTAINER), None);
        n.agent_put(POD, 9);
        assert_eq!(caller_key(&n, CONTAINER), Some((POD, 9)));
        assert_eq!(n.walks.get(), 4);
    }

    #[test]
    fn a_walk_that_raced_with_a_removal_caches_an_entry_that_is_never_served() {
        // The program reads the generation, then the agent removes the workload and bumps the
        // generation while the program still walks the old map: the program caches the old key
        // under the old generation.
        let n = Node::with_caller();
        n.agent_put(POD, 7);
        let stale_generation = n.generation();
        let stale = OriginCacheEntry::new(CONTAINER, stale_generation, walk(&n));
        assert_eq!(stale.is_fork, ORIGIN_FORK_POD);
        n.agent_del(POD);
        n.remember(CONTAINER, &stale);
        assert_eq!(caller_key(&n, CONTAINER), None);
    }

    #[test]
    fn an_entry_of_another_cgroup_or_a_torn_entry_is_a_miss() {
        let e = OriginCacheEntry::new(CONTAINER, 3, (POD, 7));
        assert_eq!(e.answer(CONTAINER, 3), Some(Some((POD, 7))));
        assert_eq!(e.answer(CONTAINER, 4), None);
        assert_eq!(e.answer(99, 3), None);
        let other = OriginCacheEntry::new(99, 3, (98, 5));
        for torn in [
            OriginCacheEntry {
                key_id: other.key_id,
                ..e
            },
            OriginCacheEntry {
                pod_cgroup_id: other.pod_cgroup_id,
                ..e
            },
            OriginCacheEntry {
                is_fork: ORIGIN_NOT_FORK_POD,
                ..e
            },
            OriginCacheEntry {
                check: other.check,
                ..e
            },
        ] {
            assert_eq!(torn.answer(CONTAINER, 3), None, "{torn:?}");
        }
    }

    #[test]
    fn the_walk_stops_at_the_callers_own_level_and_after_the_bound() {
        let n = Node::with_caller();
        assert_eq!(walk(&n), (0, 0));
        let deep = Node {
            ancestors: (1..=(MAX_CGROUP_LEVELS as u64 + 2)).collect(),
            ..Default::default()
        };
        deep.agent_put(MAX_CGROUP_LEVELS as u64 + 1, 3);
        assert_eq!(walk(&deep), (0, 0));
        deep.agent_put(MAX_CGROUP_LEVELS as u64, 4);
        assert_eq!(walk(&deep), (MAX_CGROUP_LEVELS as u64, 4));
    }
}
