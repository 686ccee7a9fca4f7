//! An EndpointSlice as the node agent keeps it: what routing reads and nothing else.
//!
//! A cluster has tens of thousands of endpoints, and k8s-openapi's `Endpoint` is 352 bytes
//! before its strings; kept as it arrives, the EndpointSlices were most of an agent's memory.
//! Here an endpoint is an address and a flag, the Service and fork labels are read once, and
//! addresses that do not parse are dropped on arrival (routing skipped them anyway).

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::forkslice::{ForkSliceRef, parse_fork_slice};
use crate::k8s::SERVICE_NAME_LABEL;
use crate::store::ns_name;

/// An EndpointSlice, compact.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to: its `kubernetes.io/service-name` label.
    pub service: Option<String>,
    /// What it is about when it is one of the controller's fork slices.
    pub fork: Option<ForkSliceRef>,
    pub ports: Box<[SlicePort]>,
    /// Every address of every endpoint, in order.
    pub endpoints: Box<[SliceEndpoint]>,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlicePort {
    /// Empty when unnamed.
    pub name: String,
    /// None when unset or out of range.
    pub port: Option<u16>,
    /// TCP (the default when the protocol is unset).
    pub tcp: bool,
}

/// One address of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    /// Ready (a missing `ready` means ready) and not terminating.
    pub serving: bool,
}

impl Slice {
    /// The number of the TCP port named `name` (empty: the unnamed one).
    pub fn tcp_port(&self, name: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.tcp)
            .and_then(|p| p.port)
    }
}

impl From<&EndpointSlice> for Slice {
    fn from(s: &EndpointSlice) -> Self {
        let (namespace, name) = ns_name(&s.metadata);
        let service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        let ports = s
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port: p.port.and_then(|n| u16::try_from(n).ok()),
                tcp: p.protocol.as_deref().is_none_or(|p| p == "TCP"),
            })
            .collect();
        let mut endpoints = Vec::new();
        for ep in &s.endpoints {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            endpoints.extend(
                ep.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SliceEndpoint {
                        ip,
                        serving: ready && !terminating,
                    }),
            );
        }
        Slice {
            namespace: namespace.to_string(),
            name: name.to_string(),
            service,
            fork: parse_fork_slice(s),
            ports,
            endpoints: endpoints.into(),
        }
    }
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Self {
        Slice::from(&s)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_slice_keeps_addresses_readiness_ports_and_what_it_belongs_to() {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "checkout-abc", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "checkout", "app": "checkout"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"},
                      {"port": 9000}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "nodeName": "n1"},
                {"addresses": ["10.244.1.6", "not-an-ip"]},
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.244.1.8"], "conditions": {"ready": false}}]
        }))
        .unwrap();
        let slice = Slice::from(&s);
        assert_eq!(
            (slice.namespace.as_str(), slice.name.as_str()),
            ("shop", "checkout-abc")
        );
        assert_eq!(slice.service.as_deref(), Some("checkout"));
        assert_eq!(slice.fork, None);
        assert_eq!(slice.tcp_port("http"), Some(8080));
        assert_eq!(slice.tcp_port("dns"), None, "UDP");
        assert_eq!(slice.tcp_port(""), Some(9000), "unnamed, TCP by default");
        let ep = |ip: &str, serving| SliceEndpoint {
            ip: ip.parse().unwrap(),
            serving,
        };
        assert_eq!(
            &*slice.endpoints,
            [
                ep("10.244.1.5", true),
                ep("10.244.1.6", true),
                ep("10.244.1.7", false),
                ep("10.244.1.8", false)
            ]
        );
    }
}
