//! Fork slices: the desired ones (from [`crate::forkslice::fork_slices`], via the plan) against
//! the ones that exist (every EndpointSlice labelled as ours): create the missing, replace the
//! changed, delete the stale. Creates and replaces come before deletes, so a reader never sees
//! a moment with fewer endpoints than before or after.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::forkslice::parse_fork_slice;
use crate::store::ns_name;

/// One write to bring the fork slices where they should be.
#[derive(Clone, Debug, PartialEq)]
pub enum SliceOp {
    Create(EndpointSlice),
    /// The desired slice, carrying the existing one's `resourceVersion`.
    Replace(EndpointSlice),
    Delete {
        namespace: String,
        name: String,
        uid: Option<String>,
    },
}

impl SliceOp {
    /// `namespace/name` of the slice.
    pub fn slice_name(&self) -> String {
        match self {
            SliceOp::Create(s) | SliceOp::Replace(s) => {
                let (ns, name) = ns_name(&s.metadata);
                format!("{ns}/{name}")
            }
            SliceOp::Delete {
                namespace, name, ..
            } => format!("{namespace}/{name}"),
        }
    }
}

/// The writes that turn `existing` into `desired`.
pub fn slice_ops(desired: &[EndpointSlice], existing: &[Arc<EndpointSlice>]) -> Vec<SliceOp> {
    let by_name: BTreeMap<(&str, &str), &EndpointSlice> = existing
        .iter()
        .filter(|s| parse_fork_slice(s).is_some())
        .map(|s| (ns_name(&s.metadata), &**s))
        .collect();
    let mut ops = Vec::new();
    let mut wanted = std::collections::BTreeSet::new();
    for d in desired {
        let key = ns_name(&d.metadata);
        wanted.insert(key);
        match by_name.get(&key) {
            None => ops.push(SliceOp::Create(d.clone())),
            Some(e) if !same(e, d) => {
                let mut replace = d.clone();
                replace.metadata.resource_version = e.metadata.resource_version.clone();
                ops.push(SliceOp::Replace(replace));
            }
            Some(_) => {}
        }
    }
    for (key, e) in &by_name {
        if !wanted.contains(key) {
            ops.push(SliceOp::Delete {
                namespace: key.0.to_string(),
                name: key.1.to_string(),
                uid: e.metadata.uid.clone(),
            });
        }
    }
    ops
}

/// Whether `existing` already says what `desired` says (server-set metadata aside).
fn same(existing: &EndpointSlice, desired: &EndpointSlice) -> bool {
    existing.address_type == desired.address_type
        && existing.endpoints == desired.endpoints
        && existing.ports == desired.ports
        && existing.metadata.labels == desired.metadata.labels
        && existing.metadata.owner_references == desired.metadata.owner_references
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::Endpoint;
    use serde_json::json;

    use super::*;
    use crate::forkslice::{MANAGED_BY, MANAGED_BY_LABEL};

    fn slice(name: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {
                MANAGED_BY_LABEL: MANAGED_BY,
                "redirect.dev/sandbox": "sb",
                "redirect.dev/sandbox-namespace": "shop",
                "redirect.dev/fork-of": "checkout"
            }},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    fn existing(s: EndpointSlice, rv: &str) -> Arc<EndpointSlice> {
        let mut s = s;
        s.metadata.resource_version = Some(rv.into());
        s.metadata.uid = Some(format!("uid-{rv}"));
        Arc::new(s)
    }

    #[test]
    fn missing_slices_are_created_changed_ones_replaced_and_stale_ones_deleted_last() {
        let desired = [
            slice("a", "10.1.0.1"),
            slice("b", "10.1.0.2"),
            slice("c", "10.1.0.3"),
        ];
        let have = [
            existing(slice("stale", "10.1.0.9"), "1"),
            existing(slice("b", "10.1.0.20"), "2"),
            existing(slice("c", "10.1.0.3"), "3"),
        ];
        let ops = slice_ops(&desired, &have);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(&ops[0], SliceOp::Create(s) if s.metadata.name.as_deref() == Some("a")));
        match &ops[1] {
            SliceOp::Replace(s) => {
                assert_eq!(s.metadata.name.as_deref(), Some("b"));
                assert_eq!(s.metadata.resource_version.as_deref(), Some("2"));
                assert_eq!(s.endpoints[0].addresses, ["10.1.0.2"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ops[2],
            SliceOp::Delete {
                namespace: "shop".into(),
                name: "stale".into(),
                uid: Some("uid-1".into())
            }
        );
    }

    #[test]
    fn slices_that_match_are_left_alone_whatever_the_server_added() {
        let mut have = slice("a", "10.1.0.1");
        have.metadata.generation = Some(4);
        have.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-01-01T00:00:00Z".parse().unwrap(),
            ));
        assert!(slice_ops(&[slice("a", "10.1.0.1")], &[existing(have, "1")]).is_empty());
    }

    #[test]
    fn endpoint_slices_that_are_not_ours_are_never_touched() {
        let mut theirs = slice("checkout-abcde", "10.1.0.1");
        theirs.metadata.labels = Some(
            [
                (
                    MANAGED_BY_LABEL.to_string(),
                    "endpointslice-controller.k8s.io".to_string(),
                ),
                (
                    "kubernetes.io/service-name".to_string(),
                    "checkout".to_string(),
                ),
            ]
            .into(),
        );
        theirs.endpoints.push(Endpoint::default());
        assert!(slice_ops(&[], &[existing(theirs, "1")]).is_empty());
    }
}
