//! The deployment manifests stay in step with the code.

use std::{path::Path, process::Command};

fn deploy_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

#[test]
fn committed_crds_match_the_rust_types() {
    let committed = std::fs::read_to_string(deploy_dir().join("crds.yaml")).unwrap();
    assert!(
        committed == redirect_agent::crd::crd_yaml(),
        "deploy/crds.yaml is stale: regenerate it with `redirect-agent crd > deploy/crds.yaml`"
    );
}

#[test]
fn kustomization_renders() {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("SKIP kustomization_renders: kubectl not installed");
        return;
    }
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(deploy_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for kind in [
        "CustomResourceDefinition",
        "DaemonSet",
        "ClusterRole",
        "Namespace",
    ] {
        assert!(
            text.contains(&format!("kind: {kind}")),
            "no {kind} in the rendered manifests"
        );
    }
}
