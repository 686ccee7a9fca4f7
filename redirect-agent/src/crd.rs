//! The custom resources: `Sandbox` (a routing key plus forks) and `RouteGroup` (one routing key
//! over several sandboxes, matched by label). The CRD YAML in `deploy/` is generated from these
//! types by [`crd_yaml`]; the same checks run on manifests ([`SandboxSpec::validate`]) and, as
//! schema patterns, in the API server.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the custom resources.
pub const GROUP: &str = "redirect.dev";
/// API version of the custom resources.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as it appears in manifests.
pub const API_VERSION: &str = "redirect.dev/v1alpha1";

/// Longest routing key accepted.
pub use redirect_l7::MAX_ROUTING_KEY_LEN;
/// The routing key syntax, for the CRD schema: W3C baggage-value safe characters only.
pub const ROUTING_KEY_PATTERN: &str = r"^[A-Za-z0-9._~-]{1,128}$";
/// The TTL syntax (Go `time.ParseDuration`, positive), for the CRD schema.
pub const TTL_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// A branch of the baseline: requests carrying `routingKey` go to this sandbox's forks.
// Several `printcolumn(type_ = "string", ..)` look like duplicated attributes to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "redirect.dev",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    derive = "PartialEq",
    shortname = "sbx",
    category = "redirect",
    doc = "A routing key plus the forks that stand in for baseline services when a request carries it.",
    printcolumn(
        name = "Key",
        type_ = "string",
        description = "The routing key requests carry.",
        json_path = ".spec.routingKey"
    ),
    printcolumn(
        name = "Forks",
        type_ = "integer",
        description = "Number of forks (from the controller's last status).",
        json_path = ".status.forkCount"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Valid, and every fork has a ready endpoint.",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        description = "Ready fork endpoints, over all forks.",
        json_path = ".status.readyEndpoints"
    ),
    printcolumn(
        name = "TTL",
        type_ = "string",
        description = "Lifetime after creation.",
        json_path = ".spec.ttl",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.forks) || self.forks.all(f, self.forks.exists_one(g, g.service == f.service && (has(g.__namespace__) ? g.__namespace__ : '') == (has(f.__namespace__) ? f.__namespace__ : '')))",
        "message": "each service may be forked once per sandbox"
    },
    {
        "rule": "!has(self.ttl) || duration(self.ttl) > duration('0s')",
        "message": "ttl must be positive"
    }
]))]
pub struct SandboxSpec {
    /// The key requests carry (`baggage: routing-key=<key>`): 1 to 128 characters of
    /// `[A-Za-z0-9._~-]`, unique among sandboxes and route groups.
    #[schemars(length(min = 1, max = 128), regex(pattern = ROUTING_KEY_PATTERN))]
    pub routing_key: String,
    /// The services this sandbox replaces, each at most once (at most 64).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub forks: Vec<Fork>,
    /// What a request for a fork with no ready endpoint gets (default `Unavailable`: a 503,
    /// so a broken fork is never hidden by a silent fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// How long the sandbox lives after creation (Go duration, e.g. `2h`, `90m`); the
    /// controller deletes it when it expires. None: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = TTL_PATTERN))]
    pub ttl: Option<String>,
}

/// Pods that stand in for a baseline Service inside a sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "size(self.selector) > 0",
        "message": "selector must not be empty: it would select every pod of the namespace"
    }
]))]
pub struct Fork {
    /// Name of the baseline Service (in the sandbox's namespace).
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// Namespace of the baseline Service and of the fork pods. Optional, and when set it must
    /// be the sandbox's own: the controller marks a fork of another namespace's Service
    /// invalid (`CrossNamespaceFork`), since a tenant must not fork someone else's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Labels (matchLabels) of the fork pods, in the Service's namespace. Must not be empty.
    #[schemars(extend("minProperties" = 1))]
    pub selector: BTreeMap<String, String>,
}

/// What a request gets when the fork it is routed to has no ready endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum Fallback {
    /// The request goes to the baseline service.
    Baseline,
    /// The request fails with 503 (connection refused for opaque TCP).
    #[default]
    Unavailable,
}

/// What the controller (`redirect-agent controller`) observed; written only by it, through the
/// status subresource.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// `Valid` (the spec is usable: key syntax and uniqueness, TTL, forks of existing Services
    /// of the sandbox's namespace; reasons `Validated`, `InvalidSpec`, `InvalidRoutingKey`,
    /// `InvalidTtl`, `EmptyForkService`, `EmptyForkSelector`, `DuplicateFork`,
    /// `CrossNamespaceFork`, `UnknownService`, `KeyConflict`) and `Ready` (valid, and every
    /// fork has a ready endpoint; reasons `ForksReady`, `Invalid`, `NoMatchingPods`,
    /// `NoReadyEndpoints`), as standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions were computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Per fork, in the order of `spec.forks`: its Service and how many fork pods are ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forks: Vec<ForkStatus>,
    /// Number of forks in the spec.
    #[serde(default)]
    pub fork_count: i32,
    /// Ready fork endpoints (pods) over all forks.
    #[serde(default)]
    pub ready_endpoints: i32,
}

/// One fork as the controller sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForkStatus {
    /// Name of the forked Service.
    pub service: String,
    /// Namespace of the forked Service and of its fork pods.
    pub namespace: String,
    /// Fork pods that are ready and serve at least one TCP port of the Service (the endpoints
    /// published for the node agents in the fork's EndpointSlices).
    #[serde(default)]
    pub ready_endpoints: i32,
}

/// What the controller observed of a route group; written only by it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupStatus {
    /// `Valid` (key syntax and uniqueness; reasons `Validated`, `InvalidSpec`,
    /// `InvalidRoutingKey`, `KeyConflict`) and `Ready` (valid and selecting at least one
    /// sandbox; reasons `SandboxesSelected`, `Invalid`, `NoMatchingSandboxes`), as standard
    /// conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions were computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of sandboxes `sandboxSelector` matches (in every namespace).
    #[serde(default)]
    pub sandboxes: i32,
}

/// One routing key over several sandboxes: a request carrying it goes to the forks of every
/// sandbox whose labels match `sandboxSelector` (in any namespace).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "redirect.dev",
    version = "v1alpha1",
    kind = "RouteGroup",
    namespaced,
    status = "RouteGroupStatus",
    derive = "PartialEq",
    shortname = "rg",
    category = "redirect",
    doc = "One routing key whose forks are the union of the forks of the sandboxes it selects.",
    printcolumn(
        name = "Key",
        type_ = "string",
        description = "The routing key requests carry.",
        json_path = ".spec.routingKey"
    ),
    printcolumn(
        name = "Sandboxes",
        type_ = "integer",
        description = "Sandboxes the selector matches.",
        json_path = ".status.sandboxes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Valid, and selecting at least one sandbox.",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupSpec {
    /// The key requests carry; same syntax as a sandbox's, unique among both.
    #[schemars(length(min = 1, max = 128), regex(pattern = ROUTING_KEY_PATTERN))]
    pub routing_key: String,
    /// Labels (matchLabels) of the member sandboxes, in any namespace; empty selects every
    /// sandbox.
    #[serde(default)]
    pub sandbox_selector: BTreeMap<String, String>,
}

/// Why a spec is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid routing key {key:?}: {reason}")]
    InvalidRoutingKey { key: String, reason: &'static str },
    #[error("invalid ttl {ttl:?}: {reason}")]
    InvalidTtl { ttl: String, reason: String },
    #[error("fork {index}: service name is empty")]
    EmptyForkService { index: usize },
    #[error("fork {index} of service {service:?}: selector is empty (it would select every pod)")]
    EmptyForkSelector { index: usize, service: String },
    #[error("fork {index}: service {service:?} is forked twice")]
    DuplicateFork { index: usize, service: String },
}

impl SpecError {
    /// The reason (CamelCase) of the `Valid=False` condition the controller writes for it.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::InvalidRoutingKey { .. } => "InvalidRoutingKey",
            SpecError::InvalidTtl { .. } => "InvalidTtl",
            SpecError::EmptyForkService { .. } => "EmptyForkService",
            SpecError::EmptyForkSelector { .. } => "EmptyForkSelector",
            SpecError::DuplicateFork { .. } => "DuplicateFork",
        }
    }

    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SpecError::InvalidRoutingKey { .. } => "invalid_routing_key",
            SpecError::InvalidTtl { .. } => "invalid_ttl",
            SpecError::EmptyForkService { .. } => "empty_fork_service",
            SpecError::EmptyForkSelector { .. } => "empty_fork_selector",
            SpecError::DuplicateFork { .. } => "duplicate_fork",
        }
    }
}

/// Checks a routing key: 1..=128 characters of `[A-Za-z0-9._~-]` (the rule lives in
/// `redirect_l7`, shared with the router's key extraction).
pub fn validate_routing_key(key: &str) -> Result<(), SpecError> {
    redirect_l7::validate_routing_key(key).map_err(|e| SpecError::InvalidRoutingKey {
        key: e.key,
        reason: e.reason,
    })
}

/// Parses a TTL (Go duration syntax, e.g. `2h`, `1h30m`); it must be positive.
pub fn parse_ttl(ttl: &str) -> Result<Duration, SpecError> {
    let invalid = |reason: String| SpecError::InvalidTtl {
        ttl: ttl.to_string(),
        reason,
    };
    if ttl.starts_with(['-', '+']) {
        return Err(invalid("a sign is not allowed".into()));
    }
    let parsed: kube::core::Duration = ttl.parse().map_err(|e| invalid(format!("{e}")))?;
    let d = Duration::from(parsed);
    if d.is_zero() {
        return Err(invalid("it must be positive".into()));
    }
    Ok(d)
}

impl SandboxSpec {
    /// Every problem of the spec (empty when valid).
    pub fn validate(&self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        if let Err(e) = validate_routing_key(&self.routing_key) {
            errors.push(e);
        }
        if let Some(ttl) = &self.ttl
            && let Err(e) = parse_ttl(ttl)
        {
            errors.push(e);
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, fork) in self.forks.iter().enumerate() {
            if fork.service.is_empty() {
                errors.push(SpecError::EmptyForkService { index });
                continue;
            }
            if fork.selector.is_empty() {
                errors.push(SpecError::EmptyForkSelector {
                    index,
                    service: fork.service.clone(),
                });
            }
            if !seen.insert((fork.namespace.as_deref(), fork.service.as_str())) {
                errors.push(SpecError::DuplicateFork {
                    index,
                    service: fork.service.clone(),
                });
            }
        }
        errors
    }

    /// The fallback in effect (`Unavailable` unless set).
    pub fn fallback(&self) -> Fallback {
        self.fallback.unwrap_or_default()
    }

    /// The TTL, when set and valid.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl.as_deref().and_then(|t| parse_ttl(t).ok())
    }
}

impl RouteGroupSpec {
    /// Every problem of the spec (empty when valid).
    pub fn validate(&self) -> Vec<SpecError> {
        validate_routing_key(&self.routing_key)
            .err()
            .into_iter()
            .collect()
    }
}

impl Fork {
    /// Namespace of the forked service and its fork pods.
    pub fn namespace_or<'a>(&'a self, sandbox_namespace: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(sandbox_namespace)
    }
}

/// Both CRDs as one multi-document YAML file (the content of `deploy/crds.yaml`).
pub fn crd_yaml() -> String {
    let mut out = String::from(
        "# Generated from redirect-agent/src/crd.rs (redirect_agent::crd::crd_yaml); do not edit.\n",
    );
    for (i, crd) in [Sandbox::crd(), RouteGroup::crd()].iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&yaml_serde::to_string(crd).expect("a CRD always serialises"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str) -> SandboxSpec {
        SandboxSpec {
            routing_key: key.into(),
            forks: vec![Fork {
                service: "checkout".into(),
                namespace: None,
                selector: [("app".to_string(), "checkout-fx".to_string())].into(),
            }],
            fallback: None,
            ttl: None,
        }
    }

    #[test]
    fn routing_keys_of_safe_characters_up_to_128_are_valid() {
        for key in ["feature-x", "a", "PR_1234.v2~rc", &"k".repeat(128)] {
            assert_eq!(validate_routing_key(key), Ok(()), "{key}");
        }
    }

    #[test]
    fn routing_keys_that_are_empty_too_long_or_unsafe_are_rejected() {
        for key in [
            "",
            &"k".repeat(129),
            "feature x",
            "a,b",
            "a=b",
            "ключ",
            "a;b",
        ] {
            assert!(
                validate_routing_key(key).is_err(),
                "{key:?} should be rejected"
            );
        }
    }

    #[test]
    fn ttl_accepts_go_durations_and_rejects_the_rest() {
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ttl("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "0s", "2", "2d", "-1h", "soon"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn a_valid_sandbox_has_no_problems_and_falls_back_to_unavailable_by_default() {
        let s = spec("feature-x");
        assert!(s.validate().is_empty());
        assert_eq!(s.fallback(), Fallback::Unavailable);
    }

    #[test]
    fn sandbox_problems_are_all_reported() {
        let mut s = spec("bad key");
        s.ttl = Some("forever".into());
        s.forks.push(Fork {
            service: "cart".into(),
            ..Default::default()
        });
        s.forks.push(s.forks[0].clone());
        let labels: Vec<_> = s.validate().iter().map(SpecError::metric_label).collect();
        assert_eq!(
            labels,
            [
                "invalid_routing_key",
                "invalid_ttl",
                "empty_fork_selector",
                "duplicate_fork"
            ]
        );
    }

    #[test]
    fn sandbox_yaml_uses_camel_case_and_optional_fields() {
        let s: SandboxSpec = yaml_serde::from_str(
            "routingKey: feature-x\nfallback: Baseline\nttl: 2h\nforks:\n- service: checkout\n  selector: {app: checkout-fx}\n",
        )
        .unwrap();
        assert_eq!(s.routing_key, "feature-x");
        assert_eq!(s.fallback(), Fallback::Baseline);
        assert_eq!(s.ttl(), Some(Duration::from_secs(7200)));
        assert_eq!(s.forks[0].namespace_or("team-a"), "team-a");
    }

    fn crd_docs() -> Vec<yaml_serde::Value> {
        yaml_serde::Deserializer::from_str(&crd_yaml())
            .map(|d| yaml_serde::Value::deserialize(d).unwrap())
            .collect()
    }

    fn schema(doc: &yaml_serde::Value) -> &yaml_serde::Value {
        &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    }

    /// Paths of properties without a description.
    fn undescribed(schema: &yaml_serde::Value, path: &str, out: &mut Vec<String>) {
        if let Some(props) = schema["properties"].as_mapping() {
            for (name, prop) in props {
                let path = format!("{path}.{}", name.as_str().unwrap());
                if prop["description"].as_str().is_none_or(str::is_empty) {
                    out.push(path.clone());
                }
                undescribed(prop, &path, out);
            }
        }
        if !schema["items"].is_null() {
            undescribed(&schema["items"], &format!("{path}[]"), out);
        }
    }

    #[test]
    fn every_field_of_both_crds_has_a_description_for_kubectl_explain() {
        for doc in crd_docs() {
            let mut missing = Vec::new();
            undescribed(schema(&doc), "", &mut missing);
            assert!(
                missing.is_empty(),
                "{}: {missing:?}",
                doc["metadata"]["name"].as_str().unwrap()
            );
        }
    }

    #[test]
    fn both_crds_have_a_status_subresource_and_printer_columns() {
        let docs = crd_docs();
        let columns = |d: &yaml_serde::Value| -> Vec<String> {
            d["spec"]["versions"][0]["additionalPrinterColumns"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            columns(&docs[0]),
            ["Key", "Forks", "Ready", "Endpoints", "TTL", "Age"]
        );
        assert_eq!(columns(&docs[1]), ["Key", "Sandboxes", "Ready", "Age"]);
        for d in &docs {
            assert!(d["spec"]["versions"][0]["subresources"]["status"].is_mapping());
            let conditions = &schema(d)["properties"]["status"]["properties"]["conditions"];
            assert_eq!(conditions["x-kubernetes-list-type"], "map");
        }
        let status = &schema(&docs[0])["properties"]["status"]["properties"];
        for field in [
            "conditions",
            "observedGeneration",
            "forks",
            "forkCount",
            "readyEndpoints",
        ] {
            assert!(!status[field].is_null(), "status.{field}");
        }
    }

    #[test]
    fn cel_rules_reject_duplicate_forks_empty_selectors_and_zero_ttls() {
        let docs = crd_docs();
        let spec = &schema(&docs[0])["properties"]["spec"];
        let rules = |v: &yaml_serde::Value| -> Vec<String> {
            v["x-kubernetes-validations"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|r| r["rule"].as_str().unwrap().to_string())
                .collect()
        };
        let spec_rules = rules(spec);
        assert!(
            spec_rules.iter().any(|r| r.contains("exists_one")),
            "{spec_rules:?}"
        );
        assert!(spec_rules.iter().any(|r| r.contains("duration(self.ttl)")));
        // `namespace` is a CEL reserved word: it must be escaped.
        assert!(spec_rules.iter().all(|r| !r.contains(".namespace")));
        assert_eq!(
            rules(&spec["properties"]["forks"]["items"]),
            ["size(self.selector) > 0"]
        );
        // The list and its strings are bounded, so the API server can bound the rules' cost.
        assert_eq!(spec["properties"]["forks"]["maxItems"], 64);
    }

    #[test]
    fn crd_yaml_holds_both_namespaced_crds_with_key_validation() {
        let yaml = crd_yaml();
        let docs: Vec<yaml_serde::Value> = yaml_serde::Deserializer::from_str(&yaml)
            .map(|d| yaml_serde::Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        let names: Vec<_> = docs
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["sandboxes.redirect.dev", "routegroups.redirect.dev"]
        );
        for d in &docs {
            assert_eq!(d["spec"]["scope"], "Namespaced");
            let props = &d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                ["properties"];
            assert_eq!(props["routingKey"]["pattern"], ROUTING_KEY_PATTERN);
        }
        assert!(yaml.contains(TTL_PATTERN));
    }
}
