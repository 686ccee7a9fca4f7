//! The container image `cargo xtask image` builds (docs/image.md): two builds of the same
//! sources give one image id and one archive, byte for byte; the archive loads back as that
//! image under its name; the image holds exactly the two binaries, statically linked, and both
//! run; it carries the OCI labels.
//!
//! Needs root, buildah and podman (`./x setup` installs them, with the musl target and musl-gcc);
//! without them it prints `SKIP image: <why>` and passes. The first run builds the release binaries
//! for musl into target/image/build (8 to 10 minutes on 2 cores, unless `cargo xtask image` ran
//! before); later runs reuse them and take 5 to 8 seconds. Everything it tags, creates and writes
//! is removed at the end, also when an assertion fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use redirect_tests::{SetupError, require_root, require_tools};
use serde_json::Value;

const REPOSITORY: &str = "localhost/redirect-agent";
const BINARIES: [&str; 2] = ["usr/local/bin/redirect-agent", "usr/local/bin/redirectctl"];
/// The engine's default limits exceed this host's hard limits, and runc refuses them.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
];

#[test]
fn image_is_reproducible_loads_from_its_archive_and_runs_two_static_binaries() {
    let Some(()) = redirect_tests::or_skip("image", prerequisites()) else {
        return;
    };
    let tag = format!("test-{}", std::process::id());
    let image = format!("{REPOSITORY}:{tag}");
    let dir = workspace_root().join("target/image").join(&tag);
    let mut scene = Scene::new(&image, &dir);

    let first = scene.build(&dir.join("first.oci.tar"));
    let second = scene.build(&dir.join("second.oci.tar"));
    assert_eq!(
        first.id, second.id,
        "two builds of the same sources gave two image ids"
    );
    assert!(
        fs::read(&first.archive).unwrap() == fs::read(&second.archive).unwrap(),
        "two builds of the same sources gave two different archives: {} and {}",
        first.archive.display(),
        second.archive.display()
    );

    // The archive names the image for every loader: podman, containerd (kind), docker.
    let index = json(&tar_member(&first.archive, "index.json"));
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(annotations["org.opencontainers.image.ref.name"], *image);
    assert_eq!(annotations["io.containerd.image.name"], *image);
    let docker = json(&tar_member(&first.archive, "manifest.json"));
    assert_eq!(docker[0]["RepoTags"], serde_json::json!([image]));

    // Everything below runs the image as loaded back from the archive.
    podman(&["rmi", &image]);
    let loaded = podman(&["load", "--input", &path_str(&first.archive)]);
    assert!(
        stdout(&loaded).contains(&image),
        "podman load did not name the image {image}: {}",
        stdout(&loaded)
    );
    assert_eq!(
        image_id(&image),
        first.id,
        "the archive loads as another image"
    );

    let version = podman(&run_args(&image, None, &["--version"]));
    assert_eq!(
        stdout(&version).trim(),
        format!("redirect-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let ctl = podman(&run_args(
        &image,
        Some("/usr/local/bin/redirectctl"),
        &["--help"],
    ));
    assert!(
        stdout(&ctl).contains("Usage: redirectctl"),
        "redirectctl --help: {}",
        stdout(&ctl)
    );

    let labels = json(&stdout(&podman(&[
        "image",
        "inspect",
        "--format",
        "{{json .Labels}}",
        &image,
    ])));
    for (label, want) in [
        ("title", "redirect-agent"),
        ("licenses", "Apache-2.0"),
        ("version", env!("CARGO_PKG_VERSION")),
        ("revision", &git_revision()),
        ("source", "https://github.com/redirect-dev/redirect"),
    ] {
        assert_eq!(
            labels[format!("org.opencontainers.image.{label}")],
            *want,
            "label org.opencontainers.image.{label} in {labels}"
        );
    }
    let entrypoint = stdout(&podman(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        &image,
    ]));
    assert_eq!(
        json(&entrypoint),
        serde_json::json!(["/usr/local/bin/redirect-agent"])
    );

    let container = scene.create_container();
    let rootfs = dir.join("rootfs.tar");
    podman(&["export", "--output", &path_str(&rootfs), &container]);
    let listing = tar(&["--list", "--file", &path_str(&rootfs)]);
    let entries: Vec<&str> = listing.lines().collect();
    assert_eq!(
        entries,
        [
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            BINARIES[0],
            BINARIES[1]
        ],
        "the image holds more (or less) than the two binaries"
    );
    let unpacked = dir.join("rootfs");
    fs::create_dir_all(&unpacked).unwrap();
    tar(&[
        "--extract",
        "--file",
        &path_str(&rootfs),
        "--directory",
        &path_str(&unpacked),
    ]);
    for bin in BINARIES {
        assert!(
            !has_interpreter(&unpacked.join(bin)),
            "/{bin} is dynamically linked (it names an ELF interpreter)"
        );
    }
    scene.done();
}

/// `Err(Skip)` when the test cannot run here (`./x setup` installs buildah and podman).
fn prerequisites() -> Result<(), SetupError> {
    require_root("for buildah and podman")?;
    require_tools(&["buildah", "podman"])
}

/// What the test tagged, created and wrote; removed on drop, also after a failed assertion.
struct Scene {
    image: String,
    dir: PathBuf,
    /// Ids of the images built: one, unless the builds differ.
    built: Vec<String>,
    containers: Vec<String>,
    started: Instant,
}

impl Scene {
    fn new(image: &str, dir: &Path) -> Scene {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).unwrap();
        Scene {
            image: image.to_string(),
            dir: dir.to_path_buf(),
            built: Vec::new(),
            containers: Vec::new(),
            started: Instant::now(),
        }
    }

    /// `cargo xtask image --tag <the test's tag> --output ARCHIVE`.
    fn build(&mut self, archive: &Path) -> Built {
        let tag = self.image.rsplit_once(':').expect("a tagged reference").1;
        let built = build(tag, archive);
        self.built.push(built.id.clone());
        built
    }

    /// A container of the image that is never started: its filesystem is the image's.
    fn create_container(&mut self) -> String {
        let out = podman(&[
            "create",
            "--runtime",
            "runc",
            "--network",
            "none",
            &self.image,
        ]);
        let id = stdout(&out).trim().to_string();
        self.containers.push(id.clone());
        id
    }

    fn done(self) {
        println!("image: all checks passed in {:.1?}", self.started.elapsed());
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for c in &self.containers {
            quiet(Command::new("podman").args(["rm", "--force", c]));
        }
        // Removes the tag; the image too when no other tag (`dev`, a release) names it.
        quiet(Command::new("podman").args(["rmi", &self.image]));
        // A build the other one untagged (when they differ) is left without a name.
        for id in &self.built {
            let tags = Command::new("podman")
                .args(["image", "inspect", "--format", "{{len .RepoTags}}", id])
                .output();
            if tags.is_ok_and(|o| o.status.success() && stdout(&o).trim() == "0") {
                quiet(Command::new("podman").args(["rmi", id]));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct Built {
    id: String,
    archive: PathBuf,
}

/// `cargo xtask image --tag TAG --output ARCHIVE`, with xtask in its own target directory:
/// `cargo test` holds the workspace's.
fn build(tag: &str, archive: &Path) -> Built {
    let root = workspace_root();
    let started = Instant::now();
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args(["run", "--quiet", "--locked", "--package", "xtask"])
        .arg("--target-dir")
        .arg(root.join("target/image/xtask"))
        .args(["--", "image", "--tag", tag, "--output"])
        .arg(archive)
        .output()
        .expect("running cargo");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "cargo xtask image failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("image: built in {:.1?}", started.elapsed());
    Built {
        id: image_id(&format!("{REPOSITORY}:{tag}")),
        archive: archive.to_path_buf(),
    }
}

fn run_args<'a>(image: &'a str, entrypoint: Option<&'a str>, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["run", "--rm", "--runtime", "runc", "--network", "none"];
    v.extend(ULIMITS);
    if let Some(e) = entrypoint {
        v.extend(["--entrypoint", e]);
    }
    v.push(image);
    v.extend(args);
    v
}

fn image_id(image: &str) -> String {
    let id = stdout(&podman(&["image", "inspect", "--format", "{{.Id}}", image]));
    id.trim().to_string()
}

/// Runs podman, failing the test with its output when it fails.
fn podman(args: &[&str]) -> Output {
    let out = Command::new("podman")
        .args(args)
        .output()
        .expect("running podman");
    assert!(
        out.status.success(),
        "podman {} failed: {}\n{}{}",
        args.join(" "),
        out.status,
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tar(args: &[&str]) -> String {
    let out = Command::new("tar")
        .args(args)
        .output()
        .expect("running tar");
    assert!(
        out.status.success(),
        "tar {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

fn tar_member(archive: &Path, member: &str) -> String {
    tar(&[
        "--extract",
        "--to-stdout",
        "--file",
        &path_str(archive),
        member,
    ])
}

fn quiet(c: &mut Command) {
    let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}

/// The commit the image's revision label names (`unknown` outside a git checkout).
fn git_revision() -> String {
    Command::new("git")
        .arg("-C")
        .arg(workspace_root())
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| stdout(&o).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether the ELF file at `path` names a program interpreter (PT_INTERP): every dynamically
/// linked executable does, a static (or static-pie) one does not.
fn has_interpreter(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        elf.len() > 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}
