//! The decision the `connect4`/`connect6` programs make (`redirect_common::connect::decide`),
//! run over `Tables`: the same function, with the caller found by the same walk
//! (`redirect_common::origin::walk`) over the ancestry given. The end-to-end tests check it
//! against the kernel on real connections; `redirectctl explain` narrates its steps.

pub use redirect_common::connect::Decision as ConnectDecision;
use redirect_common::{
    ForkEndpoints, ForkKey, RouterConfig, SockAddr,
    connect::{ConnectEnv, Steps, decide, nth_candidate},
    origin::{self, OriginLookups},
};

use super::Tables;

/// What the kernel sees at `connect()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectInput {
    /// Destination the caller asked for.
    pub dst: SockAddr,
    /// Whether the socket is TCP (the programs decide nothing else).
    pub tcp: bool,
    /// The caller's cgroup ancestry, root (level 0) first, as the kernel walks it.
    pub ancestors: Vec<u64>,
    /// The socket's `SO_MARK`.
    pub mark: u32,
    /// Whether the router's listener for this family is in the liveness sockmap.
    pub router_alive: bool,
    /// Which fork endpoint to pick when there are several (the kernel uses a random number).
    pub pick: u32,
}

/// Decides what `connect()` to `input.dst` does, as the programs do.
pub fn at_connect(t: &Tables, input: &ConnectInput) -> ConnectDecision {
    at_connect_observed(t, input, &mut ())
}

/// [`at_connect`], reporting each step to `steps`.
pub fn at_connect_observed(
    t: &Tables,
    input: &ConnectInput,
    steps: &mut impl Steps,
) -> ConnectDecision {
    decide(&OverTables { t, input }, steps)
}

/// The decision's view of `Tables` and one caller.
struct OverTables<'a> {
    t: &'a Tables,
    input: &'a ConnectInput,
}

impl ConnectEnv for OverTables<'_> {
    fn tcp_destination(&self) -> Option<SockAddr> {
        self.input.tcp.then_some(self.input.dst)
    }

    fn service(&self, dst: &SockAddr) -> Option<u32> {
        self.t.services.get(dst).map(|s| s.service_id)
    }

    fn router(&self) -> Option<&RouterConfig> {
        Some(&self.t.router)
    }

    fn socket_mark(&self) -> u32 {
        self.input.mark
    }

    fn caller(&self) -> Option<(u64, u32)> {
        let (cgroup, key_id) = origin::walk(self);
        (cgroup != 0).then_some((cgroup, key_id))
    }

    fn fork(&self, key: &ForkKey) -> Option<&ForkEndpoints> {
        self.t.forks.get(key)
    }

    fn pick(&self, start: usize, n: usize) -> usize {
        nth_candidate(start, n, self.input.pick)
    }

    fn router_alive(&self, _slot: u32) -> bool {
        self.input.router_alive
    }

    fn remember(&self, _: &SockAddr, _: &SockAddr, _: u32, _to_router: bool) -> bool {
        true
    }
}

/// The uncached walk only: a model has no cache to consult.
impl OriginLookups for OverTables<'_> {
    fn generation(&self) -> u64 {
        0
    }

    fn cached(&self, _cgroup_id: u64) -> Option<redirect_common::OriginCacheEntry> {
        None
    }

    fn ancestor(&self, level: i32) -> u64 {
        self.input
            .ancestors
            .get(level as usize)
            .copied()
            .unwrap_or(0)
    }

    fn workload_key(&self, cgroup_id: u64) -> Option<u32> {
        self.t.workloads.get(&cgroup_id).map(|w| w.key_id)
    }

    fn remember(&self, _cgroup_id: u64, _entry: &redirect_common::OriginCacheEntry) {}
}

#[cfg(test)]
mod tests {
    use redirect_common::{Reason, ServiceValue, WorkloadValue};

    use super::*;

    fn v4(a: [u8; 4], port: u16) -> SockAddr {
        SockAddr::v4(u32::from_ne_bytes(a), port)
    }

    const VIP: [u8; 4] = [10, 200, 128, 1];
    const FORK_EP: [u8; 4] = [10, 200, 1, 9];
    const FORK_POD_CG: u64 = 4242;

    fn scene() -> Tables {
        let mut t = Tables::default();
        t.services.insert(
            v4(VIP, 80),
            ServiceValue {
                service_id: 7,
                flags: 0,
            },
        );
        let fork6 = SockAddr::v6([u32::from_ne_bytes([0xfd, 0, 2, 0]), 0, 0, 5], 8080);
        let (eps, _) = ForkEndpoints::from_endpoints(&[fork6, v4(FORK_EP, 8080)]);
        t.forks.insert(
            ForkKey {
                key_id: 3,
                service_id: 7,
            },
            eps,
        );
        t.workloads
            .insert(FORK_POD_CG, WorkloadValue { key_id: 3, _pad: 0 });
        t.router = RouterConfig {
            v4: v4([10, 200, 0, 1], 15001),
            mark: 0x5244,
            ..Default::default()
        };
        t
    }

    fn input(dst: SockAddr, ancestors: &[u64]) -> ConnectInput {
        ConnectInput {
            dst,
            tcp: true,
            ancestors: ancestors.to_vec(),
            mark: 0,
            router_alive: true,
            pick: 0,
        }
    }

    #[test]
    fn destination_that_is_not_forked_is_untouched() {
        let d = at_connect(
            &scene(),
            &input(v4([10, 200, 128, 2], 80), &[1, FORK_POD_CG]),
        );
        assert_eq!(d.reason, Reason::NotForked);
        assert_eq!(d.rewrite.get(), None);
    }

    #[test]
    fn fork_pod_calling_forked_service_goes_to_fork_endpoint() {
        let d = at_connect(&scene(), &input(v4(VIP, 80), &[1, 20, FORK_POD_CG, 99]));
        assert_eq!(d.reason, Reason::OriginFork);
        assert_eq!(d.rewrite.get(), Some(v4(FORK_EP, 8080)));
        assert_eq!(d.workload.get(), Some((FORK_POD_CG, 3)));
    }

    #[test]
    fn fork_pod_of_other_sandbox_stays_on_baseline() {
        let mut t = scene();
        t.workloads
            .insert(555, WorkloadValue { key_id: 4, _pad: 0 });
        let d = at_connect(&t, &input(v4(VIP, 80), &[1, 555]));
        assert_eq!(d.reason, Reason::OriginBaseline);
        assert_eq!(d.rewrite.get(), None);
    }

    #[test]
    fn baseline_pod_goes_to_router_when_alive_and_fails_open_when_not() {
        let t = scene();
        let d = at_connect(&t, &input(v4(VIP, 80), &[1, 2]));
        assert_eq!(d.reason, Reason::ToRouter);
        assert_eq!(d.rewrite.get(), Some(t.router.v4));
        let mut down = input(v4(VIP, 80), &[1, 2]);
        down.router_alive = false;
        let d = at_connect(&t, &down);
        assert_eq!(d.reason, Reason::RouterDown);
        assert_eq!(d.rewrite.get(), None);
    }

    #[test]
    fn router_own_sockets_are_never_redirected() {
        let t = scene();
        let mut i = input(v4(VIP, 80), &[1, FORK_POD_CG]);
        i.mark = t.router.mark;
        assert_eq!(at_connect(&t, &i).reason, Reason::RouterSocket);
    }

    /// The scene with the forked service also at an IPv6 VIP.
    fn scene_with_vip6() -> (Tables, SockAddr) {
        let mut t = scene();
        let vip6 = SockAddr::v6([u32::from_ne_bytes([0xfd, 0, 2, 0]), 0, 0, 9], 80);
        t.services.insert(
            vip6,
            ServiceValue {
                service_id: 7,
                flags: 0,
            },
        );
        (t, vip6)
    }

    #[test]
    fn ipv6_destination_without_ipv6_router_fails_open() {
        let (t, vip6) = scene_with_vip6();
        let i = input(vip6, &[1]);
        assert_eq!(at_connect(&t, &i).reason, Reason::RouterNoAddress);
    }

    #[test]
    fn fork_endpoint_is_of_the_destination_family() {
        let (t, vip6) = scene_with_vip6();
        for pick in 0..4 {
            let mut i = input(v4(VIP, 80), &[FORK_POD_CG]);
            i.pick = pick;
            assert_eq!(at_connect(&t, &i).rewrite.get(), Some(v4(FORK_EP, 8080)));
            let mut i = input(vip6, &[FORK_POD_CG]);
            i.pick = pick;
            let ep = at_connect(&t, &i).rewrite.get().unwrap();
            assert!(!ep.is_v4(), "{ep:?}");
        }
    }

    #[test]
    fn only_tcp_is_decided() {
        let mut i = input(v4(VIP, 80), &[1, 2]);
        i.tcp = false;
        let d = at_connect(&scene(), &i);
        assert_eq!(
            (d.reason, d.dst.get(), d.rewrite.get()),
            (Reason::NotForked, None, None)
        );
    }

    #[test]
    fn fork_without_ready_endpoint_stays_on_baseline() {
        let mut t = scene();
        t.forks.values_mut().next().unwrap().count = 0;
        let d = at_connect(&t, &input(v4(VIP, 80), &[FORK_POD_CG]));
        assert_eq!(d.reason, Reason::OriginNoEndpoint);
        assert_eq!(d.rewrite.get(), None);
    }
}
