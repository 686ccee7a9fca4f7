//! The decision the `connect4`/`connect6` programs make, as a pure function over `Tables`.
//! It must stay step for step the same as `redirect-ebpf/src/connect.rs`; the end-to-end tests
//! compare both on real connections.

use redirect_common::{ForkKey, Reason, SockAddr};

use super::Tables;

/// What the kernel sees at `connect()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectInput {
    /// Destination the caller asked for.
    pub dst: SockAddr,
    /// Whether the socket is IPv6 (connect6).
    pub ipv6_socket: bool,
    /// The caller's cgroup ancestry, root (level 0) first, as the kernel walks it.
    pub ancestors: Vec<u64>,
    /// The socket's `SO_MARK`.
    pub mark: u32,
    /// Whether the router's listener for this family is in the liveness sockmap.
    pub router_alive: bool,
    /// Which fork endpoint to pick when there are several (the kernel uses a random number).
    pub pick: u32,
}

/// What the kernel does, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectDecision {
    pub reason: Reason,
    /// The rewritten destination, when the decision rewrites.
    pub rewrite: Option<SockAddr>,
    /// Service id of the destination, when it is a forked service.
    pub service_id: Option<u32>,
    /// The caller's pod cgroup and routing key, when it is a fork pod.
    pub workload: Option<(u64, u32)>,
}

/// Decides what `connect()` to `input.dst` does. Mirrors the eBPF program.
pub fn at_connect(t: &Tables, input: &ConnectInput) -> ConnectDecision {
    let mut d = ConnectDecision {
        reason: Reason::NotForked,
        rewrite: None,
        service_id: None,
        workload: None,
    };
    let Some(svc) = t.services.get(&input.dst) else {
        return d;
    };
    d.service_id = Some(svc.service_id);
    if t.router.mark != 0 && input.mark == t.router.mark {
        d.reason = Reason::RouterSocket;
        return d;
    }
    let workload = input
        .ancestors
        .iter()
        .find_map(|cg| t.workloads.get(cg).map(|w| (*cg, w.key_id)));
    if let Some((cgroup, key_id)) = workload {
        d.workload = Some((cgroup, key_id));
        let fork = t.forks.get(&ForkKey {
            key_id,
            service_id: svc.service_id,
        });
        d.reason = match fork {
            None => Reason::OriginBaseline,
            Some(f) => {
                let (start, n) = f.family_range(input.dst.is_v4());
                if n == 0 {
                    Reason::OriginNoEndpoint
                } else {
                    d.rewrite = Some(f.endpoints[start + input.pick as usize % n]);
                    Reason::OriginFork
                }
            }
        };
        return d;
    }
    let router = if input.dst.is_v4() {
        t.router.v4
    } else {
        t.router.v6
    };
    d.reason = if router.is_unset() {
        Reason::RouterNoAddress
    } else if !input.router_alive {
        Reason::RouterDown
    } else {
        d.rewrite = Some(router);
        Reason::ToRouter
    };
    d
}

#[cfg(test)]
mod tests {
    use redirect_common::{ForkEndpoints, RouterConfig, ServiceValue, WorkloadValue};

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
            ipv6_socket: false,
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
        assert_eq!(d.rewrite, None);
    }

    #[test]
    fn fork_pod_calling_forked_service_goes_to_fork_endpoint() {
        let d = at_connect(&scene(), &input(v4(VIP, 80), &[1, 20, FORK_POD_CG, 99]));
        assert_eq!(d.reason, Reason::OriginFork);
        assert_eq!(d.rewrite, Some(v4(FORK_EP, 8080)));
        assert_eq!(d.workload, Some((FORK_POD_CG, 3)));
    }

    #[test]
    fn fork_pod_of_other_sandbox_stays_on_baseline() {
        let mut t = scene();
        t.workloads
            .insert(555, WorkloadValue { key_id: 4, _pad: 0 });
        let d = at_connect(&t, &input(v4(VIP, 80), &[1, 555]));
        assert_eq!(d.reason, Reason::OriginBaseline);
        assert_eq!(d.rewrite, None);
    }

    #[test]
    fn baseline_pod_goes_to_router_when_alive_and_fails_open_when_not() {
        let t = scene();
        let d = at_connect(&t, &input(v4(VIP, 80), &[1, 2]));
        assert_eq!(d.reason, Reason::ToRouter);
        assert_eq!(d.rewrite, Some(t.router.v4));
        let mut down = input(v4(VIP, 80), &[1, 2]);
        down.router_alive = false;
        let d = at_connect(&t, &down);
        assert_eq!(d.reason, Reason::RouterDown);
        assert_eq!(d.rewrite, None);
    }

    #[test]
    fn router_own_sockets_are_never_redirected() {
        let t = scene();
        let mut i = input(v4(VIP, 80), &[1, FORK_POD_CG]);
        i.mark = t.router.mark;
        assert_eq!(at_connect(&t, &i).reason, Reason::RouterSocket);
    }

    #[test]
    fn ipv6_destination_without_ipv6_router_fails_open() {
        let mut t = scene();
        let vip6 = SockAddr::v6([u32::from_ne_bytes([0xfd, 0, 2, 0]), 0, 0, 9], 80);
        t.services.insert(
            vip6,
            ServiceValue {
                service_id: 7,
                flags: 0,
            },
        );
        let mut i = input(vip6, &[1]);
        i.ipv6_socket = true;
        assert_eq!(at_connect(&t, &i).reason, Reason::RouterNoAddress);
    }

    #[test]
    fn fork_endpoint_is_of_the_destination_family() {
        let mut t = scene();
        let vip6 = SockAddr::v6([u32::from_ne_bytes([0xfd, 0, 2, 0]), 0, 0, 9], 80);
        t.services.insert(
            vip6,
            ServiceValue {
                service_id: 7,
                flags: 0,
            },
        );
        for pick in 0..4 {
            let mut i = input(v4(VIP, 80), &[FORK_POD_CG]);
            i.pick = pick;
            assert_eq!(at_connect(&t, &i).rewrite, Some(v4(FORK_EP, 8080)));
            let mut i = input(vip6, &[FORK_POD_CG]);
            (i.pick, i.ipv6_socket) = (pick, true);
            let ep = at_connect(&t, &i).rewrite.unwrap();
            assert!(!ep.is_v4(), "{ep:?}");
        }
    }

    #[test]
    fn fork_without_ready_endpoint_stays_on_baseline() {
        let mut t = scene();
        t.forks.values_mut().next().unwrap().count = 0;
        let d = at_connect(&t, &input(v4(VIP, 80), &[FORK_POD_CG]));
        assert_eq!(d.reason, Reason::OriginNoEndpoint);
        assert_eq!(d.rewrite, None);
    }
}
