//! The router's per-request decision, as a pure function over `Tables`: which upstream serves a
//! request for the original destination `orig` that carries routing key `key`.

use std::collections::HashMap;
use std::sync::Arc;

use redirect_common::{ForkKey, OrigDst, SockAddr};

use super::{PortProtocol, Tables};

/// Where one request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestRoute {
    /// The original destination (baseline), and why.
    Baseline(BaselineWhy),
    /// A fork endpoint of the key's sandbox.
    Fork { endpoint: SockAddr, key_id: u32 },
    /// The key's sandbox forks the service but has no ready endpoint, and its fallback is to
    /// answer 503 rather than fall back to baseline.
    Unavailable { key_id: u32 },
}

/// Why a request stays on baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaselineWhy {
    NoKey,
    /// No sandbox or route group carries the key.
    UnknownKey,
    /// The key's sandbox does not fork this service.
    NotForked,
    /// The fork has no ready endpoint and the sandbox falls back to baseline.
    Fallback,
}

impl BaselineWhy {
    pub const fn label(self) -> &'static str {
        match self {
            BaselineWhy::NoKey => "no_key",
            BaselineWhy::UnknownKey => "unknown_key",
            BaselineWhy::NotForked => "not_forked",
            BaselineWhy::Fallback => "fallback",
        }
    }
}

/// `Tables` with an index from routing key to key id, built once per sync.
#[derive(Clone, Debug, Default)]
pub struct RouteView {
    /// Shared with the sync that made them (and `/tables`): a view costs no copy.
    pub tables: Arc<Tables>,
    key_ids: HashMap<String, u32>,
}

impl RouteView {
    pub fn new(tables: impl Into<Arc<Tables>>) -> Self {
        let tables = tables.into();
        let key_ids = tables
            .keys
            .iter()
            .map(|(id, k)| (k.key.clone(), *id))
            .collect();
        RouteView { tables, key_ids }
    }

    pub fn key_id(&self, key: &str) -> Option<u32> {
        self.key_ids.get(key).copied()
    }

    /// What the service port `service_id` declares (detection when the view does not know it).
    pub fn port_protocol(&self, service_id: u32) -> PortProtocol {
        self.tables
            .service_protocols
            .get(&service_id)
            .copied()
            .unwrap_or_default()
    }
}

/// Decides where a request goes. `pick` chooses among several ready fork endpoints.
pub fn for_request(view: &RouteView, orig: &OrigDst, key: Option<&str>, pick: u32) -> RequestRoute {
    let Some(key) = key else {
        return RequestRoute::Baseline(BaselineWhy::NoKey);
    };
    let Some(key_id) = view.key_id(key) else {
        return RequestRoute::Baseline(BaselineWhy::UnknownKey);
    };
    let Some(fork) = view.tables.forks.get(&ForkKey {
        key_id,
        service_id: orig.service_id,
    }) else {
        return RequestRoute::Baseline(BaselineWhy::NotForked);
    };
    let (start, n) = fork.family_range(orig.dst.is_v4());
    if n == 0 {
        let fallback = view
            .tables
            .keys
            .get(&key_id)
            .is_some_and(|k| k.fallback_to_baseline);
        return if fallback {
            RequestRoute::Baseline(BaselineWhy::Fallback)
        } else {
            RequestRoute::Unavailable { key_id }
        };
    }
    RequestRoute::Fork {
        endpoint: fork.endpoints[start + pick as usize % n],
        key_id,
    }
}

#[cfg(test)]
mod tests {
    use redirect_common::ForkEndpoints;

    use super::*;
    use crate::routing::KeyInfo;

    fn v4(last: u8, port: u16) -> SockAddr {
        SockAddr::v4(u32::from_ne_bytes([10, 200, 1, last]), port)
    }

    fn view(fork_eps: &[SockAddr], fallback: bool) -> RouteView {
        let mut t = Tables::default();
        t.keys.insert(
            3,
            KeyInfo {
                key: "feature-x".into(),
                owners: vec!["default/feature-x".into()],
                fallback_to_baseline: fallback,
            }
            .into(),
        );
        t.forks.insert(
            ForkKey {
                key_id: 3,
                service_id: 7,
            },
            ForkEndpoints::from_endpoints(fork_eps).0,
        );
        RouteView::new(t)
    }

    fn orig(service_id: u32) -> OrigDst {
        OrigDst {
            dst: SockAddr::v4(u32::from_ne_bytes([10, 200, 2, 10]), 80),
            service_id,
            ..Default::default()
        }
    }

    #[test]
    fn a_request_with_the_sandbox_key_goes_to_a_fork_endpoint() {
        let v = view(&[v4(9, 8080), v4(10, 8080)], false);
        for pick in 0..4 {
            let r = for_request(&v, &orig(7), Some("feature-x"), pick);
            let want = if pick % 2 == 0 {
                v4(9, 8080)
            } else {
                v4(10, 8080)
            };
            assert_eq!(
                r,
                RequestRoute::Fork {
                    endpoint: want,
                    key_id: 3
                }
            );
        }
    }

    #[test]
    fn no_key_unknown_key_and_unforked_service_stay_on_baseline() {
        let v = view(&[v4(9, 8080)], false);
        assert_eq!(
            for_request(&v, &orig(7), None, 0),
            RequestRoute::Baseline(BaselineWhy::NoKey)
        );
        assert_eq!(
            for_request(&v, &orig(7), Some("other"), 0),
            RequestRoute::Baseline(BaselineWhy::UnknownKey)
        );
        assert_eq!(
            for_request(&v, &orig(8), Some("feature-x"), 0),
            RequestRoute::Baseline(BaselineWhy::NotForked)
        );
    }

    #[test]
    fn a_fork_without_ready_endpoint_is_unavailable_unless_the_sandbox_falls_back() {
        let v = view(&[], false);
        assert_eq!(
            for_request(&v, &orig(7), Some("feature-x"), 0),
            RequestRoute::Unavailable { key_id: 3 }
        );
        let v = view(&[], true);
        assert_eq!(
            for_request(&v, &orig(7), Some("feature-x"), 0),
            RequestRoute::Baseline(BaselineWhy::Fallback)
        );
    }

    #[test]
    fn an_ipv4_request_never_gets_an_ipv6_only_fork() {
        let v6 = SockAddr::v6([1, 0, 0, 9], 8080);
        let v = view(&[v6], false);
        assert_eq!(
            for_request(&v, &orig(7), Some("feature-x"), 0),
            RequestRoute::Unavailable { key_id: 3 }
        );
    }
}
