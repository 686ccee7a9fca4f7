//! The guest's first userspace: a busybox initramfs that loads the modules the root needs,
//! mounts this machine's root read-only over 9p under a tmpfs overlay, and hands over to the
//! guest script (see [`crate::vm::guest`]) inside it.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::cpio::Cpio;
use crate::cmd;

/// Modules the first init loads before it can mount the root: 9p over virtio, the overlay,
/// and the entropy device (crypto and `getrandom` would otherwise wait on early kernels).
/// Those built into a kernel are skipped.
pub const EARLY_MODULES: [&str; 5] = ["virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_rng"];

/// A statically linked busybox (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";

/// The 9p tag of this machine's root.
pub const ROOT_TAG: &str = "hostroot";

/// Where the kernel's modules are and what the first init mounts over.
pub struct Layout<'a> {
    /// `uname -r` of the kernel.
    pub release: &'a str,
    /// The unpacked tree holding `lib/modules/<release>` (a path on this machine, which the
    /// guest sees at the same place through the shared root).
    pub tree: &'a Path,
    /// The script the guest runs once its root is mounted.
    pub guest_script: &'a str,
}

/// Writes the initramfs for `layout` to `out`.
pub fn write(layout: &Layout, out: &Path) -> Result<()> {
    let modules_dir = layout.tree.join("lib/modules").join(layout.release);
    let index = ModuleIndex::read(&modules_dir)?;
    let order = index.load_order(&EARLY_MODULES).with_context(|| {
        format!(
            "kernel {}: the modules the guest needs to mount its root",
            layout.release
        )
    })?;
    let busybox = fs::read(BUSYBOX).with_context(|| {
        format!(
            "reading {BUSYBOX}: the guest's init is busybox-static (apt-get install busybox-static)"
        )
    })?;
    let mut c = Cpio::default();
    for d in [
        "/bin", "/dev", "/proc", "/sys", "/host", "/rw", "/newroot", "/modules",
    ] {
        c.dir(d);
    }
    c.file("/bin/busybox", 0o755, &busybox);
    c.symlink("/bin/sh", "busybox");
    let mut names = Vec::new();
    for (i, rel) in order.iter().enumerate() {
        let name = format!("{i:02}-{}.ko", module_name(rel));
        c.file(
            &format!("/modules/{name}"),
            0o644,
            &decompress(&modules_dir.join(rel))?,
        );
        names.push(name);
    }
    c.file(
        "/modules/order",
        0o644,
        (names.join("\n") + "\n").as_bytes(),
    );
    c.file("/guest", 0o755, layout.guest_script.as_bytes());
    c.file("/init", 0o755, first_init(layout).as_bytes());
    fs::write(out, c.finish()).with_context(|| format!("writing {}", out.display()))
}

/// PID 1 until the root is mounted. A failure prints a marker the harness reports, then powers
/// off (rather than a panic's reboot loop).
fn first_init(layout: &Layout) -> String {
    let modules = format!("/newroot/lib/modules/{}", layout.release);
    let tree_modules = format!(
        "/newroot{}/lib/modules/{}",
        layout.tree.display(),
        layout.release
    );
    format!(
        r#"#!/bin/sh
/bin/busybox --install -s /bin
fail() {{ echo "vm-test: boot failed: $*"; echo o >/proc/sysrq-trigger; sleep 60; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
  insmod /modules/$m || fail "insmod $m"
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro {ROOT_TAG} /host || fail "mounting the shared root over 9p"
mount -t tmpfs -o mode=0755 rw /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "overlay over the shared root"
mkdir -p {modules} && mount --bind {tree_modules} {modules} || fail "binding the kernel's modules"
cp /guest /newroot/.vm-guest || fail "copying the guest script"
umount /proc /sys
mount --move /dev /newroot/dev || fail "moving /dev"
exec switch_root /newroot /bin/sh /.vm-guest
"#
    )
}

/// `kernel/fs/9p/9p.ko.xz` → `9p`.
fn module_name(rel: &str) -> &str {
    let base = rel.rsplit('/').next().unwrap_or(rel);
    base.split(".ko").next().unwrap_or(base)
}

/// Dashes and underscores name the same module.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    cmd::output(
        Command::new(tool).arg("-dc").arg(path),
        &format!("{tool} -dc {name} (is {tool} installed?)"),
    )
}

/// What `modules.dep` and `modules.builtin` say of a kernel's modules.
pub struct ModuleIndex {
    /// Module name → (path under the modules directory, its dependencies' paths).
    deps: BTreeMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
    dir: PathBuf,
}

impl ModuleIndex {
    pub fn read(dir: &Path) -> Result<Self> {
        let dep = fs::read_to_string(dir.join("modules.dep")).with_context(|| {
            format!(
                "reading {}/modules.dep (is the kernel unpacked, depmod run?)",
                dir.display()
            )
        })?;
        let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        Self::parse(&dep, &builtin, dir)
    }

    fn parse(dep: &str, builtin: &str, dir: &Path) -> Result<Self> {
        let mut deps = BTreeMap::new();
        for (n, line) in dep
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let Some((module, needs)) = line.split_once(':') else {
                bail!(
                    "{}/modules.dep line {}: no ':' in {line:?}",
                    dir.display(),
                    n + 1
                );
            };
            let needs = needs.split_whitespace().map(str::to_string).collect();
            deps.insert(normalize(module_name(module)), (module.to_string(), needs));
        }
        let builtin = builtin
            .lines()
            .map(|l| normalize(module_name(l.trim())))
            .collect();
        Ok(Self {
            deps,
            builtin,
            dir: dir.to_path_buf(),
        })
    }

    /// Paths to load, dependencies first, each once; built-in modules are left out.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for w in wanted {
            let name = normalize(w);
            if self.builtin.contains(&name) {
                continue;
            }
            let Some((path, _)) = self.deps.get(&name) else {
                bail!(
                    "module {w} is neither built in nor in {}/modules.dep",
                    self.dir.display()
                );
            };
            self.visit(path, &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if depth > 64 {
            bail!("module dependencies nest deeper than 64 at {path}: a cycle in modules.dep?");
        }
        if !seen.insert(path.to_string()) {
            return Ok(());
        }
        if let Some((_, needs)) = self.deps.get(&normalize(module_name(path))) {
            for n in needs {
                self.visit(n, seen, order, depth + 1)?;
            }
        }
        order.push(path.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz kernel/fs/fscache/fscache.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/fs/netfs/netfs.ko.xz: kernel/fs/fscache/fscache.ko.xz
kernel/fs/fscache/fscache.ko.xz:
kernel/fs/overlayfs/overlay.ko.xz:
";

    fn index(builtin: &str) -> ModuleIndex {
        ModuleIndex::parse(DEP, builtin, Path::new("/m")).unwrap()
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let order = index("")
            .load_order(&["9pnet-virtio", "9p", "overlay"])
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/fscache/fscache.ko.xz",
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/fs/9p/9p.ko.xz",
                "kernel/fs/overlayfs/overlay.ko.xz",
            ]
        );
    }

    #[test]
    fn built_in_modules_are_skipped_and_unknown_ones_named() {
        let idx = index("kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/overlayfs/overlay.ko\n");
        assert_eq!(
            idx.load_order(&["virtio_pci", "overlay"]).unwrap(),
            Vec::<String>::new()
        );
        let err = idx.load_order(&["veth"]).unwrap_err().to_string();
        assert!(
            err.contains("veth") && err.contains("/m/modules.dep"),
            "{err}"
        );
    }

    #[test]
    fn a_line_without_a_colon_is_an_error_with_its_number() {
        let Err(e) = ModuleIndex::parse("a.ko:\nbroken\n", "", Path::new("/m")) else {
            panic!("accepted a broken modules.dep");
        };
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn names_drop_the_directory_and_compression() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.zst"), "9p");
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
    }
}
