//! `cargo xtask kind-test`: the Helm chart on a real (kind) cluster, end to end.
//!
//! A cluster of one control plane and two workers (cgroup v2 nodes), the locally built image
//! loaded from `target/image/redirect-agent.oci.tar` (`cargo xtask image`), redirect installed
//! with Helm, the sample shop (deploy/examples/shop) and two sandboxes; then, from the shop's
//! client pod:
//!   1. the key feature-x reaches the orders fork, whose call to payments stays on baseline;
//!      no key stays on baseline; the key payments-y reaches the payments fork over gRPC;
//!   2. deleting every agent pod fails no request;
//!   3. an image bump (the same image under a new tag) rolls out with no failed or misrouted
//!      request;
//!   4. `helm uninstall` leaves no pin on any node and no program in the kernel.
//!
//! It needs kind, a running Docker or Podman engine, the node image (or a registry to pull it
//! from), a cgroup v2 host, root (bpftool) and the image archive. When any is missing it says
//! which and exits 0, or fails with REDIRECT_REQUIRE_KIND=1 (for a CI that has them all).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    cmd::{self, workspace_root},
    tools,
};

const CLUSTER: &str = "redirect-kind-test";
const NAMESPACE: &str = "redirect-system";
const FRONTEND: &str = "http://frontend.shop.svc/";

#[derive(clap::Args)]
pub struct Options {
    /// Keep the cluster afterwards (kubeconfig: target/kind/kubeconfig); the next run replaces
    /// it.
    #[arg(long)]
    pub keep: bool,
    /// The image archive to load [default: target/image/redirect-agent.oci.tar].
    #[arg(long, env = "REDIRECT_KIND_IMAGE_ARCHIVE")]
    pub archive: Option<PathBuf>,
    /// kind node image [default: the one the installed kind defaults to].
    #[arg(long, env = "REDIRECT_KIND_NODE_IMAGE")]
    pub node_image: Option<String>,
}

pub fn run(o: &Options) -> Result<()> {
    let archive = o
        .archive
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/image/redirect-agent.oci.tar"));
    let env = match Env::discover(&archive, o.node_image.as_deref()) {
        Ok(env) => env,
        Err(missing) => return skip(&missing),
    };
    let image = image_ref(&archive)?;
    say(&format!("image {image}"));
    let cluster = match Cluster::create(&env, o.node_image.as_deref(), o.keep)? {
        Created::Yes(c) => c,
        Created::NodeImageMissing(why) => return skip(&[why]),
    };
    cluster.test(&image, &archive)
}

fn say(what: &str) {
    eprintln!("kind-test: {what}");
}

/// Prints what is missing; exits 0 unless REDIRECT_REQUIRE_KIND=1.
fn skip(missing: &[String]) -> Result<()> {
    let list = missing
        .iter()
        .map(|m| format!("  - {m}"))
        .collect::<Vec<_>>()
        .join("\n");
    if env::var("REDIRECT_REQUIRE_KIND").as_deref() == Ok("1") {
        bail!("kind-test cannot run (REDIRECT_REQUIRE_KIND=1), missing:\n{list}");
    }
    eprintln!("kind-test: SKIP, missing:\n{list}");
    Ok(())
}

/// What the test drives.
#[derive(Clone)]
struct Env {
    kind: PathBuf,
    /// `docker` or `podman`: runs `exec` on the nodes.
    engine: &'static str,
    helm: PathBuf,
    kubectl: PathBuf,
}

fn works(c: &mut Command) -> bool {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Env {
    /// Everything the test needs, or the list of what is missing.
    fn discover(archive: &Path, node_image: Option<&str>) -> Result<Env, Vec<String>> {
        let mut missing = Vec::new();
        let kind =
            env::var_os("REDIRECT_KIND").map_or_else(|| PathBuf::from("kind"), PathBuf::from);
        if !works(Command::new(&kind).arg("version")) {
            missing.push(format!(
                "kind ({}: https://kind.sigs.k8s.io, or REDIRECT_KIND=/path/to/kind)",
                kind.display()
            ));
        }
        let engine = if works(Command::new("docker").arg("info")) {
            Some("docker")
        } else if works(Command::new("podman").arg("info")) {
            // SAFETY: xtask runs one thread; set before any child starts.
            unsafe { env::set_var("KIND_EXPERIMENTAL_PROVIDER", "podman") };
            Some("podman")
        } else {
            missing.push(
                "a running container engine (`docker info` and `podman info` both fail)".into(),
            );
            None
        };
        if let (Some(engine), Some(image)) = (engine, node_image)
            && !works(Command::new(engine).args(["image", "inspect", image]))
            && !works(Command::new(engine).args(["pull", image]))
        {
            missing.push(format!(
                "the node image {image} (not local, and the pull failed)"
            ));
        }
        if !is_cgroup2("/sys/fs/cgroup") {
            missing.push("a cgroup v2 host (/sys/fs/cgroup is not cgroup2)".into());
        }
        if !archive.is_file() {
            missing.push(format!(
                "the image archive {} (build it with `cargo xtask image`)",
                archive.display()
            ));
        }
        if !cmd::is_root() || !works(Command::new("bpftool").arg("version")) {
            missing.push(
                "root and bpftool on the host (the uninstall check lists the kernel's programs)"
                    .into(),
            );
        }
        let tools = match tools::install() {
            Ok(t) => Some(t),
            Err(e) => {
                missing.push(format!("helm and kubectl: {e:#}"));
                None
            }
        };
        match (engine, tools) {
            (Some(engine), Some(tools)) if missing.is_empty() => Ok(Env {
                kind,
                engine,
                helm: tools.helm,
                kubectl: tools.kubectl,
            }),
            _ => Err(missing),
        }
    }
}

fn is_cgroup2(path: &str) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; the path is a valid C string.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// The image's reference inside the archive (the name `kind load` gives it on the nodes):
/// index.json's `io.containerd.image.name`, else `org.opencontainers.image.ref.name` (a full
/// name, or a tag of localhost/redirect-agent).
fn image_ref(archive: &Path) -> Result<String> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json")
        .output()
        .context("running tar")?;
    ensure!(
        out.status.success(),
        "{} has no index.json: is it an OCI archive?",
        archive.display()
    );
    let index: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let annotations = &index["manifests"][0]["annotations"];
    if let Some(name) = annotations["io.containerd.image.name"].as_str() {
        return Ok(name.to_string());
    }
    match annotations["org.opencontainers.image.ref.name"].as_str() {
        Some(r) if r.contains('/') => Ok(r.to_string()),
        Some(tag) => Ok(format!("localhost/redirect-agent:{tag}")),
        None => bail!(
            "{}: index.json names no image (no io.containerd.image.name or \
             org.opencontainers.image.ref.name annotation)",
            archive.display()
        ),
    }
}

fn split_ref(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

enum Created {
    Yes(Cluster),
    NodeImageMissing(String),
}

/// The kind cluster; deleted on drop unless kept.
struct Cluster {
    env: Env,
    kubeconfig: PathBuf,
    keep: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            say(&format!(
                "kept the cluster {CLUSTER}: export KUBECONFIG={}",
                self.kubeconfig.display()
            ));
            return;
        }
        let _ = Command::new(&self.env.kind)
            .args(["delete", "cluster", "--name", CLUSTER])
            .status();
    }
}

impl Cluster {
    fn create(env: &Env, node_image: Option<&str>, keep: bool) -> Result<Created> {
        let dir = workspace_root().join("target/kind");
        fs::create_dir_all(&dir)?;
        let config = dir.join("cluster.yaml");
        fs::write(
            &config,
            "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n  - role: control-plane\n  - role: worker\n  - role: worker\n",
        )?;
        let kubeconfig = dir.join("kubeconfig");
        let _ = Command::new(&env.kind)
            .args(["delete", "cluster", "--name", CLUSTER])
            .status();
        say("creating the cluster (1 control plane, 2 workers)");
        let mut c = Command::new(&env.kind);
        c.args([
            "create", "cluster", "--name", CLUSTER, "--wait", "180s", "--config",
        ])
        .arg(&config)
        .arg("--kubeconfig")
        .arg(&kubeconfig);
        if let Some(image) = node_image {
            c.args(["--image", image]);
        }
        let out = c.output().context("running kind create cluster")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let _ = Command::new(&env.kind)
                .args(["delete", "cluster", "--name", CLUSTER])
                .status();
            if err.contains("pull") || err.contains("ensuring node image") {
                return Ok(Created::NodeImageMissing(format!(
                    "the kind node image (kind could not pull it): {}",
                    err.trim()
                )));
            }
            bail!("kind create cluster failed:\n{err}");
        }
        Ok(Created::Yes(Cluster {
            env: env.clone(),
            kubeconfig,
            keep,
        }))
    }

    fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.env.kubectl);
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c.current_dir(workspace_root());
        c
    }

    fn helm(&self) -> Command {
        let mut c = Command::new(&self.env.helm);
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c.current_dir(workspace_root());
        c
    }

    /// Runs kubectl and returns its stdout.
    fn k(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).output()?;
        ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn nodes(&self) -> Result<Vec<String>> {
        let out = Command::new(&self.env.kind)
            .args(["get", "nodes", "--name", CLUSTER])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    fn on_node(&self, node: &str, args: &[&str]) -> Command {
        let mut c = Command::new(self.env.engine);
        c.args(["exec", node]).args(args);
        c
    }

    fn test(&self, image: &str, archive: &Path) -> Result<()> {
        say("loading the image archive into the nodes");
        cmd::run(
            Command::new(&self.env.kind)
                .args(["load", "image-archive"])
                .arg(archive)
                .args(["--name", CLUSTER]),
        )?;
        let (repo, tag) = split_ref(image);
        say("helm install");
        cmd::run(self.helm().args([
            "install",
            "redirect",
            "deploy/helm/redirect",
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            &format!("image.repository={repo}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=Never",
            "--wait",
            "--timeout",
            "5m",
        ]))?;
        self.rollout(NAMESPACE, "daemonset/redirect-agent")?;
        self.rollout(NAMESPACE, "deployment/redirect-controller")?;

        say("deploying the shop and its sandboxes");
        self.k(&["apply", "-k", "deploy/examples/shop"])?;
        for d in ["frontend", "orders", "payments", "client"] {
            self.rollout("shop", &format!("deployment/{d}"))?;
        }
        self.k(&["apply", "-k", "deploy/examples/shop/sandbox"])?;
        self.k(&["apply", "-k", "deploy/examples/shop/sandbox-payments"])?;
        self.rollout("shop", "deployment/orders-feature-x")?;
        self.rollout("shop", "deployment/payments-y")?;
        for s in ["feature-x", "payments-y"] {
            self.k(&[
                "-n",
                "shop",
                "wait",
                "--for=condition=Ready",
                &format!("sandbox/{s}"),
                "--timeout=120s",
            ])?;
        }

        say("routing: key -> fork, the fork's call -> baseline, no key -> baseline, gRPC by key");
        // Several requests: the frontend's two replicas may sit on either worker.
        for _ in 0..10 {
            self.expect(
                "feature-x",
                &[("orders", "feature-x"), ("payments", "baseline")],
            )?;
            self.expect("", &[("orders", "baseline"), ("payments", "baseline")])?;
            self.expect(
                "payments-y",
                &[("orders", "baseline"), ("payments", "payments-y")],
            )?;
        }

        say("deleting every agent pod under load");
        let load = self.load(45)?;
        std::thread::sleep(Duration::from_secs(5));
        self.k(&[
            "-n",
            NAMESPACE,
            "delete",
            "pod",
            "-l",
            "app.kubernetes.io/name=redirect-agent",
            "--wait=false",
        ])?;
        self.rollout(NAMESPACE, "daemonset/redirect-agent")?;
        let counts = finish(load)?;
        say(&format!("  {counts}"));
        // While a node has no router, baseline callers fail open to baseline: misrouted, not
        // failed.
        ensure!(
            counts["failed"] == 0,
            "requests failed while the agents restarted: {counts}"
        );

        say("image bump under load");
        let bumped = format!("{tag}-bump");
        for node in self.nodes()? {
            cmd::run(&mut self.on_node(
                &node,
                &[
                    "ctr",
                    "-n",
                    "k8s.io",
                    "images",
                    "tag",
                    "--force",
                    image,
                    &format!("{repo}:{bumped}"),
                ],
            ))?;
        }
        let load = self.load(120)?;
        std::thread::sleep(Duration::from_secs(5));
        cmd::run(self.helm().args([
            "upgrade",
            "redirect",
            "deploy/helm/redirect",
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            "--set",
            &format!("image.tag={bumped}"),
            "--wait",
            "--timeout",
            "5m",
        ]))?;
        self.rollout(NAMESPACE, "daemonset/redirect-agent")?;
        let counts = finish(load)?;
        say(&format!("  {counts}"));
        ensure!(
            counts["failed"] == 0 && counts["misrouted"] == 0,
            "the rollout failed or misrouted requests: {counts}"
        );

        say("helm uninstall: the post-delete hook cleans every node");
        cmd::run(self.helm().args([
            "uninstall",
            "redirect",
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "5m",
        ]))?;
        self.assert_nodes_clean()?;
        say("PASS");
        Ok(())
    }

    fn rollout(&self, ns: &str, what: &str) -> Result<()> {
        self.k(&["-n", ns, "rollout", "status", what, "--timeout=300s"])
            .map(|_| ())
    }

    /// One request from the client pod with `key`; each service answers with its version.
    fn expect(&self, key: &str, want: &[(&str, &str)]) -> Result<()> {
        let out = self.k(&[
            "-n",
            "shop",
            "exec",
            "deploy/client",
            "--",
            "python3",
            "/app/shop.py",
            "get",
            FRONTEND,
            "--key",
            key,
        ])?;
        let answer: serde_json::Value = serde_json::from_str(out.trim())?;
        for (service, version) in want {
            ensure!(
                answer["versions"][service] == *version,
                "key {key:?}: {service} should be {version}: {}",
                answer["versions"]
            );
        }
        Ok(())
    }

    /// Keyed requests for `seconds` from the client pod, in the background.
    fn load(&self, seconds: u32) -> Result<Child> {
        Ok(self
            .kubectl()
            .args([
                "-n",
                "shop",
                "exec",
                "deploy/client",
                "--",
                "python3",
                "/app/shop.py",
                "load",
                FRONTEND,
                "--key",
                "feature-x",
                "--seconds",
                &seconds.to_string(),
                "--expect",
                "orders=feature-x",
                "--expect",
                "payments=baseline",
            ])
            .stdout(Stdio::piped())
            .spawn()?)
    }

    /// No pin on any node, no program of ours in the kernel (the nodes share the host's
    /// kernel, so the host's bpftool sees their programs; the node image has no bpftool).
    fn assert_nodes_clean(&self) -> Result<()> {
        for node in self.nodes()? {
            let pins = self
                .on_node(&node, &["ls", "/sys/fs/bpf/redirect"])
                .output()?;
            ensure!(
                !pins.status.success(),
                "{node}: /sys/fs/bpf/redirect is still there: {}",
                String::from_utf8_lossy(&pins.stdout)
            );
        }
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show"])
            .output()?;
        let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ours: Vec<_> = progs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str())
            .filter(|n| n.starts_with("redirect_"))
            .collect();
        ensure!(
            ours.is_empty(),
            "programs left in the kernel after uninstall: {ours:?} (or another redirect test runs \
             on this host)"
        );
        Ok(())
    }
}

/// Waits for a load run and returns its counts.
fn finish(child: Child) -> Result<serde_json::Value> {
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "the load run failed");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("load printed {text:?}"))
}
