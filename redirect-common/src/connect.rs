//! The `connect4`/`connect6` decision, written once. The eBPF programs run it over their maps
//! and the socket being connected; the agent runs it over the tables it reads back from the maps
//! (the end-to-end tests compare both on real connections, `redirectctl explain` narrates it).
//! Each step is reported to a [`Steps`] observer: `()` ignores them, `explain` renders them.

use crate::{ForkEndpoints, ForkKey, MAX_FORK_ENDPOINTS, Reason, RouterConfig, SockAddr};

/// What the decision reads, in the kernel or over tables.
pub trait ConnectEnv {
    /// The destination the caller asked for, when the socket is TCP (nothing else is decided).
    fn tcp_destination(&self) -> Option<SockAddr>;
    /// The service port id of the forked service at `dst` (`services_v1`).
    fn service(&self, dst: &SockAddr) -> Option<u32>;
    /// The router's addresses and mark (`router_v1`); `None` only when it cannot be read.
    fn router(&self) -> Option<&RouterConfig>;
    /// The socket's `SO_MARK`.
    fn socket_mark(&self) -> u32;
    /// The caller's fork pod cgroup and routing key, when it runs in a fork pod
    /// ([`crate::origin::caller_key`]).
    fn caller(&self) -> Option<(u64, u32)>;
    /// The ready endpoints of a fork (`forks_v1`).
    fn fork(&self, key: &ForkKey) -> Option<&ForkEndpoints>;
    /// Which of the `n` candidates from `start` to use; must be below `MAX_FORK_ENDPOINTS`.
    fn pick(&self, start: usize, n: usize) -> usize;
    /// Whether the router's listener sits in liveness slot `slot` (`router_socks_v1`).
    fn router_alive(&self, slot: u32) -> bool;
    /// Records the socket being rewritten from `dst` to `to`: the address asked for (for
    /// `getpeername()`) and, when `to_router`, its original destination for the router. `false`
    /// when it cannot.
    fn remember(&self, dst: &SockAddr, to: &SockAddr, service_id: u32, to_router: bool) -> bool;
}

/// One step of the decision, as it was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// `services_v1[dst]`: the forked service port, if any.
    Service {
        dst: SockAddr,
        service_id: Option<u32>,
    },
    /// The socket carries the router's mark: its own upstream socket.
    RouterSocket { mark: u32 },
    /// Who is calling: the fork pod cgroup and key, or `None` for a baseline caller.
    Caller { found: Option<(u64, u32)> },
    /// `forks_v1[key]` for the destination's family (`v4`).
    Fork {
        key: ForkKey,
        v4: bool,
        endpoints: Option<&'a ForkEndpoints>,
    },
    /// The router's address for the destination's family (unset: none).
    RouterAddress { v4: bool, to: SockAddr },
    /// Whether the router's listener is in its liveness slot.
    RouterAlive { slot: u32, alive: bool },
    /// Whether the socket's record could be stored.
    Recorded { to_router: bool, ok: bool },
}

/// Sees each step as it is taken.
pub trait Steps {
    fn step(&mut self, step: Step<'_>);
}

/// No observer: what the kernel uses.
impl Steps for () {
    #[inline(always)]
    fn step(&mut self, _: Step<'_>) {}
}

/// An optional part of a [`Decision`]: a flag and a value that is `T::default()` when absent,
/// never an `Option`. An `Option`'s payload is undefined while it is `None`, and LLVM may spill
/// and reload it across a helper call on a path that never wrote it. Older verifiers (5.10's)
/// refuse a read of a stack slot the path never wrote, and the programs then do not load at
/// all (the 5.10 run of `cargo xtask vm-test` catches it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Part<T> {
    present: bool,
    value: T,
}

impl<T: Copy + Default> Part<T> {
    #[inline(always)]
    pub fn some(value: T) -> Self {
        Part {
            present: true,
            value,
        }
    }

    #[inline(always)]
    pub fn none() -> Self {
        Part {
            present: false,
            value: T::default(),
        }
    }

    #[inline(always)]
    pub fn get(&self) -> Option<T> {
        if self.present { Some(self.value) } else { None }
    }

    /// The value, or `T::default()` when absent (both defined, without a branch on the flag).
    #[inline(always)]
    pub fn or_default(&self) -> T {
        self.value
    }
}

/// What `connect()` does, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// The destination asked for; absent for a socket that is not TCP.
    pub dst: Part<SockAddr>,
    /// Where the connection goes instead, when the decision rewrites.
    pub rewrite: Part<SockAddr>,
    /// The destination's service port id, when it is a forked service.
    pub service_id: Part<u32>,
    /// The caller's fork pod cgroup and routing key, when it is a fork pod.
    pub workload: Part<(u64, u32)>,
}

impl Decision {
    #[inline(always)]
    fn untouched(reason: Reason, dst: Part<SockAddr>) -> Self {
        Decision {
            reason,
            dst,
            rewrite: Part::none(),
            service_id: Part::none(),
            workload: Part::none(),
        }
    }
}

/// Decides what a `connect()` does: untouched unless the destination is a forked service; a
/// fork pod's own connection goes to its sandbox's fork endpoint (decided here, in the kernel);
/// a baseline caller's goes to the router, which decides per request. Every failure leaves the
/// connection untouched (fail open).
#[inline(always)]
pub fn decide<E: ConnectEnv, S: Steps>(env: &E, steps: &mut S) -> Decision {
    let Some(dst) = env.tcp_destination() else {
        return Decision::untouched(Reason::NotForked, Part::none());
    };
    let mut d = Decision::untouched(Reason::NotForked, Part::some(dst));
    let service_id = env.service(&dst);
    steps.step(Step::Service { dst, service_id });
    let Some(service_id) = service_id else {
        return d;
    };
    d.service_id = Part::some(service_id);
    let Some(router) = env.router() else {
        d.reason = Reason::Error;
        return d;
    };
    if router.mark != 0 {
        let mark = env.socket_mark();
        if mark == router.mark {
            steps.step(Step::RouterSocket { mark });
            d.reason = Reason::RouterSocket;
            return d;
        }
    }
    let v4 = dst.is_v4();
    let caller = env.caller();
    steps.step(Step::Caller { found: caller });
    if let Some(workload @ (_, key_id)) = caller {
        d.workload = Part::some(workload);
        let key = ForkKey { key_id, service_id };
        let fork = env.fork(&key);
        steps.step(Step::Fork {
            key,
            v4,
            endpoints: fork,
        });
        let Some(fork) = fork else {
            d.reason = Reason::OriginBaseline;
            return d;
        };
        let (start, n) = fork.family_range(v4);
        if n == 0 {
            d.reason = Reason::OriginNoEndpoint;
            return d;
        }
        let Some(ep) = fork.endpoints.get(env.pick(start, n)) else {
            d.reason = Reason::Error;
            return d;
        };
        // Best effort: without the record the application sees the fork endpoint as its peer.
        let ok = env.remember(&dst, ep, service_id, false);
        steps.step(Step::Recorded {
            to_router: false,
            ok,
        });
        d.rewrite = Part::some(*ep);
        d.reason = Reason::OriginFork;
        return d;
    }
    let (to, slot) = if v4 {
        (router.v4, crate::ROUTER_SOCK_V4)
    } else {
        (router.v6, crate::ROUTER_SOCK_V6)
    };
    steps.step(Step::RouterAddress { v4, to });
    if to.is_unset() {
        d.reason = Reason::RouterNoAddress;
        return d;
    }
    let alive = env.router_alive(slot);
    steps.step(Step::RouterAlive { slot, alive });
    if !alive {
        d.reason = Reason::RouterDown;
        return d;
    }
    // Without the record the router could not route the connection: leave it alone.
    let ok = env.remember(&dst, &to, service_id, true);
    steps.step(Step::Recorded {
        to_router: true,
        ok,
    });
    if !ok {
        d.reason = Reason::StorageFull;
        return d;
    }
    d.rewrite = Part::some(to);
    d.reason = Reason::ToRouter;
    d
}

/// The index of the `pick`-th of `n` candidates from `start` (what the agent's model uses; the
/// kernel picks at random).
#[inline(always)]
pub const fn nth_candidate(start: usize, n: usize, pick: u32) -> usize {
    (start + pick as usize % n) & (MAX_FORK_ENDPOINTS - 1)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::cell::Cell;
    use std::vec::Vec;

    use super::*;

    const VIP: SockAddr = SockAddr::v4(0x0a00_00c8, 80);
    const ROUTER: SockAddr = SockAddr::v4(0x0100_00c8, 15001);

    /// One forked service, one fork endpoint, a router; the caller and room are set per test.
    struct Env {
        caller: Option<(u64, u32)>,
        fork: ForkEndpoints,
        router: RouterConfig,
        alive: bool,
        room: bool,
        remembered: Cell<Option<(SockAddr, bool)>>,
    }

    impl Env {
        fn new(caller: Option<(u64, u32)>) -> Env {
            let ep = SockAddr::v4(0x0901_00c8, 8080);
            Env {
                caller,
                fork: ForkEndpoints::from_endpoints(&[ep]).0,
                router: RouterConfig {
                    v4: ROUTER,
                    mark: 0x5244,
                    ..Default::default()
                },
                alive: true,
                room: true,
                remembered: Cell::new(None),
            }
        }
    }

    impl ConnectEnv for Env {
        fn tcp_destination(&self) -> Option<SockAddr> {
            Some(VIP)
        }
        fn service(&self, dst: &SockAddr) -> Option<u32> {
            (*dst == VIP).then_some(7)
        }
        fn router(&self) -> Option<&RouterConfig> {
            Some(&self.router)
        }
        fn socket_mark(&self) -> u32 {
            0
        }
        fn caller(&self) -> Option<(u64, u32)> {
            self.caller
        }
        fn fork(&self, key: &ForkKey) -> Option<&ForkEndpoints> {
            (key.key_id == 3 && key.service_id == 7).then_some(&self.fork)
        }
        fn pick(&self, start: usize, n: usize) -> usize {
            nth_candidate(start, n, 0)
        }
        fn router_alive(&self, _slot: u32) -> bool {
            self.alive
        }
        fn remember(&self, _dst: &SockAddr, to: &SockAddr, _sid: u32, to_router: bool) -> bool {
            self.remembered.set(Some((*to, to_router)));
            self.room
        }
    }

    /// The names of the steps taken, in order.
    #[derive(Default)]
    struct Taken(Vec<&'static str>);

    impl Steps for Taken {
        fn step(&mut self, step: Step<'_>) {
            self.0.push(match step {
                Step::Service { .. } => "service",
                Step::RouterSocket { .. } => "router_socket",
                Step::Caller { .. } => "caller",
                Step::Fork { .. } => "fork",
                Step::RouterAddress { .. } => "router_address",
                Step::RouterAlive { .. } => "router_alive",
                Step::Recorded { .. } => "recorded",
            });
        }
    }

    #[test]
    fn a_baseline_caller_goes_to_the_router_once_its_socket_is_recorded() {
        let env = Env::new(None);
        let mut taken = Taken::default();
        let d = decide(&env, &mut taken);
        assert_eq!(
            (d.reason, d.rewrite.get()),
            (Reason::ToRouter, Some(ROUTER))
        );
        assert_eq!(env.remembered.get(), Some((ROUTER, true)));
        assert_eq!(
            taken.0,
            [
                "service",
                "caller",
                "router_address",
                "router_alive",
                "recorded"
            ]
        );
    }

    #[test]
    fn no_record_for_the_router_means_untouched_but_a_fork_endpoint_does_without() {
        let mut env = Env::new(None);
        env.room = false;
        let d = decide(&env, &mut ());
        assert_eq!((d.reason, d.rewrite.get()), (Reason::StorageFull, None));
        let mut env = Env::new(Some((42, 3)));
        env.room = false;
        let d = decide(&env, &mut ());
        assert_eq!(d.reason, Reason::OriginFork);
        assert_eq!(env.remembered.get(), Some((env.fork.endpoints[0], false)));
    }

    #[test]
    fn a_fork_pod_is_decided_without_the_router() {
        let mut env = Env::new(Some((42, 3)));
        env.alive = false;
        let mut taken = Taken::default();
        let d = decide(&env, &mut taken);
        assert_eq!(d.reason, Reason::OriginFork);
        assert_eq!(d.workload.get(), Some((42, 3)));
        assert_eq!(taken.0, ["service", "caller", "fork", "recorded"]);
        let d = decide(&Env::new(Some((42, 4))), &mut ());
        assert_eq!((d.reason, d.rewrite.get()), (Reason::OriginBaseline, None));
    }

    #[test]
    fn the_router_being_down_fails_open_before_anything_is_recorded() {
        let mut env = Env::new(None);
        env.alive = false;
        let d = decide(&env, &mut ());
        assert_eq!((d.reason, d.rewrite.get()), (Reason::RouterDown, None));
        assert_eq!(env.remembered.get(), None);
    }

    #[test]
    fn an_absent_part_holds_the_default_value_not_an_undefined_one() {
        let none: Part<(u64, u32)> = Part::none();
        assert_eq!((none.get(), none.or_default()), (None, (0, 0)));
        assert_eq!(none, Part::default());
        let some = Part::some(7u32);
        assert_eq!((some.get(), some.or_default()), (Some(7), 7));
    }
}
