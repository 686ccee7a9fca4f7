//! `diff(current, desired) -> Ops` and `apply(ops, maps)`: the smallest set of map writes that
//! turns the kernel-facing part of one `Tables` into another, in an order that never misroutes.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use redirect_common::{
    ForkEndpoints, ForkKey, RouterConfig, ServiceValue, SockAddr, WorkloadValue,
};

use super::desired::Touched;
use super::fork_table::key_range;
use super::maps::{MapError, RedirectMaps};
use crate::routing::Tables;

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutService(SockAddr, ServiceValue),
    DelService(SockAddr),
    PutFork(ForkKey, ForkEndpoints),
    DelFork(ForkKey),
    PutWorkload(u64, WorkloadValue),
    DelWorkload(u64),
    SetRouter(RouterConfig),
}

/// The writes that turn `current` into `desired`, comparing only what the kernel sees
/// (services, forks, workloads, router); names are not compared. Nothing for equal entries.
///
/// Order, so that no connection is sent somewhere that does not exist (yet/any more):
/// 1. the router config;
/// 2. puts of forks and workloads (a fork exists before a service can lead to it);
/// 3. puts of services;
/// 4. deletes of services (nothing leads to a fork any more...);
/// 5. deletes of forks and workloads (...before it goes).
pub fn diff(current: &Tables, desired: &Tables) -> Vec<Op> {
    let forks = changes(&current.forks, &desired.forks);
    let services = changes(&current.services, &desired.services);
    ordered(current, desired, forks, services)
}

/// [`diff`] when only the `touched` entries of `forks` and `services` can differ (the rest
/// of both is known to be equal): costs what changed instead of a walk over every entry.
pub fn diff_touched(current: &Tables, desired: &Tables, touched: &Touched) -> Vec<Op> {
    let mut forks = Changes {
        puts: Vec::new(),
        dels: Vec::new(),
    };
    for key_id in &touched.fork_keys {
        let range = || key_range(*key_id);
        let part = changes_in(current.forks.range(range()), desired.forks.range(range()));
        forks.puts.extend(part.puts);
        forks.dels.extend(part.dels);
    }
    let mut services = Changes {
        puts: Vec::new(),
        dels: Vec::new(),
    };
    for addr in &touched.services {
        match (current.services.get(addr), desired.services.get(addr)) {
            (Some(c), Some(d)) if c == d => {}
            (_, Some(d)) => services.puts.push((*addr, *d)),
            (Some(_), None) => services.dels.push(*addr),
            (None, None) => {}
        }
    }
    ordered(current, desired, forks, services)
}

/// The ops of the changes, in the order that never misroutes (see [`diff`]).
fn ordered(
    current: &Tables,
    desired: &Tables,
    forks: Changes<ForkKey, ForkEndpoints>,
    services: Changes<SockAddr, ServiceValue>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    if current.router != desired.router {
        ops.push(Op::SetRouter(desired.router));
    }
    let workloads = changes(&current.workloads, &desired.workloads);
    ops.extend(forks.puts.iter().map(|(k, v)| Op::PutFork(*k, *v)));
    ops.extend(workloads.puts.iter().map(|(k, v)| Op::PutWorkload(*k, *v)));
    ops.extend(services.puts.iter().map(|(k, v)| Op::PutService(*k, *v)));
    ops.extend(services.dels.iter().map(|k| Op::DelService(*k)));
    ops.extend(forks.dels.iter().map(|k| Op::DelFork(*k)));
    ops.extend(workloads.dels.iter().map(|k| Op::DelWorkload(*k)));
    ops
}

/// What differs between two maps: entries to put (new or changed) and keys to delete.
struct Changes<K, V> {
    puts: Vec<(K, V)>,
    dels: Vec<K>,
}

/// One walk over both maps in key order (no lookups: at 10,000s of entries a walk is several
/// times cheaper than a search per entry).
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Changes<K, V> {
    changes_in(current.iter(), desired.iter())
}

/// [`changes`] of two ascending runs of entries.
fn changes_in<'a, K: Ord + Copy + 'a, V: PartialEq + Copy + 'a>(
    current: impl Iterator<Item = (&'a K, &'a V)>,
    desired: impl Iterator<Item = (&'a K, &'a V)>,
) -> Changes<K, V> {
    let mut out = Changes {
        puts: Vec::new(),
        dels: Vec::new(),
    };
    let mut cur = current.peekable();
    let mut want = desired.peekable();
    loop {
        match (cur.peek(), want.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.dels.push(**k);
                cur.next();
            }
            (None, Some((k, v))) => {
                out.puts.push((**k, **v));
                want.next();
            }
            (Some((ck, cv)), Some((wk, wv))) => match ck.cmp(wk) {
                Ordering::Less => {
                    out.dels.push(**ck);
                    cur.next();
                }
                Ordering::Greater => {
                    out.puts.push((**wk, **wv));
                    want.next();
                }
                Ordering::Equal => {
                    if cv != wv {
                        out.puts.push((**wk, **wv));
                    }
                    cur.next();
                    want.next();
                }
            },
        }
    }
    out
}

/// What `apply` did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Ops that succeeded.
    pub applied: usize,
    /// Ops that failed, with why (a full map is one of them, never silent).
    pub failed: Vec<(Op, MapError)>,
}

impl ApplyReport {
    /// Whether every op succeeded.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Applies `ops` in order, going on past failures (each failure fails open: a missing entry
/// means baseline), and reports what failed.
pub fn apply(ops: impl IntoIterator<Item = Op>, maps: &mut dyn RedirectMaps) -> ApplyReport {
    let mut report = ApplyReport::default();
    for op in ops {
        let result = match &op {
            Op::PutService(k, v) => maps.put_service(*k, *v),
            Op::DelService(k) => maps.del_service(k),
            Op::PutFork(k, v) => maps.put_fork(*k, *v),
            Op::DelFork(k) => maps.del_fork(k),
            Op::PutWorkload(k, v) => maps.put_workload(*k, *v),
            Op::DelWorkload(k) => maps.del_workload(*k),
            Op::SetRouter(v) => maps.set_router(*v),
        };
        match result {
            Ok(()) => report.applied += 1,
            Err(e) => report.failed.push((op, e)),
        }
    }
    report
}

/// Reads the maps, and writes what differs from `desired`.
pub fn reconcile(maps: &mut dyn RedirectMaps, desired: &Tables) -> Result<ApplyReport, MapError> {
    let current = maps.read()?;
    Ok(apply(diff(&current, desired), maps))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::routing::{KeyInfo, ServiceName};
    use crate::sync::maps::{MapLimits, MemoryMaps};

    fn addr(last: u8, port: u16) -> SockAddr {
        SockAddr::v4(u32::from_ne_bytes([10, 200, 128, last]), port)
    }

    fn svc(id: u32) -> ServiceValue {
        ServiceValue {
            service_id: id,
            flags: 0,
        }
    }

    fn fork(key_id: u32, service_id: u32) -> ForkKey {
        ForkKey { key_id, service_id }
    }

    fn eps(last: u8) -> ForkEndpoints {
        let mut e = ForkEndpoints {
            count: 1,
            ..Default::default()
        };
        e.endpoints[0] = SockAddr::v4(u32::from_ne_bytes([10, 244, 1, last]), 8080);
        e
    }

    fn wl(key_id: u32) -> WorkloadValue {
        WorkloadValue { key_id, _pad: 0 }
    }

    /// Two services forked by key 1, one pod.
    fn tables() -> Tables {
        let mut t = Tables::default();
        t.services.insert(addr(10, 80), svc(7));
        t.services.insert(addr(11, 80), svc(8));
        t.forks.insert(fork(1, 7), eps(9));
        t.forks.insert(fork(1, 8), eps(8));
        t.workloads.insert(4242, wl(1));
        t.router.v4 = addr(1, 15001);
        t.router.mark = 0x5244;
        t
    }

    #[test]
    fn the_diff_of_equal_tables_is_empty() {
        assert_eq!(diff(&tables(), &tables()), []);
    }

    #[test]
    fn names_are_not_compared() {
        let mut named = tables();
        named.service_names.insert(7, ServiceName::default().into());
        named.keys.insert(1, KeyInfo::default().into());
        assert_eq!(diff(&tables(), &named), []);
    }

    #[test]
    fn only_changed_entries_are_written() {
        let mut d = tables();
        d.forks.insert(fork(1, 7), eps(99));
        assert_eq!(diff(&tables(), &d), [Op::PutFork(fork(1, 7), eps(99))]);
    }

    #[test]
    fn from_empty_forks_and_workloads_come_before_services() {
        let ops = diff(&Tables::default(), &tables());
        let kinds: Vec<_> = ops
            .iter()
            .map(|op| match op {
                Op::SetRouter(_) => "router",
                Op::PutFork(..) | Op::PutWorkload(..) => "target",
                Op::PutService(..) => "service",
                _ => "delete",
            })
            .collect();
        assert_eq!(
            kinds,
            ["router", "target", "target", "target", "service", "service"]
        );
    }

    #[test]
    fn to_empty_services_go_before_forks_and_workloads() {
        let d = Tables {
            router: tables().router,
            ..Default::default()
        };
        let ops = diff(&tables(), &d);
        assert_eq!(
            ops,
            [
                Op::DelService(addr(10, 80)),
                Op::DelService(addr(11, 80)),
                Op::DelFork(fork(1, 7)),
                Op::DelFork(fork(1, 8)),
                Op::DelWorkload(4242),
            ]
        );
    }

    #[test]
    fn diff_then_apply_makes_the_maps_equal_to_desired() {
        let mut maps = MemoryMaps::new();
        let mut start = tables();
        start.forks.insert(fork(2, 7), eps(1));
        start.workloads.insert(99, wl(2));
        start.services.insert(addr(12, 80), svc(9));
        apply(diff(&Tables::default(), &start), &mut maps);
        let mut want = tables();
        want.services.insert(addr(10, 80), svc(70));
        want.forks.insert(fork(3, 70), eps(3));
        want.workloads.insert(4242, wl(3));
        want.router.mark = 1;

        let report = reconcile(&mut maps, &want).unwrap();

        assert!(report.is_complete());
        assert_eq!(maps.read().unwrap(), want);
        assert_eq!(diff(&maps.read().unwrap(), &want), []);
    }

    #[test]
    fn a_full_map_is_reported_and_the_rest_still_applied() {
        let mut maps = MemoryMaps::with_limits(MapLimits {
            services: Some(1),
            ..Default::default()
        });
        let report = apply(diff(&Tables::default(), &tables()), &mut maps);
        assert_eq!(report.applied, 5);
        assert_eq!(report.failed.len(), 1);
        let (op, err) = &report.failed[0];
        assert_eq!(*op, Op::PutService(addr(11, 80), svc(8)));
        assert_eq!(err.metric_label(), "map_full");
        assert_eq!(err.to_string(), "map services_v1 is full (1 entries)");
        assert_eq!(
            maps.read().unwrap().services,
            BTreeMap::from([(addr(10, 80), svc(7))])
        );
    }
}
