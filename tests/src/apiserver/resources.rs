//! The table of served resources, and the discovery documents made from it.
//!
//! Core `v1` events and `events.k8s.io/v1` events are two separate collections here (the real
//! server stores one object under both schemas); nothing in redirect needs them to agree.

use serde_json::{Value, json};

/// One served resource type.
#[derive(Debug)]
pub(crate) struct Resource {
    /// API group, `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// The URL name (`pods`).
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep `.status`, writes to
    /// `/status` change nothing but `.status`.
    pub status: bool,
    /// Served only while the CRDs are installed.
    pub crd: bool,
    /// A PUT without `metadata.resourceVersion` is accepted (true for built-in types, false
    /// for custom resources, as in the real server).
    pub unconditional_update: bool,
    /// Field selector labels beyond `metadata.name` and `metadata.namespace`, each a path into
    /// the object.
    pub fields: &'static [&'static str],
    pub short_names: &'static [&'static str],
}

impl Resource {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The `kind` of a list of these (`PodList`).
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Whether `label` may be used in a field selector on this resource.
    pub fn supports_field(&self, label: &str) -> bool {
        label == "metadata.name" || label == "metadata.namespace" || self.fields.contains(&label)
    }
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// Every served resource; an index into this table identifies a resource everywhere.
pub(crate) const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        status: true,
        crd: false,
        unconditional_update: true,
        fields: &["status.phase"],
        short_names: &["ns"],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        status: true,
        crd: false,
        unconditional_update: true,
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        short_names: &["po"],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        status: true,
        crd: false,
        unconditional_update: true,
        fields: &[],
        short_names: &["svc"],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        status: false,
        crd: false,
        unconditional_update: true,
        fields: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "reason",
            "type",
        ],
        short_names: &["ev"],
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        status: false,
        crd: false,
        unconditional_update: true,
        fields: &[],
        short_names: &[],
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        status: false,
        crd: false,
        unconditional_update: true,
        fields: &[],
        short_names: &[],
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        status: false,
        crd: false,
        unconditional_update: true,
        fields: &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "reason",
            "type",
        ],
        short_names: &["ev"],
    },
    Resource {
        group: "redirect.dev",
        version: "v1alpha1",
        plural: "sandboxes",
        singular: "sandbox",
        kind: "Sandbox",
        namespaced: true,
        status: true,
        crd: true,
        unconditional_update: false,
        fields: &[],
        short_names: &["sbx"],
    },
    Resource {
        group: "redirect.dev",
        version: "v1alpha1",
        plural: "routegroups",
        singular: "routegroup",
        kind: "RouteGroup",
        namespaced: true,
        status: true,
        crd: true,
        unconditional_update: false,
        fields: &[],
        short_names: &["rg"],
    },
];

/// The resource served at `group`/`version` under `plural`.
pub(crate) fn by_plural(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource of objects with this `apiVersion` and `kind`.
pub(crate) fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.kind == kind)
}

fn served(r: &Resource, crds: bool) -> bool {
    crds || !r.crd
}

/// `GET /api`.
pub(crate) fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `GET /apis`: every non-core group (one version each), without redirect.dev unless the
/// CRDs are installed.
pub(crate) fn api_group_list(crds: bool) -> Value {
    let mut groups: Vec<Value> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty() && served(r, crds))
    {
        if seen.contains(&r.group) {
            continue;
        }
        seen.push(r.group);
        let gv = json!({"groupVersion": r.api_version(), "version": r.version});
        groups.push(json!({"name": r.group, "versions": [gv.clone()], "preferredVersion": gv}));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`: None when the group is not served.
pub(crate) fn api_group(group: &str, crds: bool) -> Option<Value> {
    let mut g = api_group_list(crds)["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == group)?
        .clone();
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

/// `GET /api/v1` or `/apis/{group}/{version}`: None when nothing is served there.
pub(crate) fn api_resource_list(group: &str, version: &str, crds: bool) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && served(r, crds))
    {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        resources.push(entry);
        if r.status {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// `GET /version`.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-standin",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_by_plural_and_kind_agree() {
        for (i, r) in RESOURCES.iter().enumerate() {
            assert_eq!(by_plural(r.group, r.version, r.plural), Some(i));
            assert_eq!(by_kind(&r.api_version(), r.kind), Some(i));
        }
        assert_eq!(by_kind("v1", "Endpoints"), None);
        assert_eq!(by_plural("", "v1", "endpoints"), None);
    }

    #[test]
    fn custom_resources_have_a_status_subresource_exactly_when_their_crd_does() {
        use kube::CustomResourceExt;
        use redirect_agent::crd::{RouteGroup, Sandbox};
        for crd in [Sandbox::crd(), RouteGroup::crd()] {
            let r = &RESOURCES
                [by_plural("redirect.dev", "v1alpha1", &crd.spec.names.plural).expect("served")];
            let has_status = crd.spec.versions[0]
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some());
            assert_eq!(r.status, has_status, "{}", crd.spec.names.plural);
        }
    }

    #[test]
    fn redirect_dev_is_discoverable_only_with_crds() {
        let without = api_group_list(false).to_string();
        assert!(!without.contains("redirect.dev"), "{without}");
        assert!(api_group_list(true).to_string().contains("redirect.dev"));
        assert!(api_resource_list("redirect.dev", "v1alpha1", false).is_none());
        let list = api_resource_list("redirect.dev", "v1alpha1", true).unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "sandboxes",
                "sandboxes/status",
                "routegroups",
                "routegroups/status"
            ]
        );
        assert!(api_group("redirect.dev", false).is_none());
        let group = api_group("redirect.dev", true).unwrap();
        assert_eq!(group["kind"], "APIGroup");
        assert_eq!(group["preferredVersion"]["version"], "v1alpha1");
    }
}
