//! The mini-cluster harness itself: real namespaces, routes, nftables and cgroups behave like a
//! Kubernetes node, and nothing is left behind. Every test skips (and passes) without root.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use redirect_tests::{MiniCluster, Pod, cgroup2_mount, name_for_owner, sweep_leftovers};

const PODSERVER: &str = env!("CARGO_BIN_EXE_podserver");
const TIMEOUT: Duration = Duration::from_secs(20);

fn podserver() -> &'static Path {
    Path::new(PODSERVER)
}

/// Bodies of `count` requests to `url`, one new connection each (so DNAT picks anew).
fn curl(pod: &Pod<'_>, url: &str, count: usize) -> Vec<String> {
    let mut argv = vec![
        "curl",
        "-sS",
        "--globoff",
        "--noproxy",
        "*",
        "--max-time",
        "5",
        "-H",
        "Connection: close",
    ];
    argv.extend(std::iter::repeat_n(url, count));
    let out = pod.run(&argv, TIMEOUT).unwrap().check().unwrap();
    out.lines().map(str::to_string).collect()
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Processes whose netns is the one with inode `ino`.
fn processes_in_netns(ino: u64) -> Vec<u32> {
    let want = format!("net:[{ino}]");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let link = fs::read_link(e.path().join("ns/net")).ok()?;
            (link.as_os_str() == want.as_str()).then_some(pid)
        })
        .collect()
}

/// What a cluster made outside itself, to check after it is gone.
struct Traces {
    id: String,
    cgroup_root: PathBuf,
    workdir: PathBuf,
    netns_inodes: Vec<u64>,
}

impl Traces {
    fn of(mc: &MiniCluster, pods: &[&Pod<'_>]) -> Traces {
        let mut paths = vec![mc.node_netns_path().to_path_buf()];
        paths.extend(pods.iter().map(|p| p.netns_path().to_path_buf()));
        Traces {
            id: mc.id().to_string(),
            cgroup_root: mc.cgroup_root().to_path_buf(),
            workdir: mc.workdir().to_path_buf(),
            netns_inodes: paths
                .iter()
                .map(|p| fs::metadata(p).unwrap().ino())
                .collect(),
        }
    }

    fn assert_gone(&self) {
        assert!(
            !netns_list().contains(&self.id),
            "netns left: {}",
            netns_list()
        );
        assert!(
            !self.cgroup_root.exists(),
            "cgroup left: {:?}",
            self.cgroup_root
        );
        assert!(!self.workdir.exists(), "workdir left: {:?}", self.workdir);
        for ino in &self.netns_inodes {
            assert_eq!(processes_in_netns(*ino), Vec::<u32>::new(), "netns {ino}");
        }
    }
}

#[test]
fn client_reaches_baseline_through_cluster_ip_over_ipv4_and_ipv6() {
    let Some(mc) = MiniCluster::new_or_skip("client_reaches_baseline", &["curl"]) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let baseline = mc
        .pod_with_labels("checkout-baseline", &[("app", "checkout")])
        .unwrap();
    let _server = baseline
        .spawn_server(podserver(), "checkout-baseline", 8080)
        .unwrap();
    mc.service(
        "checkout",
        "10.200.128.10",
        "fd00:200::128:10",
        &[(80, 8080)],
        &[&baseline],
    )
    .unwrap();

    assert_eq!(
        curl(&client, "http://10.200.128.10/", 1),
        ["checkout-baseline"]
    );
    assert_eq!(
        curl(&client, "http://[fd00:200::128:10]/", 1),
        ["checkout-baseline"]
    );
    // The node's own connections (a hostNetwork router) are DNATed too.
    let node_out = mc
        .node()
        .run(
            &["curl", "-sS", "--max-time", "5", "http://10.200.128.10/"],
            TIMEOUT,
        )
        .unwrap()
        .check()
        .unwrap();
    assert_eq!(node_out, "checkout-baseline\n");
}

#[test]
fn two_backends_both_receive_traffic() {
    let Some(mc) = MiniCluster::new_or_skip("two_backends", &["curl"]) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let a = mc.pod("cart-a").unwrap();
    let b = mc.pod("cart-b").unwrap();
    let _sa = a.spawn_server(podserver(), "cart-a", 8080).unwrap();
    let _sb = b.spawn_server(podserver(), "cart-b", 8080).unwrap();
    mc.service(
        "cart",
        "10.200.128.20",
        "fd00:200::128:20",
        &[(80, 8080)],
        &[&a, &b],
    )
    .unwrap();

    // With two backends chosen at random, 40 connections all hitting one has p = 2^-39.
    for url in ["http://10.200.128.20/", "http://[fd00:200::128:20]/"] {
        let mut seen = BTreeMap::new();
        for body in curl(&client, url, 40) {
            *seen.entry(body).or_insert(0) += 1;
        }
        assert_eq!(
            seen.keys().map(String::as_str).collect::<Vec<_>>(),
            ["cart-a", "cart-b"],
            "{url}: {seen:?}"
        );
    }
}

#[test]
fn backend_sees_the_client_pod_ip_without_snat() {
    let Some(mc) = MiniCluster::new_or_skip("backend_sees_client_ip", &["curl"]) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let server = mc.pod("echo").unwrap();
    let _s = server.spawn_server(podserver(), "echo", 9000).unwrap();
    mc.service(
        "echo",
        "10.200.128.30",
        "fd00:200::128:30",
        &[(80, 9000)],
        &[&server],
    )
    .unwrap();

    let v4 = curl(&client, "http://10.200.128.30/peer", 1);
    assert!(
        v4[0].starts_with(&format!("{}:", client.ip4())),
        "{v4:?} vs {}",
        client.ip4()
    );
    let v6 = curl(&client, "http://[fd00:200::128:30]/peer", 1);
    assert!(
        v6[0].starts_with(&format!("[{}]:", client.ip6())),
        "{v6:?} vs {}",
        client.ip6()
    );
}

#[test]
fn a_service_without_backends_resets_connections_at_once() {
    let Some(mc) = MiniCluster::new_or_skip("service_without_backends", &["curl"]) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let backend = mc.pod("later").unwrap();
    let _s = backend.spawn_server(podserver(), "later", 8080).unwrap();
    let svc = mc
        .service(
            "later",
            "10.200.128.40",
            "fd00:200::128:40",
            &[(80, 8080)],
            &[],
        )
        .unwrap();
    let started = std::time::Instant::now();
    let out = client
        .run(
            &["curl", "-sS", "--max-time", "5", "http://10.200.128.40/"],
            TIMEOUT,
        )
        .unwrap();
    // curl exit 7: could not connect (a reset, not the 5 s timeout, which is exit 28).
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    mc.set_backends(&svc, &[&backend]).unwrap();
    assert_eq!(curl(&client, "http://10.200.128.40/", 1), ["later"]);
}

#[test]
fn pod_processes_run_in_the_container_cgroup_and_netns_of_the_pod() {
    let Some(mc) = MiniCluster::new_or_skip("pod_processes_in_pod", &[]) else {
        return;
    };
    let pod = mc.pod("client").unwrap();
    let cgroup = pod.run(&["cat", "/proc/self/cgroup"], TIMEOUT).unwrap();
    let v2_path = cgroup
        .check()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .expect("a cgroup v2 line");
    assert!(
        v2_path.ends_with(&format!("{}/kubepods/pod{}/c0", mc.id(), pod.uid())),
        "{v2_path}"
    );
    assert!(pod.cgroup_path().starts_with(mc.cgroup_root()));
    assert_eq!(
        pod.cgroup_id(),
        fs::metadata(pod.cgroup_path()).unwrap().ino()
    );
    assert_ne!(
        pod.cgroup_id(),
        fs::metadata(pod.container_cgroup_path()).unwrap().ino()
    );

    let netns = pod
        .run(&["readlink", "/proc/self/ns/net"], TIMEOUT)
        .unwrap()
        .check()
        .unwrap();
    let ino = fs::metadata(pod.netns_path()).unwrap().ino();
    assert_eq!(netns.trim(), format!("net:[{ino}]"));
    // bpffs and cgroup2 stay visible (no `ip netns exec` remount of /sys).
    let mount = cgroup2_mount().unwrap();
    pod.run(&["test", "-d", mount.to_str().unwrap()], TIMEOUT)
        .unwrap()
        .check()
        .unwrap();
}

#[test]
fn manifests_describe_pods_services_and_endpoint_slices() {
    let Some(mc) = MiniCluster::new_or_skip("manifests", &[]) else {
        return;
    };
    let fork = mc
        .pod_with_labels(
            "checkout-fork",
            &[("app", "checkout"), ("redirect.dev/sandbox", "feature-x")],
        )
        .unwrap();
    let base = mc
        .pod_with_labels("checkout", &[("app", "checkout")])
        .unwrap();
    mc.service(
        "checkout",
        "10.200.128.10",
        "fd00:200::128:10",
        &[(80, 8080), (9090, 9090)],
        &[&base],
    )
    .unwrap();
    let dir = mc.workdir().join("manifests");
    let files = mc.write_manifests(&dir).unwrap();
    assert_eq!(files.len(), 5);

    let load = |name: &str| -> yaml_serde::Value {
        yaml_serde::from_str(&fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let pod = load("pod-checkout-fork.yaml");
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["metadata"]["uid"], fork.uid());
    assert_eq!(pod["metadata"]["resourceVersion"], "1");
    assert_eq!(
        pod["metadata"]["labels"]["redirect.dev/sandbox"],
        "feature-x"
    );
    assert_eq!(pod["spec"]["nodeName"], "mini-node");
    assert_eq!(pod["status"]["podIP"], fork.ip4().to_string().as_str());
    assert_eq!(
        pod["status"]["podIPs"][1]["ip"],
        fork.ip6().to_string().as_str()
    );
    assert_eq!(pod["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(pod["status"]["conditions"][0]["status"], "True");

    let svc = load("service-checkout.yaml");
    assert_eq!(svc["spec"]["clusterIP"], "10.200.128.10");
    assert_eq!(svc["spec"]["clusterIPs"][1], "fd00:200::128:10");
    assert_eq!(svc["spec"]["ports"][0]["name"], "http");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(svc["metadata"]["resourceVersion"], "1");

    for (file, family, ip) in [
        (
            "endpointslice-checkout-ipv4.yaml",
            "IPv4",
            base.ip4().to_string(),
        ),
        (
            "endpointslice-checkout-ipv6.yaml",
            "IPv6",
            base.ip6().to_string(),
        ),
    ] {
        let slice = load(file);
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slice["addressType"], family);
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "checkout"
        );
        assert_eq!(slice["metadata"]["resourceVersion"], "1");
        let ep = &slice["endpoints"][0];
        assert_eq!(ep["addresses"][0], ip.as_str());
        assert_eq!(ep["conditions"]["ready"], true);
        assert_eq!(ep["targetRef"]["uid"], base.uid());
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(slice["ports"][0]["name"], "http");
    }
}

#[test]
fn dropping_the_cluster_removes_namespaces_cgroups_and_processes() {
    let Some(mc) = MiniCluster::new_or_skip("drop_cleans_up", &[]) else {
        return;
    };
    let a = mc.pod("a").unwrap();
    let b = mc.pod("b").unwrap();
    mc.service(
        "s",
        "10.200.128.50",
        "fd00:200::128:50",
        &[(80, 8080)],
        &[&b],
    )
    .unwrap();
    let traces = Traces::of(&mc, &[&a, &b]);
    // A process leaked on purpose: only the cluster's own teardown can stop it.
    let leaked = b.spawn(&["sleep", "600"]).unwrap();
    std::mem::forget(leaked);
    // And one in the node netns.
    std::mem::forget(mc.node().spawn(&["sleep", "600"]).unwrap());
    assert!(netns_list().contains(&traces.id));
    assert!(a.cgroup_path().exists());

    drop((a, b));
    drop(mc);
    traces.assert_gone();
}

#[test]
fn a_scene_that_panics_still_cleans_up() {
    let mut traces = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let Some(mc) = MiniCluster::new_or_skip("panic_cleans_up", &[]) else {
            return;
        };
        let pod = mc.pod("doomed").unwrap();
        let _server = pod.spawn_server(podserver(), "doomed", 8080).unwrap();
        traces = Some(Traces::of(&mc, &[&pod]));
        panic!("scene fails on purpose");
    }));
    let Some(traces) = traces else {
        return; // skipped
    };
    assert!(result.is_err());
    traces.assert_gone();
}

#[test]
fn sweep_removes_leftovers_of_dead_processes_only() {
    // Run the harness's own preflight (and its first sweep) before making fake leftovers.
    let Some(mc) = MiniCluster::new_or_skip("sweep", &[]) else {
        return;
    };
    drop(mc);
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = name_for_owner(dead_pid, 1, 7);
    let alive = name_for_owner(
        std::process::id(),
        redirect_tests::own_start_time(),
        4_000_000,
    );
    let mount = cgroup2_mount().unwrap();
    for name in [&dead, &alive] {
        let ns = format!("{name}-node");
        assert!(
            Command::new("ip")
                .args(["netns", "add", &ns])
                .status()
                .unwrap()
                .success()
        );
        fs::create_dir_all(mount.join(name).join("kubepods")).unwrap();
        fs::create_dir_all(std::env::temp_dir().join(name)).unwrap();
    }

    sweep_leftovers();

    let list = netns_list();
    assert!(!list.contains(&dead), "{list}");
    assert!(!mount.join(&dead).exists());
    assert!(!std::env::temp_dir().join(&dead).exists());
    assert!(list.contains(&alive), "{list}");
    assert!(mount.join(&alive).exists());
    assert!(std::env::temp_dir().join(&alive).exists());

    let ns = format!("{alive}-node");
    Command::new("ip")
        .args(["netns", "delete", &ns])
        .status()
        .unwrap();
    fs::remove_dir(mount.join(&alive).join("kubepods")).unwrap();
    fs::remove_dir(mount.join(&alive)).unwrap();
    fs::remove_dir(std::env::temp_dir().join(&alive)).unwrap();
}

#[test]
fn podserver_keeps_connections_alive_and_reads_request_bodies() {
    let Some(mc) = MiniCluster::new_or_skip("podserver_keep_alive", &["curl"]) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let server = mc.pod("server").unwrap();
    let _s = server.spawn_server(podserver(), "server", 8080).unwrap();
    let url = format!("http://{}:8080/", server.ip4());
    let chunked = format!("http://[{}]:8080/", server.ip6());
    let out = client
        .run(
            &[
                "curl",
                "-sS",
                "--globoff",
                "--max-time",
                "5",
                "-w",
                "%{num_connects}\n",
                &url,
                &url,
            ],
            TIMEOUT,
        )
        .unwrap()
        .check()
        .unwrap();
    // One connect, then the same connection again.
    assert_eq!(out, "server\n1\nserver\n0\n");
    let out = client
        .run(
            &[
                "curl",
                "-sS",
                "--globoff",
                "--max-time",
                "5",
                "-i",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                "some body",
                &chunked,
            ],
            TIMEOUT,
        )
        .unwrap()
        .check()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("x-served-by: server\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nserver\n"), "{out}");
}
