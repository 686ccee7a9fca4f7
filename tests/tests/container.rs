//! The agent as a node runs it: from the container image (podman, privileged, in the node's
//! network namespace, bpffs and the cgroup2 mount from the host). An upgrade and a rollback
//! drop nothing, and uninstalling (the image's `cleanup`, as the chart's hook runs it) leaves
//! nothing in the kernel. The image is `$REDIRECT_AGENT_IMAGE` (`cargo xtask test` builds it
//! with `cargo xtask image` and sets it); without it, or without podman, the tests skip.

use std::time::Duration;

use redirect_tests::{
    MiniCluster,
    agent::{PODMAN_RUN, SourceMode},
    bpf_objects::PinnedObjects,
    rollout,
    scene::*,
};

const TOOLS: &[&str] = &["curl", "python3", "podman", "bpftool"];

/// The image to run, or why these tests skip.
fn image(test: &str) -> Option<String> {
    match std::env::var("REDIRECT_AGENT_IMAGE") {
        Ok(i) if !i.is_empty() => Some(i),
        _ => {
            redirect_tests::skip(
                test,
                "REDIRECT_AGENT_IMAGE is not set (build the image with `cargo xtask image` and \
                 set it to localhost/redirect-agent:dev; `cargo xtask test` does both)",
            );
            None
        }
    }
}

#[test]
fn the_image_upgrades_and_rolls_back_on_a_node_dropping_nothing() {
    let Some(image) = image("container_rollout") else {
        return;
    };
    let Some(mc) = MiniCluster::new_or_skip("container_rollout", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_in_container(&mc, true, SourceMode::Kube, &image).unwrap();
    let figures = rollout::upgrade_and_roll_back(&mc, &mut shop, 15).unwrap();
    println!(
        "rollout (containers of {image}): {} (old agent exited {:?} after SIGTERM on upgrade, {:?} on rollback)",
        figures.clients, figures.upgrade, figures.rollback
    );
    rollout::assert_dropped_nothing(&figures, &shop.agent().log());
}

#[test]
fn uninstalling_with_the_images_cleanup_leaves_nothing_in_the_kernel() {
    let Some(image) = image("container_uninstall") else {
        return;
    };
    let Some(mc) = MiniCluster::new_or_skip("container_uninstall", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_in_container(&mc, true, SourceMode::Kube, &image).unwrap();
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );
    let pin_dir = shop.agent().pin_dir.clone();
    // Every object, the persisted last good state included.
    shop.agent()
        .wait_persisted(Duration::from_secs(10))
        .unwrap();
    let objects = PinnedObjects::of(&pin_dir).unwrap();

    // helm uninstall: the DaemonSet's pods get SIGTERM, then the post-delete hook runs
    // `redirect-agent cleanup` from the same image on every node.
    shop.agent().terminate(Duration::from_secs(60)).unwrap();
    let bpffs = redirect_tests::agent::BPFFS;
    let out = std::process::Command::new("podman")
        .args(PODMAN_RUN)
        .args(["--privileged", "--network", "none", "-v"])
        .arg(format!("{bpffs}:{bpffs}"))
        .args(["--entrypoint", "/usr/local/bin/redirect-agent", &image])
        .args(["cleanup", "--pin-dir", pin_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cleanup failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("removed ")).count(),
        objects.count() + 1,
        "{stdout}"
    );
    assert!(!pin_dir.exists());
    objects.wait_gone(Duration::from_secs(10)).unwrap();
    // Nothing is attached at the cluster's cgroup root any more, and traffic is untouched.
    let tree = redirect_tests::bpf_objects::bpftool_json(&[
        "cgroup",
        "show",
        mc.cgroup_root().to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(tree, serde_json::json!([]), "{tree}");
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-base\n"
    );
}
