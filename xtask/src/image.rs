//! `cargo xtask image`: the container image, built from this checkout, reproducibly.
//!
//! 1. the eBPF object (`build_ebpf::build`), which the agent's build script embeds;
//! 2. `redirect-agent` and `redirectctl`, release profile, for `x86_64-unknown-linux-musl`
//!    (statically linked), in their own target directory (`target/image/build`), with the
//!    checkout and the cargo home remapped and debuginfo stripped, so the bytes do not depend
//!    on where either lives;
//! 3. staged in `target/image/bin` with mode 0755 and the source date as mtime;
//! 4. `buildah build` of the `Containerfile` (`FROM scratch`, nothing pulled) with the source
//!    date as timestamp, no history and no buildah identity label: the same binaries give the
//!    same image id;
//! 5. the OCI archive, with a Docker `manifest.json` beside `index.json` (as `docker save`
//!    writes since Docker 25) so that `kind load image-archive`, `podman load` and `docker load`
//!    of any version read it; entries sorted, owners and times fixed, so it is reproducible too.
//!
//! buildah rather than an engine-free writer (the `ocidir` crate): with `--timestamp`,
//! `--omit-history` and `--identity-label=false` it gives byte-identical configs, layers and
//! manifests, and the image lands in the local containers storage that podman runs and kind
//! loads from. See docs/image.md.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    build_ebpf,
    cmd::{self, cargo, workspace_root},
};

/// The Rust target of the image's binaries: musl, statically linked.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// The image's repository; every tag is a full reference under it.
pub const REPOSITORY: &str = "localhost/redirect-agent";
/// The tag every default build also gets.
pub const DEV_TAG: &str = "dev";
/// The binaries the image holds, in `/usr/local/bin`.
pub const BINARIES: [&str; 2] = ["redirect-agent", "redirectctl"];
/// Limits for anything that runs containers on this kind of host (the engine's defaults exceed
/// the hard limits here and the runtime refuses them).
pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
];

#[derive(clap::Args, Default)]
pub struct Options {
    /// Tag of the image, `localhost/redirect-agent:TAG` [default: the crate version and the
    /// short git revision, `-dirty` when the worktree has changes; the image is also tagged
    /// `dev`].
    #[arg(long, env = "REDIRECT_IMAGE_TAG")]
    pub tag: Option<String>,
    /// Where the OCI archive goes [default: target/image/redirect-agent.oci.tar].
    #[arg(long, env = "REDIRECT_IMAGE_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Only build the binaries and stage them in target/image/bin, for another builder
    /// (`docker build -f Containerfile .`); needs no buildah.
    #[arg(long, env = "REDIRECT_IMAGE_BINARIES_ONLY")]
    pub binaries_only: bool,
}

/// What a build produced.
pub struct Built {
    /// Full references, the first one named in the archive.
    pub references: Vec<String>,
    /// The image id (the config's digest): the same for the same inputs.
    pub id: String,
    /// The manifest's digest in the archive.
    pub manifest_digest: String,
    /// The two binaries' total size: what the image's one layer unpacks to.
    pub unpacked_bytes: u64,
    pub archive: PathBuf,
    pub archive_bytes: u64,
}

pub fn run(o: &Options) -> Result<()> {
    let started = Instant::now();
    if o.binaries_only {
        preflight(false)?;
        let source = Source::of(&workspace_root());
        let bytes = build_and_stage(&source)?;
        let tag = o.tag.clone().unwrap_or_else(|| source.default_tag());
        println!("staged    {} ({})", staged_dir().display(), human(bytes));
        println!(
            "next      docker build -f Containerfile --build-arg VERSION={} \
             --build-arg REVISION={} -t {} .",
            source.version,
            source.revision,
            reference(&tag)?
        );
        return Ok(());
    }
    let built = build(o)?;
    println!("image     {}", built.references.join(", "));
    println!("id        {}", built.id);
    println!("manifest  {} (in the archive)", built.manifest_digest);
    println!(
        "size      {} unpacked (the two static binaries, nothing else)",
        human(built.unpacked_bytes)
    );
    println!(
        "archive   {} ({}): kind load image-archive, docker load, podman load",
        built.archive.display(),
        human(built.archive_bytes)
    );
    println!("took      {:.0?}", round_secs(started.elapsed()));
    Ok(())
}

/// Builds the binaries, the image and the archive.
pub fn build(o: &Options) -> Result<Built> {
    preflight(true)?;
    let root = workspace_root();
    let source = Source::of(&root);
    let references = match &o.tag {
        Some(tag) => vec![reference(tag)?],
        None => vec![reference(&source.default_tag())?, reference(DEV_TAG)?],
    };
    let image_dir = root.join("target/image");
    let archive = o
        .output
        .clone()
        .unwrap_or_else(|| image_dir.join("redirect-agent.oci.tar"));

    let unpacked_bytes = build_and_stage(&source)?;

    let iidfile = image_dir.join(format!("iid-{}", std::process::id()));
    let mut c = Command::new("buildah");
    c.arg("build")
        .args(["--runtime", "runc"])
        .args(ULIMITS)
        .args(["--network", "none", "--pull=never", "--layers=false"])
        .args(["--omit-history", "--identity-label=false"])
        .arg(format!("--timestamp={}", source.epoch))
        .arg(format!("--build-arg=VERSION={}", source.version))
        .arg(format!("--build-arg=REVISION={}", source.revision))
        .arg("--iidfile")
        .arg(&iidfile)
        .arg("--file")
        .arg(root.join("Containerfile"));
    for r in &references {
        c.args(["--tag", r]);
    }
    c.arg("--quiet").arg(&root).stdout(Stdio::null());
    cmd::run(&mut c).context("buildah build failed")?;
    let iid =
        fs::read_to_string(&iidfile).with_context(|| format!("reading {}", iidfile.display()))?;
    let id = iid.trim().trim_start_matches("sha256:").to_string();
    let _ = fs::remove_file(&iidfile);

    let manifest_digest = write_archive(&id, &references, &archive, source.epoch)?;
    let archive_bytes = fs::metadata(&archive)?.len();
    Ok(Built {
        references,
        id: format!("sha256:{id}"),
        manifest_digest,
        unpacked_bytes,
        archive,
        archive_bytes,
    })
}

/// Where the Containerfile copies the binaries from.
fn staged_dir() -> PathBuf {
    workspace_root().join("target/image/bin")
}

/// The eBPF object, then the binaries, staged; returns their total size.
fn build_and_stage(source: &Source) -> Result<u64> {
    build_ebpf::build()?;
    let binaries = build_binaries(&workspace_root())?;
    stage(&binaries, &staged_dir(), source.epoch)
}

/// Everything the build needs that cargo does not bring, checked up front with how to get it.
fn preflight(buildah: bool) -> Result<()> {
    let mut missing = Vec::new();
    if buildah && !runs(Command::new("buildah").arg("--version")) {
        missing.push("buildah (the image builder): ./x setup, or apt-get install buildah".into());
    }
    if !runs(Command::new("musl-gcc").arg("--version")) {
        missing.push(
            "musl-gcc (ring's C code for the static binaries): ./x setup, or apt-get install \
             musl-tools"
                .into(),
        );
    }
    if !musl_target_installed() {
        missing.push(format!(
            "the Rust target {TARGET}: ./x setup, or rustup target add {TARGET} --toolchain \
             <the channel in rust-toolchain.toml>"
        ));
    }
    if !missing.is_empty() {
        bail!(
            "cargo xtask image needs:\n{}",
            missing
                .iter()
                .map(|m| format!("  - {m}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

fn runs(c: &mut Command) -> bool {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the workspace's toolchain (the one cargo runs us with) has the musl standard library.
fn musl_target_installed() -> bool {
    let Ok(out) = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(workspace_root())
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    out.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib")
            .join(TARGET)
            .join("lib")
            .is_dir()
}

/// Where the image's version, revision and date come from.
struct Source {
    version: &'static str,
    /// The full commit id, or `unknown` outside a git checkout.
    revision: String,
    short: Option<String>,
    dirty: bool,
    /// `SOURCE_DATE_EPOCH` when set, else the commit's date, else 0.
    epoch: u64,
}

impl Source {
    fn of(root: &Path) -> Source {
        let git = |args: &[&str]| -> Option<String> {
            let out = Command::new("git")
                .arg("-C")
                .arg(root)
                .args(args)
                .stderr(Stdio::null())
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let revision = git(&["rev-parse", "HEAD"]);
        let short = git(&["rev-parse", "--short", "HEAD"]);
        let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
        let epoch = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| git(&["log", "-1", "--format=%ct"])?.parse().ok())
            .unwrap_or(0);
        Source {
            // The workspace version: xtask and the agent share it.
            version: env!("CARGO_PKG_VERSION"),
            revision: revision.unwrap_or_else(|| "unknown".into()),
            short,
            dirty,
            epoch,
        }
    }

    fn default_tag(&self) -> String {
        let mut tag = self.version.to_string();
        if let Some(s) = &self.short {
            tag = format!("{tag}-{s}");
        }
        if self.dirty {
            tag.push_str("-dirty");
        }
        tag
    }
}

/// `localhost/redirect-agent:<tag>`, with the tag checked against the reference grammar.
fn reference(tag: &str) -> Result<String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    ensure!(
        ok,
        "{tag:?} is not a valid image tag ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
    );
    Ok(format!("{REPOSITORY}:{tag}"))
}

/// The release binaries for musl, built so that their bytes depend on the sources only.
fn build_binaries(root: &Path) -> Result<Vec<PathBuf>> {
    let target_dir = root.join("target/image/build");
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    // The last matching prefix wins; the two do not nest in any usual layout.
    let rustflags = [
        format!("--remap-path-prefix={}=/build/redirect", root.display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
    ]
    .join("\x1f");
    let mut c = cargo();
    scrub_package_env(&mut c);
    c.args([
        "build",
        "--release",
        "--locked",
        "--package",
        "redirect-agent",
    ]);
    for b in BINARIES {
        c.args(["--bin", b]);
    }
    c.args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        // Takes precedence over RUSTFLAGS and build.rustflags; applies to the target only, not
        // to build scripts and proc macros.
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // No debuginfo (the release profile's `debug = 1` carries paths and adds megabytes);
        // the symbol table stays, for backtraces and profilers.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .env("CARGO_INCREMENTAL", "0")
        // ring's C and assembly, for musl.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    cmd::run(&mut c).context("building the static binaries failed")?;
    Ok(BINARIES
        .iter()
        .map(|b| target_dir.join(TARGET).join("release").join(b))
        .collect())
}

/// Removes what `cargo run` exports about the running package (xtask), and
/// `SOURCE_DATE_EPOCH`: build scripts watch some of these (ring: `CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_NAME`, `SOURCE_DATE_EPOCH`, ...) in the environment of the cargo that builds, so
/// inherited they would rerun ring's build script, and rebuild everything above it, whenever
/// the image is built from another place than last time.
fn scrub_package_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
                    | "SOURCE_DATE_EPOCH"
            )
        {
            c.env_remove(&*k);
        }
    }
}

/// Copies the binaries into `dir` (what the Containerfile copies from) with fixed mode and
/// mtime; returns their total size.
fn stage(binaries: &[PathBuf], dir: &Path, epoch: u64) -> Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);
    let mut total = 0;
    for bin in binaries {
        let name = bin.file_name().context("binary path without a name")?;
        let dest = dir.join(name);
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        fs::copy(bin, &tmp).with_context(|| format!("copying {}", bin.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        let f = fs::File::options().write(true).open(&tmp)?;
        f.set_modified(mtime)?;
        total += f.metadata()?.len();
        drop(f);
        fs::rename(&tmp, &dest).with_context(|| format!("writing {}", dest.display()))?;
    }
    Ok(total)
}

/// Writes the OCI archive of image `id` (hex) under every reference (the first one first: tools that
/// take one name take that), with a Docker `manifest.json` naming them all, to `archive`;
/// returns the manifest's digest.
fn write_archive(id: &str, references: &[String], archive: &Path, epoch: u64) -> Result<String> {
    let parent = archive
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let layout = parent.join(format!(".oci-layout-{}", std::process::id()));
    let _ = fs::remove_dir_all(&layout);
    let result = (|| -> Result<String> {
        let primary = &references[0];
        cmd::run(
            Command::new("buildah")
                // By id: a concurrent build may move the tags meanwhile.
                .args(["push", "--quiet", id])
                .arg(format!("oci:{}:{primary}", layout.display()))
                .stdout(Stdio::null()),
        )
        .context("buildah push to an OCI layout failed")?;

        // One entry per reference, the same manifest under each name: containerd (kind,
        // Docker's containerd store) names images from io.containerd.image.name, podman from
        // org.opencontainers.image.ref.name (buildah wrote the full reference there).
        let index_path = layout.join("index.json");
        let mut index: Value = serde_json::from_slice(&fs::read(&index_path)?)
            .with_context(|| format!("reading {}", index_path.display()))?;
        let entry = index["manifests"]
            .get(0)
            .context("index.json lists no manifest")?
            .clone();
        let digest = entry["digest"]
            .as_str()
            .context("index.json: manifest without a digest")?
            .to_string();
        let entries: Vec<Value> = references
            .iter()
            .map(|r| {
                let mut e = entry.clone();
                e["annotations"]["org.opencontainers.image.ref.name"] = Value::from(r.as_str());
                e["annotations"]["io.containerd.image.name"] = Value::from(r.as_str());
                e
            })
            .collect();
        index["manifests"] = Value::from(entries);
        fs::write(&index_path, serde_json::to_vec(&index)?)?;

        let manifest: Value = serde_json::from_slice(&fs::read(blob(&layout, &digest)?)?)
            .context("reading the image manifest")?;
        let config = manifest["config"]["digest"]
            .as_str()
            .context("manifest without a config")?;
        let layers: Vec<String> = manifest["layers"]
            .as_array()
            .context("manifest without layers")?
            .iter()
            .map(|l| blob_name(l["digest"].as_str().unwrap_or_default()))
            .collect::<Result<_>>()?;
        // The file `docker load` reads (it ignores index.json before Docker 25).
        let docker = serde_json::json!([{
            "Config": blob_name(config)?,
            "RepoTags": references,
            "Layers": layers,
        }]);
        fs::write(layout.join("manifest.json"), serde_json::to_vec(&docker)?)?;

        let tmp = parent.join(format!(".{}.tmp", std::process::id()));
        cmd::run(
            Command::new("tar")
                .args(["--create", "--format=ustar", "--sort=name"])
                .arg(format!("--mtime=@{epoch}"))
                .args(["--owner=0", "--group=0", "--numeric-owner"])
                .args(["--mode=u=rwX,go=rX"])
                .arg("--file")
                .arg(&tmp)
                .arg("--directory")
                .arg(&layout)
                .args(["oci-layout", "index.json", "manifest.json", "blobs"]),
        )
        .context("writing the archive")?;
        fs::rename(&tmp, archive).with_context(|| format!("writing {}", archive.display()))?;
        Ok(digest)
    })();
    let _ = fs::remove_dir_all(&layout);
    result
}

/// `blobs/sha256/<hex>` for `sha256:<hex>`.
fn blob_name(digest: &str) -> Result<String> {
    let (alg, hex) = digest
        .split_once(':')
        .with_context(|| format!("not a digest: {digest:?}"))?;
    ensure!(
        !alg.is_empty() && !hex.is_empty() && !hex.contains('/'),
        "not a digest: {digest:?}"
    );
    Ok(format!("blobs/{alg}/{hex}"))
}

fn blob(layout: &Path, digest: &str) -> Result<PathBuf> {
    Ok(layout.join(blob_name(digest)?))
}

fn human(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}
