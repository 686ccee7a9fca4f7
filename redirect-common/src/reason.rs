//! Why a program decided what it did. Each reason is a slot in the per-CPU counters map.

/// The reason behind one kernel decision. The discriminant is the index in `COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Destination is no forked service: the common case, one hash lookup, untouched.
    NotForked = 0,
    /// The router's own upstream socket (carries the router mark): never redirected again.
    RouterSocket = 1,
    /// The caller is a fork pod and its sandbox forks this service: rewritten in the kernel.
    OriginFork = 2,
    /// The caller is a fork pod and its sandbox does not fork this service: baseline, untouched.
    OriginBaseline = 3,
    /// The caller's sandbox forks the service but no fork endpoint of the destination's family
    /// is ready: baseline, untouched.
    OriginNoEndpoint = 4,
    /// A baseline caller reached a forked service: rewritten to the node router.
    ToRouter = 5,
    /// The router's listener is not in the liveness sockmap: fail open, untouched.
    RouterDown = 6,
    /// The router has no address of the caller's family configured: fail open, untouched.
    RouterNoAddress = 7,
    /// Socket storage for the original destination could not be created: fail open, untouched.
    StorageFull = 8,
    /// `sock_ops` recorded a redirected connection's original destination for the router.
    ConnRecorded = 9,
    /// `sock_ops` could not record the original destination (map full): the router refuses it.
    ConnsFull = 10,
    /// A program failed unexpectedly (helper error): fail open, untouched.
    Error = 11,
}

impl Reason {
    /// Number of reasons: the size of the counters map.
    pub const COUNT: u32 = 12;

    /// Every reason, in counter order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::NotForked,
        Reason::RouterSocket,
        Reason::OriginFork,
        Reason::OriginBaseline,
        Reason::OriginNoEndpoint,
        Reason::ToRouter,
        Reason::RouterDown,
        Reason::RouterNoAddress,
        Reason::StorageFull,
        Reason::ConnRecorded,
        Reason::ConnsFull,
        Reason::Error,
    ];

    /// Stable snake_case label for metrics, JSON and tables.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::NotForked => "not_forked",
            Reason::RouterSocket => "router_socket",
            Reason::OriginFork => "origin_fork",
            Reason::OriginBaseline => "origin_baseline",
            Reason::OriginNoEndpoint => "origin_no_endpoint",
            Reason::ToRouter => "to_router",
            Reason::RouterDown => "router_down",
            Reason::RouterNoAddress => "router_no_address",
            Reason::StorageFull => "storage_full",
            Reason::ConnRecorded => "conn_recorded",
            Reason::ConnsFull => "conns_full",
            Reason::Error => "error",
        }
    }

    /// Whether this decision rewrote the destination.
    pub const fn rewrites(self) -> bool {
        matches!(self, Reason::OriginFork | Reason::ToRouter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_at_its_own_index() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
