//! Installing: the kustomize base (`kubectl apply -k deploy`) and the Helm chart
//! (deploy/helm/redirect) render the same objects, those objects are what docs/install.md
//! says, and the chart's values take effect.
//!
//! Renders with `kubectl kustomize` and `helm template`, found at `$REDIRECT_KUBECTL` /
//! `$REDIRECT_HELM` (set by `cargo xtask test`, which installs both into target/tools/bin;
//! a tool named there must work), else target/tools/bin, else `kubectl` on the PATH. A test
//! whose tool is missing prints SKIP and passes; `cargo xtask tools` installs them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        batch::v1::Job,
        core::v1::{Container, EnvVar, Namespace, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

const NS: &str = "redirect-system";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("deploy/helm/redirect")
}

// ---------------------------------------------------------------------------------------------
// Tools and rendering

/// `$env` if set (then it must work), else target/tools/bin/`name`, else `name` on the PATH
/// when `on_path`.
fn tool(env: &str, name: &str, on_path: bool) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let installed = root().join("target/tools/bin").join(name);
    if installed.is_file() {
        return Some(installed);
    }
    let runs = Command::new(name)
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    (on_path && runs).then(|| PathBuf::from(name))
}

fn kubectl() -> Option<PathBuf> {
    tool("REDIRECT_KUBECTL", "kubectl", true)
}

fn helm() -> Option<PathBuf> {
    tool("REDIRECT_HELM", "helm", false)
}

/// `found`, or `None` after printing `SKIP <test>` naming the missing tool `name`.
fn installed_or_skip(test: &str, name: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_none() {
        redirect_tests::skip(
            test,
            format!(
                "{name} not installed (`cargo xtask tools` installs helm and kubectl into \
                 target/tools/bin)"
            ),
        );
    }
    found
}

fn kubectl_or_skip(test: &str) -> Option<PathBuf> {
    installed_or_skip(test, "kubectl", kubectl())
}

fn helm_or_skip(test: &str) -> Option<PathBuf> {
    installed_or_skip(test, "helm", helm())
}

/// Both tools, or a SKIP line naming the missing one.
fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    Some((kubectl_or_skip(test)?, helm_or_skip(test)?))
}

fn output(c: &mut Command) -> String {
    let shown = format!("{c:?}");
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubectl kustomize deploy/<dir>`.
fn kustomize(kubectl: &Path, dir: &str) -> Rendered {
    Rendered::parse(&output(
        Command::new(kubectl).arg("kustomize").arg(root().join(dir)),
    ))
}

/// `helm template redirect deploy/helm/redirect -n redirect-system --include-crds ARGS`.
fn helm_template(helm: &Path, args: &[&str]) -> Rendered {
    Rendered::parse(&output(
        Command::new(helm)
            .args(["template", "redirect"])
            .arg(chart())
            .args(["--namespace", NS, "--include-crds"])
            .args(args),
    ))
}

/// Rendered objects by (kind, name).
struct Rendered {
    objects: BTreeMap<(String, String), Value>,
}

impl Rendered {
    fn parse(yaml: &str) -> Rendered {
        let mut objects = BTreeMap::new();
        for doc in yaml_serde::Deserializer::from_str(yaml) {
            let v: Value = yaml_serde::from_value(
                <yaml_serde::Value as serde::Deserialize>::deserialize(doc).unwrap(),
            )
            .unwrap();
            if v.is_null() {
                continue;
            }
            let key = (
                v["kind"].as_str().unwrap().to_string(),
                v["metadata"]["name"].as_str().unwrap().to_string(),
            );
            assert!(
                objects.insert(key.clone(), v).is_none(),
                "{key:?} rendered twice"
            );
        }
        Rendered { objects }
    }

    fn raw(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .get(&(kind.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", self.keys()))
    }

    fn get<T: DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        serde_json::from_value(self.raw(kind, name).clone())
            .unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
    }

    fn keys(&self) -> BTreeSet<(String, String)> {
        self.objects.keys().cloned().collect()
    }

    fn is_hook(&self, key: &(String, String)) -> bool {
        !self.objects[key]["metadata"]["annotations"]["helm.sh/hook"].is_null()
    }

    fn agent(&self) -> DaemonSet {
        self.get("DaemonSet", "redirect-agent")
    }

    fn pod_specs(&self) -> Vec<(String, PodSpec)> {
        let mut out = Vec::new();
        for (kind, name) in self.keys() {
            let spec = match kind.as_str() {
                "DaemonSet" => {
                    self.get::<DaemonSet>(&kind, &name)
                        .spec
                        .unwrap()
                        .template
                        .spec
                }
                "Deployment" => {
                    self.get::<Deployment>(&kind, &name)
                        .spec
                        .unwrap()
                        .template
                        .spec
                }
                "Job" => self.get::<Job>(&kind, &name).spec.unwrap().template.spec,
                _ => continue,
            };
            out.push((format!("{kind} {name}"), spec.unwrap()));
        }
        out
    }
}

fn pod(ds: &DaemonSet) -> PodSpec {
    ds.spec.clone().unwrap().template.spec.unwrap()
}

fn container(pod: &PodSpec, name: &str) -> Container {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
        .clone()
}

fn env<'a>(c: &'a Container, name: &str) -> &'a EnvVar {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{} has no env {name}", c.name))
}

fn env_value(c: &Container, name: &str) -> String {
    env(c, name).value.clone().unwrap_or_default()
}

/// Where two JSON values differ, as paths with both sides.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<_> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (l, r) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                differences(l, r, &format!("{path}.{k}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                differences(l, r, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} != {b}")),
        _ => {}
    }
}

/// Asserts that the typed values are equal, naming every differing path.
fn assert_same<T: serde::Serialize>(what: &str, a: &T, b: &T) {
    let mut diff = Vec::new();
    differences(
        &serde_json::to_value(a).unwrap(),
        &serde_json::to_value(b).unwrap(),
        "",
        &mut diff,
    );
    assert!(diff.is_empty(), "{what} differs:\n{}", diff.join("\n"));
}

/// RBAC rules flattened to (apiGroup, resource, resourceNames) -> verbs.
fn grants(rules: &[PolicyRule]) -> BTreeMap<(String, String, Vec<String>), BTreeSet<String>> {
    let mut out: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                let names = r.resource_names.clone().unwrap_or_default();
                out.entry((g.clone(), res.clone(), names))
                    .or_default()
                    .extend(r.verbs.iter().cloned());
            }
        }
    }
    out
}

fn expect_grants(
    want: &[(&str, &str, &[&str])],
) -> BTreeMap<(String, String, Vec<String>), BTreeSet<String>> {
    let mut out: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
    for (g, res, verbs) in want {
        out.entry((g.to_string(), res.to_string(), Vec::new()))
            .or_default()
            .extend(verbs.iter().map(|v| v.to_string()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Both renderings

#[test]
fn kustomize_base_and_helm_chart_render_the_same_objects() {
    let Some((kubectl, helm)) = tools("kustomize_base_and_helm_chart_render_the_same_objects")
    else {
        return;
    };
    let k = kustomize(&kubectl, "deploy");
    let h = helm_template(&helm, &[]);

    // Same objects; the Namespace is the kustomize base's only (Helm: --create-namespace), the
    // uninstall hook the chart's only (kustomize: deploy/cleanup).
    let mut k_keys = k.keys();
    k_keys.remove(&("Namespace".to_string(), NS.to_string()));
    let h_keys: BTreeSet<_> = h.keys().into_iter().filter(|key| !h.is_hook(key)).collect();
    assert_eq!(k_keys, h_keys, "the two renderings hold different objects");

    for (kind, name) in &k_keys {
        let what = format!("{kind} {name}");
        match kind.as_str() {
            "DaemonSet" => assert_same(
                &what,
                &k.get::<DaemonSet>(kind, name).spec,
                &h.get::<DaemonSet>(kind, name).spec,
            ),
            "Deployment" => assert_same(
                &what,
                &k.get::<Deployment>(kind, name).spec,
                &h.get::<Deployment>(kind, name).spec,
            ),
            "ClusterRole" => assert_same(
                &what,
                &k.get::<ClusterRole>(kind, name).rules,
                &h.get::<ClusterRole>(kind, name).rules,
            ),
            "Role" => {
                let (a, b) = (k.get::<Role>(kind, name), h.get::<Role>(kind, name));
                assert_same(
                    &what,
                    &(a.metadata.namespace, a.rules),
                    &(b.metadata.namespace, b.rules),
                );
            }
            "ClusterRoleBinding" => {
                let (a, b) = (
                    k.get::<ClusterRoleBinding>(kind, name),
                    h.get::<ClusterRoleBinding>(kind, name),
                );
                assert_same(&what, &(a.role_ref, a.subjects), &(b.role_ref, b.subjects));
            }
            "RoleBinding" => {
                let (a, b) = (
                    k.get::<RoleBinding>(kind, name),
                    h.get::<RoleBinding>(kind, name),
                );
                assert_same(
                    &what,
                    &(a.metadata.namespace, a.role_ref, a.subjects),
                    &(b.metadata.namespace, b.role_ref, b.subjects),
                );
            }
            "ServiceAccount" => assert_same(
                &what,
                &k.get::<ServiceAccount>(kind, name).metadata.namespace,
                &h.get::<ServiceAccount>(kind, name).metadata.namespace,
            ),
            "CustomResourceDefinition" => assert_same(
                &what,
                &k.get::<CustomResourceDefinition>(kind, name).spec,
                &h.get::<CustomResourceDefinition>(kind, name).spec,
            ),
            other => panic!("{what}: no comparison for kind {other}"),
        }
    }

    // The uninstall step is the same DaemonSet either way.
    let cleanup = kustomize(&kubectl, "deploy/cleanup");
    assert_same(
        "DaemonSet redirect-cleanup",
        &cleanup
            .get::<DaemonSet>("DaemonSet", "redirect-cleanup")
            .spec,
        &h.get::<DaemonSet>("DaemonSet", "redirect-cleanup").spec,
    );
}

/// Each kind the renderings may hold, round-tripped through its k8s-openapi type.
fn round_trip(kind: &str, v: &Value) -> Value {
    fn rt<T: DeserializeOwned + serde::Serialize>(v: &Value) -> Value {
        serde_json::to_value(serde_json::from_value::<T>(v.clone()).unwrap()).unwrap()
    }
    match kind {
        "Namespace" => rt::<Namespace>(v),
        "CustomResourceDefinition" => rt::<CustomResourceDefinition>(v),
        "ServiceAccount" => rt::<ServiceAccount>(v),
        "ClusterRole" => rt::<ClusterRole>(v),
        "ClusterRoleBinding" => rt::<ClusterRoleBinding>(v),
        "Role" => rt::<Role>(v),
        "RoleBinding" => rt::<RoleBinding>(v),
        "DaemonSet" => rt::<DaemonSet>(v),
        "Deployment" => rt::<Deployment>(v),
        "Job" => rt::<Job>(v),
        other => panic!("unexpected kind {other} in the install manifests"),
    }
}

#[test]
fn every_rendered_field_is_a_kubernetes_api_field() {
    let Some((kubectl, helm)) = tools("every_rendered_field_is_a_kubernetes_api_field") else {
        return;
    };
    // A misspelt or misplaced field parses (and is dropped by the API server) without a word:
    // a round trip through the typed API objects must lose nothing.
    let renderings = [
        ("kustomize deploy", kustomize(&kubectl, "deploy")),
        (
            "kustomize deploy/cleanup",
            kustomize(&kubectl, "deploy/cleanup"),
        ),
        ("helm defaults", helm_template(&helm, &[])),
        (
            "helm unprivileged, admin on the node IP",
            helm_template(
                &helm,
                &[
                    "--set",
                    "agent.privileged=false",
                    "--set",
                    "agent.adminListen=node",
                    "--set",
                    "agent.adminTokenSecret=redirect-admin-token",
                ],
            ),
        ),
    ];
    for (what, r) in &renderings {
        for ((kind, name), v) in &r.objects {
            let mut diff = Vec::new();
            differences(v, &round_trip(kind, v), "", &mut diff);
            assert!(
                diff.is_empty(),
                "{what}: {kind} {name} has fields the API does not know:\n{}",
                diff.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent DaemonSet (checked on the kustomize base; the chart renders the same, above)

#[test]
fn agent_runs_on_the_host_network_with_bpffs_and_the_cgroup_root_from_the_host() {
    let Some(kubectl) = kubectl_or_skip(
        "agent_runs_on_the_host_network_with_bpffs_and_the_cgroup_root_from_the_host",
    ) else {
        return;
    };
    let ds = kustomize(&kubectl, "deploy").agent();
    let pod = pod(&ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.service_account_name.as_deref(), Some("redirect-agent"));
    let agent = container(&pod, "agent");
    assert_eq!(
        agent.image.as_deref(),
        Some(format!("ghcr.io/redirect-dev/redirect-agent:{VERSION}").as_str())
    );
    assert_eq!(
        agent.args.as_deref(),
        Some(&["run".into(), "--source".into(), "kube".into()][..])
    );

    let field = |name: &str| {
        env(&agent, name)
            .value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("NODE_NAME").as_deref(), Some("spec.nodeName"));
    assert_eq!(field("NODE_IP").as_deref(), Some("status.hostIP"));
    assert_eq!(env_value(&agent, "REDIRECT_ROUTER_V4"), "$(NODE_IP):15001");
    // $(NODE_IP) expands only when NODE_IP is defined earlier in the list.
    let position = |name: &str| agent.env.iter().flatten().position(|e| e.name == name);
    assert!(position("NODE_IP") < position("REDIRECT_ROUTER_V4"));
    assert_eq!(env_value(&agent, "REDIRECT_BAGGAGE_KEYS"), "routing-key");
    assert_eq!(env_value(&agent, "REDIRECT_TRACESTATE_KEYS"), "routing-key");
    assert_eq!(env_value(&agent, "REDIRECT_KEY_HEADERS"), "x-routing-key");
    assert_eq!(env_value(&agent, "REDIRECT_LOG"), "info");

    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path = |volume: &str| {
        volumes
            .iter()
            .find(|v| v.name == volume)
            .and_then(|v| v.host_path.clone())
            .unwrap_or_else(|| panic!("volume {volume} is not a hostPath"))
            .path
    };
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(host_path(&bpffs.name), "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    let cgroup_root = env_value(&agent, "REDIRECT_CGROUP_ROOT");
    let cgroup = mounts.iter().find(|m| m.mount_path == cgroup_root).unwrap();
    assert_eq!(host_path(&cgroup.name), "/sys/fs/cgroup");
    assert_eq!(cgroup.read_only, Some(true));
}

fn http_probe(p: &Option<Probe>) -> (Option<String>, String, String) {
    let g = p
        .as_ref()
        .and_then(|p| p.http_get.clone())
        .expect("an httpGet probe");
    let port = match g.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
    };
    (g.host, g.path.unwrap_or_default(), port)
}

#[test]
fn agent_probes_reach_the_admin_endpoint_on_the_loopback_only() {
    let Some((kubectl, helm)) = tools("agent_probes_reach_the_admin_endpoint_on_the_loopback_only")
    else {
        return;
    };
    let agent = container(&pod(&kustomize(&kubectl, "deploy").agent()), "agent");
    assert_eq!(env_value(&agent, "REDIRECT_ADMIN_ADDR"), "127.0.0.1:9967");
    assert_eq!(env_value(&agent, "REDIRECT_ADMIN"), "http://127.0.0.1:9967");
    let local = |path: &str| {
        (
            Some("127.0.0.1".to_string()),
            path.to_string(),
            "9967".to_string(),
        )
    };
    assert_eq!(http_probe(&agent.liveness_probe), local("/healthz"));
    assert_eq!(http_probe(&agent.readiness_probe), local("/readyz"));
    assert_eq!(http_probe(&agent.startup_probe), local("/healthz"));
    // No container port: with host network it would be a host port, and the surge pod of a
    // rollout could not be scheduled beside the old one.
    assert!(agent.ports.is_none(), "{:?}", agent.ports);
    // On loopback the agent needs neither the remote flag nor a token.
    for name in ["REDIRECT_ADMIN_ALLOW_REMOTE", "REDIRECT_ADMIN_TOKEN_FILE"] {
        assert!(
            !agent.env.iter().flatten().any(|e| e.name == name),
            "{name} set on loopback"
        );
    }

    // On the node's address (for a metrics scrape), the probes go to the pod IP = node IP and
    // need no token (the agent serves them without); everything else needs the Secret's token.
    let node = helm_template(
        &helm,
        &[
            "--set",
            "agent.adminListen=node",
            "--set",
            "agent.adminPort=9100",
            "--set",
            "agent.adminTokenSecret=redirect-admin-token",
        ],
    );
    let spec = pod(&node.agent());
    let agent = container(&spec, "agent");
    assert_eq!(env_value(&agent, "REDIRECT_ADMIN_ADDR"), "$(NODE_IP):9100");
    assert_eq!(
        env_value(&agent, "REDIRECT_ADMIN"),
        "http://$(NODE_IP):9100"
    );
    assert_eq!(env_value(&agent, "REDIRECT_ADMIN_ALLOW_REMOTE"), "true");
    let token_file = env_value(&agent, "REDIRECT_ADMIN_TOKEN_FILE");
    assert_eq!(token_file, "/run/redirect/admin-token/token");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| token_file.starts_with(&format!("{}/", m.mount_path)))
        .expect("the token file is on a mount");
    assert_eq!(mount.read_only, Some(true));
    let secret = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.secret.clone())
        .expect("the token mount is a Secret");
    assert_eq!(secret.secret_name.as_deref(), Some("redirect-admin-token"));
    assert_eq!(
        http_probe(&agent.readiness_probe),
        (None, "/readyz".to_string(), "9100".to_string())
    );
    assert_eq!(
        http_probe(&agent.liveness_probe),
        (None, "/healthz".to_string(), "9100".to_string())
    );
}

#[test]
fn agent_adds_only_the_capabilities_it_needs_and_is_privileged_only_for_bidirectional_bpffs() {
    let Some((kubectl, helm)) = tools("agent_adds_only_the_capabilities_it_needs") else {
        return;
    };
    let check = |pod: &PodSpec, privileged: bool| {
        let agent = container(pod, "agent");
        let sc = agent.security_context.clone().unwrap();
        let caps = sc.capabilities.clone().unwrap();
        let added: BTreeSet<_> = caps.add.clone().unwrap().into_iter().collect();
        let want: BTreeSet<_> = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]
            .map(String::from)
            .into();
        assert_eq!(added, want);
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(sc.privileged, Some(privileged));
        // The API rejects allowPrivilegeEscalation=false beside privileged or SYS_ADMIN.
        assert_ne!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(sc.app_armor_profile.unwrap().type_, "Unconfined");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let bpffs = agent
            .volume_mounts
            .unwrap()
            .into_iter()
            .find(|m| m.mount_path == "/sys/fs/bpf")
            .unwrap();
        let want = if privileged {
            "Bidirectional"
        } else {
            "HostToContainer"
        };
        assert_eq!(bpffs.mount_propagation.as_deref(), Some(want));
    };
    check(&pod(&kustomize(&kubectl, "deploy").agent()), true);
    let unprivileged = helm_template(&helm, &["--set", "agent.privileged=false"]);
    check(&pod(&unprivileged.agent()), false);
    let cleanup = pod(&unprivileged.get("DaemonSet", "redirect-cleanup"));
    let sc = container(&cleanup, "cleanup").security_context.unwrap();
    assert_eq!(sc.privileged, Some(false));

    // Kubernetes allows Bidirectional propagation in privileged containers only: no rendering
    // may ask for it elsewhere.
    for r in [
        kustomize(&kubectl, "deploy"),
        helm_template(&helm, &[]),
        unprivileged,
    ] {
        for (what, pod) in r.pod_specs() {
            for c in pod
                .containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
            {
                let privileged = c
                    .security_context
                    .as_ref()
                    .and_then(|s| s.privileged)
                    .unwrap_or(false);
                for m in c.volume_mounts.iter().flatten() {
                    assert!(
                        privileged || m.mount_propagation.as_deref() != Some("Bidirectional"),
                        "{what}: container {} mounts {} Bidirectional without privileged",
                        c.name,
                        m.mount_path
                    );
                }
            }
        }
    }
}

#[test]
fn agent_rolls_out_surge_first_and_outlasts_its_drain() {
    let Some(kubectl) = kubectl_or_skip("agent_rolls_out_surge_first_and_outlasts_its_drain")
    else {
        return;
    };
    let ds = kustomize(&kubectl, "deploy").agent();
    let strategy = ds.spec.clone().unwrap().update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int;
    assert_eq!(rolling.max_surge, Some(Int(1)));
    assert_eq!(rolling.max_unavailable, Some(Int(0)));
    let pod = pod(&ds);
    // The agent drains for up to 30 s after SIGTERM.
    assert!(pod.termination_grace_period_seconds.unwrap() >= 30);
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.clone().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
    assert!(tolerations[0].key.is_none() && tolerations[0].effect.is_none());
    let resources = container(&pod, "agent").resources.unwrap();
    assert!(
        resources
            .requests
            .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory"))
    );
    assert!(resources.limits.is_some_and(|l| l.contains_key("memory")));
}

// ---------------------------------------------------------------------------------------------
// RBAC

#[test]
fn rbac_grants_exactly_the_documented_verbs_and_no_wildcard() {
    let Some((kubectl, helm)) = tools("rbac_grants_exactly_the_documented_verbs_and_no_wildcard")
    else {
        return;
    };
    let k = kustomize(&kubectl, "deploy");
    let agent: ClusterRole = k.get("ClusterRole", "redirect-agent");
    assert_eq!(
        grants(&agent.rules.unwrap()),
        expect_grants(&[
            ("", "services", &["get", "list", "watch"]),
            ("", "pods", &["get", "list", "watch"]),
            (
                "discovery.k8s.io",
                "endpointslices",
                &["get", "list", "watch"]
            ),
            ("redirect.dev", "sandboxes", &["get", "list", "watch"]),
            ("redirect.dev", "routegroups", &["get", "list", "watch"]),
        ])
    );
    let controller: ClusterRole = k.get("ClusterRole", "redirect-controller");
    assert_eq!(
        grants(&controller.rules.unwrap()),
        expect_grants(&[
            (
                "redirect.dev",
                "sandboxes",
                &["get", "list", "watch", "delete"]
            ),
            ("redirect.dev", "routegroups", &["get", "list", "watch"]),
            ("redirect.dev", "sandboxes/status", &["patch"]),
            ("redirect.dev", "routegroups/status", &["patch"]),
            ("", "services", &["list", "watch"]),
            ("", "pods", &["list", "watch"]),
            (
                "discovery.k8s.io",
                "endpointslices",
                &["list", "watch", "create", "update", "delete"],
            ),
            ("events.k8s.io", "events", &["create", "patch"]),
        ])
    );
    let lease: Role = k.get("Role", "redirect-controller-lease");
    assert_eq!(lease.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(
        grants(&lease.rules.unwrap()),
        expect_grants(&[(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"]
        )])
    );
    for (binding, role, account) in [
        ("redirect-agent", "redirect-agent", "redirect-agent"),
        (
            "redirect-controller",
            "redirect-controller",
            "redirect-controller",
        ),
    ] {
        let b: ClusterRoleBinding = k.get("ClusterRoleBinding", binding);
        assert_eq!(
            (b.role_ref.kind.as_str(), b.role_ref.name.as_str()),
            ("ClusterRole", role)
        );
        let s = &b.subjects.unwrap()[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str()),
            ("ServiceAccount", account)
        );
        assert_eq!(s.namespace.as_deref(), Some(NS));
    }
    let b: RoleBinding = k.get("RoleBinding", "redirect-controller-lease");
    assert_eq!(b.role_ref.name, "redirect-controller-lease");
    assert_eq!(b.subjects.unwrap()[0].name, "redirect-controller");

    // The uninstall hook's Job reads one DaemonSet's status.
    let h = helm_template(&helm, &[]);
    let cleanup: Role = h.get("Role", "redirect-cleanup");
    let mut want = BTreeMap::new();
    want.insert(
        (
            "apps".to_string(),
            "daemonsets".to_string(),
            vec!["redirect-cleanup".to_string()],
        ),
        ["get", "list", "watch"].map(String::from).into(),
    );
    assert_eq!(grants(&cleanup.rules.unwrap()), want);

    // No wildcard in any rule of any rendering, hooks included.
    for r in [k, h] {
        for ((kind, name), v) in &r.objects {
            for rule in v["rules"].as_array().into_iter().flatten() {
                for field in [
                    "apiGroups",
                    "resources",
                    "verbs",
                    "resourceNames",
                    "nonResourceURLs",
                ] {
                    for item in rule[field].as_array().into_iter().flatten() {
                        assert!(
                            !item.as_str().unwrap_or("").contains('*'),
                            "{kind} {name}: wildcard in {field}: {rule}"
                        );
                    }
                }
            }
            assert!(
                v["aggregationRule"].is_null(),
                "{kind} {name} aggregates other roles"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The chart's values

#[test]
fn chart_values_change_the_image_cgroup_root_router_port_and_key_names() {
    let Some(helm) =
        helm_or_skip("chart_values_change_the_image_cgroup_root_router_port_and_key_names")
    else {
        return;
    };
    let r = helm_template(
        &helm,
        &[
            "--set",
            "image.repository=localhost/redirect-agent",
            "--set",
            "image.tag=dev",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "agent.cgroupRoot=/sys/fs/cgroup/unified",
            "--set",
            "agent.routerPort=15100",
            "--set",
            "keys.baggage={routing-key,sd-routing-key}",
            "--set",
            "keys.tracestate={rk}",
            "--set",
            "keys.headers={x-routing-key,mirrord-session}",
            "--set",
            "logLevel=debug",
            "--set",
            "controller.replicas=3",
            "--set",
            "agent.priorityClassName=redirect-critical",
            "--set-json",
            r#"agent.tolerations=[{"key":"dedicated","operator":"Equal","value":"edge","effect":"NoSchedule"}]"#,
            "--set-json",
            r#"agent.nodeSelector={"redirect.dev/node":"yes"}"#,
            "--set-json",
            r#"agent.resources={"requests":{"cpu":"200m","memory":"256Mi"},"limits":{"memory":"1Gi"}}"#,
            "--set-json",
            r#"agent.extraEnv=[{"name":"REDIRECT_LOG_JSON","value":"true"}]"#,
        ],
    );
    let pod = pod(&r.agent());
    let agent = container(&pod, "agent");
    assert_eq!(agent.image.as_deref(), Some("localhost/redirect-agent:dev"));
    assert_eq!(agent.image_pull_policy.as_deref(), Some("Never"));
    assert_eq!(env_value(&agent, "REDIRECT_ROUTER_V4"), "$(NODE_IP):15100");
    assert_eq!(
        env_value(&agent, "REDIRECT_BAGGAGE_KEYS"),
        "routing-key,sd-routing-key"
    );
    assert_eq!(env_value(&agent, "REDIRECT_TRACESTATE_KEYS"), "rk");
    assert_eq!(
        env_value(&agent, "REDIRECT_KEY_HEADERS"),
        "x-routing-key,mirrord-session"
    );
    assert_eq!(env_value(&agent, "REDIRECT_LOG"), "debug");
    assert_eq!(env_value(&agent, "REDIRECT_LOG_JSON"), "true");
    let cgroup = pod
        .volumes
        .clone()
        .unwrap()
        .into_iter()
        .find(|v| v.name == "cgroup")
        .unwrap();
    assert_eq!(cgroup.host_path.unwrap().path, "/sys/fs/cgroup/unified");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("redirect-critical")
    );
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    assert_eq!(pod.node_selector.unwrap()["redirect.dev/node"], "yes");
    let requests = agent.resources.unwrap().requests.unwrap();
    assert_eq!(requests["cpu"].0, "200m");

    let controller: Deployment = r.get("Deployment", "redirect-controller");
    let spec = controller.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let c = container(&spec.template.spec.unwrap(), "controller");
    assert_eq!(c.image.as_deref(), Some("localhost/redirect-agent:dev"));
    assert_eq!(env_value(&c, "REDIRECT_LOG"), "debug");
    let cleanup = pod_of(&r, "redirect-cleanup");
    assert_eq!(
        container(&cleanup, "cleanup").image.as_deref(),
        Some("localhost/redirect-agent:dev")
    );

    // A digest wins over the tag.
    let digest = format!("sha256:{}", "ab".repeat(32));
    let r = helm_template(&helm, &["--set", &format!("image.digest={digest}")]);
    let agent = container(&pod_of(&r, "redirect-agent"), "agent");
    assert_eq!(
        agent.image,
        Some(format!("ghcr.io/redirect-dev/redirect-agent@{digest}"))
    );
}

fn pod_of(r: &Rendered, daemonset: &str) -> PodSpec {
    pod(&r.get("DaemonSet", daemonset))
}

#[test]
fn chart_refuses_values_that_cannot_work() {
    let Some(helm) = helm_or_skip("chart_refuses_values_that_cannot_work") else {
        return;
    };
    for (set, says) in [
        (
            "keys.headers=null",
            "keys.headers must name at least one key",
        ),
        (
            "agent.adminListen=everywhere",
            "agent.adminListen must be loopback or node",
        ),
        (
            "agent.adminListen=node",
            "agent.adminListen=node needs agent.adminTokenSecret",
        ),
    ] {
        let out = Command::new(&helm)
            .args(["template", "redirect"])
            .arg(chart())
            .args(["--namespace", NS, "--set", set])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--set {set} rendered");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "--set {set}: {err}");
    }
}

#[test]
fn helm_lint_passes() {
    let Some(helm) = helm_or_skip("helm_lint_passes") else {
        return;
    };
    for extra in [&[][..], &["--set", "agent.privileged=false"][..]] {
        let lint = output(
            Command::new(&helm)
                .args(["lint", "--strict"])
                .arg(chart())
                .args(extra),
        );
        assert!(lint.contains("0 chart(s) failed"), "{lint}");
    }
}

// ---------------------------------------------------------------------------------------------
// Uninstall

#[test]
fn uninstall_hook_cleans_every_node_then_removes_itself() {
    let Some(helm) = helm_or_skip("uninstall_hook_cleans_every_node_then_removes_itself") else {
        return;
    };
    let r = helm_template(&helm, &[]);
    let hooks: Vec<_> = r.keys().into_iter().filter(|k| r.is_hook(k)).collect();
    let weight = |kind: &str, name: &str| -> i32 {
        let a = &r.raw(kind, name)["metadata"]["annotations"];
        assert_eq!(a["helm.sh/hook"], "post-delete", "{kind} {name}");
        let policy = a["helm.sh/hook-delete-policy"].as_str().unwrap();
        assert!(
            policy.contains("hook-succeeded") && policy.contains("before-hook-creation"),
            "{kind} {name}: {policy}"
        );
        a["helm.sh/hook-weight"].as_str().unwrap().parse().unwrap()
    };
    for (kind, name) in &hooks {
        weight(kind, name);
    }
    assert_eq!(hooks.len(), 5, "{hooks:?}");
    // Account and role first, then the DaemonSet, then the Job that Helm waits for.
    let (sa, ds, job) = (
        weight("ServiceAccount", "redirect-cleanup"),
        weight("DaemonSet", "redirect-cleanup"),
        weight("Job", "redirect-cleanup-wait"),
    );
    assert!(sa < ds && ds < job, "hook order {sa} {ds} {job}");
    assert!(weight("Role", "redirect-cleanup") < ds);
    assert!(weight("RoleBinding", "redirect-cleanup") < ds);

    let pod = pod_of(&r, "redirect-cleanup");
    let agent_pod = pod_of(&r, "redirect-agent");
    let cleanup = container(&pod, "cleanup");
    assert!(
        pod.init_containers
            .iter()
            .flatten()
            .any(|c| c.name == "cleanup")
    );
    assert_eq!(cleanup.args, Some(vec!["cleanup".to_string()]));
    assert_eq!(cleanup.image, container(&agent_pod, "agent").image);
    assert_eq!(
        cleanup.security_context,
        container(&agent_pod, "agent").security_context
    );
    let bpffs = &cleanup.volume_mounts.unwrap()[0];
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    // Wherever an agent may have run.
    assert_eq!(pod.tolerations, agent_pod.tolerations);
    assert_eq!(pod.node_selector, agent_pod.node_selector);
    assert_eq!(pod.automount_service_account_token, Some(false));

    let job: Job = r.get("Job", "redirect-cleanup-wait");
    let spec = job.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    let jpod = spec.template.spec.unwrap();
    assert_eq!(
        jpod.service_account_name.as_deref(),
        Some("redirect-cleanup")
    );
    let wait = container(&jpod, "wait");
    let line = wait
        .command
        .unwrap()
        .into_iter()
        .chain(wait.args.unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        line.starts_with(
            "kubectl rollout status daemonset/redirect-cleanup --namespace=redirect-system"
        ),
        "{line}"
    );

    let off = helm_template(&helm, &["--set", "cleanup.enabled=false"]);
    assert!(off.keys().iter().all(|k| !off.is_hook(k)));
}

// ---------------------------------------------------------------------------------------------
// Files that must stay in step

#[test]
fn chart_crds_are_a_copy_of_deploy_crds() {
    let generated = std::fs::read_to_string(root().join("deploy/crds.yaml")).unwrap();
    let chart = std::fs::read_to_string(chart().join("crds/crds.yaml")).unwrap();
    assert!(
        generated == chart,
        "deploy/helm/redirect/crds/crds.yaml differs from deploy/crds.yaml: \
         cp deploy/crds.yaml deploy/helm/redirect/crds/crds.yaml"
    );
}

fn yaml_file(path: &str) -> yaml_serde::Value {
    yaml_serde::from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap()
}

#[test]
fn chart_and_image_tags_follow_the_workspace_version() {
    let chart = yaml_file("deploy/helm/redirect/Chart.yaml");
    assert_eq!(
        chart["version"].as_str(),
        Some(VERSION),
        "Chart.yaml version"
    );
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(VERSION),
        "Chart.yaml appVersion"
    );
    for k in [
        "deploy/kustomization.yaml",
        "deploy/cleanup/kustomization.yaml",
    ] {
        let images = yaml_file(k)["images"].clone();
        let agent = images
            .as_sequence()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "ghcr.io/redirect-dev/redirect-agent")
            .unwrap_or_else(|| panic!("{k}: no images entry for the agent"));
        assert_eq!(agent["newTag"].as_str(), Some(VERSION), "{k}: newTag");
    }
}

#[test]
fn example_shop_and_sandboxes_render_and_fit_the_crd() {
    let Some(kubectl) = kubectl_or_skip("example_shop_and_sandboxes_render_and_fit_the_crd") else {
        return;
    };
    let shop = kustomize(&kubectl, "deploy/examples/shop");
    for d in ["frontend", "orders", "payments", "client"] {
        let d: Deployment = shop.get("Deployment", d);
        assert_eq!(d.metadata.namespace.as_deref(), Some("shop"));
    }
    let orders: Deployment = shop.get("Deployment", "orders");
    let service_selector = shop.raw("Service", "orders")["spec"]["selector"].clone();
    for (dir, sandbox, fork, service) in [
        (
            "deploy/examples/shop/sandbox",
            "feature-x",
            "orders-feature-x",
            "orders",
        ),
        (
            "deploy/examples/shop/sandbox-payments",
            "payments-y",
            "payments-y",
            "payments",
        ),
    ] {
        let r = kustomize(&kubectl, dir);
        let s: redirect_agent::crd::Sandbox = r.get("Sandbox", sandbox);
        assert!(
            s.spec.validate().is_empty(),
            "{sandbox}: {:?}",
            s.spec.validate()
        );
        assert_eq!(s.spec.routing_key, sandbox);
        assert_eq!(s.spec.forks[0].service, service);
        // The fork's pods match the Sandbox's selector, and never the baseline Service's.
        let d: Deployment = r.get("Deployment", fork);
        let labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        for (k, v) in &s.spec.forks[0].selector {
            assert_eq!(labels.get(k), Some(v), "{fork}: label {k}");
        }
        let baseline = shop.raw("Service", service)["spec"]["selector"].clone();
        let selected = baseline
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
        assert!(
            !selected,
            "the baseline Service {service} would select the fork {fork}"
        );
    }
    assert!(orders.spec.is_some() && service_selector.is_object());
}
