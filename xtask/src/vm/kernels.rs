//! Stock Debian kernels for the QEMU harness: the newest `linux-image-amd64` of a series,
//! downloaded from the Debian archive and unpacked (never installed) under the cache.
//!
//! apt runs with a private configuration under `<cache>/apt/` (sources, lists, caches, an
//! empty dpkg status), so the machine's own apt sources and state are neither read nor
//! changed. The meta package `linux-image-amd64` is the way in: the ABI-numbered packages it
//! depends on (`linux-image-6.1.0-57-amd64`) vanish from the archive when the ABI bumps,
//! while the meta package's versions stay listed per suite.

use std::{
    cmp::Ordering,
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The kernels the harness knows by series.
pub const SERIES: [&str; 4] = ["5.10", "6.1", "6.12", "7.3"];

/// An unpacked kernel: `root/boot/vmlinuz-<release>` and `root/lib/modules/<release>/` with a
/// fresh modules.dep (depmod -b run over it).
#[derive(Clone, Debug)]
pub struct Kernel {
    pub series: String,
    /// Debian version of the image package, e.g. "5.10.244-1".
    pub package_version: String,
    /// `uname -r`, e.g. "5.10.0-35-amd64".
    pub release: String,
    /// The unpacked tree.
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
}

/// The meta package that always points at a series' current image.
const META: &str = "linux-image-amd64";
/// Every suite that carries one of SERIES: 5.10 from bullseye, 6.1 from bookworm, 6.12 from
/// bookworm-backports or trixie, 7.3 from trixie-backports. The newest version of the series
/// wins, whichever suite has it.
const SOURCES: [(&str, &str); 8] = [
    ("http://deb.debian.org/debian", "bullseye"),
    ("http://deb.debian.org/debian-security", "bullseye-security"),
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian-security", "trixie-security"),
    ("http://deb.debian.org/debian", "trixie-backports"),
];
/// debian-archive-keyring's full keyring holds the bullseye, bookworm and trixie keys (the
/// backports and security suites are signed with the same release's automatic keys).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Written last, after depmod: a tree without it is an interrupted attempt.
const STAMP: &str = "kernel.json";

/// Returns the newest Debian kernel of `series`, downloading and unpacking it under
/// `cache/kernels/<series>/` unless already there (then no network at all). `refresh`
/// re-resolves the newest version and fetches it if it changed.
pub fn fetch(series: &str, cache: &Path, refresh: bool) -> Result<Kernel> {
    if !SERIES.contains(&series) {
        bail!(
            "unknown kernel series {series:?}: the harness knows {}",
            SERIES.join(", ")
        );
    }
    let dir = cache.join("kernels").join(series);
    let have = read_stamp(series, &dir);
    // What an interrupted attempt left (see fetch_newest).
    remove_dir(&partial_of(&dir))?;
    if let Some(k) = &have
        && !refresh
    {
        return Ok(k.clone());
    }
    // Before any download: without depmod the tree could not be finished.
    let depmod = depmod_binary()?;
    let apt = Apt::new(&cache.join("apt"))?;
    let mut updated = false;
    if refresh || !apt.has_lists() {
        apt.update(series)?;
        updated = true;
    }
    // Stale lists may lack the series or name packages the archive has since dropped: one
    // `apt-get update` and a second try.
    loop {
        match fetch_newest(&apt, &depmod, series, &dir, have.as_ref()) {
            Err(e) if !updated => {
                eprintln!("vm: {e:#}; updating the package lists");
                apt.update(series)?;
                updated = true;
            }
            result => return result,
        }
    }
}

/// Resolves the newest version of `series` in the lists and, unless `have` is it, unpacks it
/// into `dir`.
fn fetch_newest(
    apt: &Apt,
    depmod: &Path,
    series: &str,
    dir: &Path,
    have: Option<&Kernel>,
) -> Result<Kernel> {
    let madison = apt.output("apt-cache", &["madison", META])?;
    let Some((version, suite)) = newest(&madison, series) else {
        bail!("no {META} of series {series} in the package lists of {SUITES_SHOWN}");
    };
    if let Some(k) = have
        && k.package_version == version
    {
        return Ok(k.clone());
    }
    let packages = closure(apt, &version)?;
    let release = abi_release(&packages, series)?;
    let shown: Vec<&str> = packages
        .iter()
        .map(String::as_str)
        .filter(|p| *p != META)
        .collect();
    eprintln!("vm: fetching {} ({version}) from {suite}", shown.join(", "));
    let started = std::time::Instant::now();
    // Built beside the final place and renamed into it, so an interrupted run leaves no tree
    // that looks complete; `fetch` removes a leftover from one. (Two fetches of one series
    // into one cache at the same time are not supported.)
    let partial = partial_of(dir);
    let pinned: Vec<String> = packages.iter().map(|p| format!("{p}={version}")).collect();
    if let Err(e) = unpack(apt, depmod, &pinned, &release, &partial) {
        let _ = remove_dir(&partial);
        return Err(e.context(format!(
            "fetching {} ({version}) from {suite}",
            shown.join(", ")
        )));
    }
    let stamp = serde_json::json!({
        "series": series, "package_version": version, "release": release,
    });
    fs::write(partial.join(STAMP), format!("{stamp:#}\n"))?;
    remove_dir(dir)?;
    fs::rename(&partial, dir)
        .with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    eprintln!(
        "vm: kernel {release} unpacked in {:.0?} into {}",
        started.elapsed(),
        dir.display()
    );
    read_stamp(series, dir).with_context(|| format!("{} is incomplete", dir.display()))
}

/// Downloads the `pinned` packages (`name=version`) and unpacks them together into
/// `partial/root`, with the modules indexed; the .debs are deleted afterwards.
fn unpack(
    apt: &Apt,
    depmod: &Path,
    pinned: &[String],
    release: &str,
    partial: &Path,
) -> Result<()> {
    let root = partial.join("root");
    let debs = partial.join("debs");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    fs::create_dir_all(&debs)?;
    cmd::run(
        apt.command("apt-get")
            .args(["-q", "download"])
            .args(pinned)
            .current_dir(&debs),
    )?;
    for deb in fs::read_dir(&debs)? {
        cmd::run(Command::new("dpkg").arg("-x").arg(deb?.path()).arg(&root))?;
    }
    remove_dir(&debs)?;
    normalize(&root, release)?;
    cmd::run(Command::new(depmod).arg("-b").arg(&root).arg(release))
        .with_context(|| format!("indexing the modules of {release} in {}", root.display()))
}

/// The complete tree in `dir`, or None (then whatever is there is redone).
fn read_stamp(series: &str, dir: &Path) -> Option<Kernel> {
    let stamp: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join(STAMP)).ok()?).ok()?;
    let field = |name: &str| stamp[name].as_str().map(str::to_string);
    let (version, release) = (field("package_version")?, field("release")?);
    let root = dir.join("root");
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules = root.join("lib/modules").join(&release);
    (field("series")? == series && vmlinuz.is_file() && modules.join("modules.dep").is_file()).then(
        || Kernel {
            series: series.to_string(),
            package_version: version,
            release,
            root,
            vmlinuz,
        },
    )
}

const SUITES_SHOWN: &str = "deb.debian.org's bullseye, bookworm and trixie suites";

/// The package set of one kernel build: the meta package and everything it pulls in at
/// exactly its version (`linux-image-X (= V)`; the 7.3 split adds `linux-binary-X`,
/// `linux-modules-X`, `linux-base-X` and their metas the same way). Other dependencies
/// (kmod, initramfs-tools) are not part of the kernel.
fn closure(apt: &Apt, version: &str) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![META.to_string()];
    while let Some(package) = todo.pop() {
        if !seen.insert(package.clone()) {
            continue;
        }
        let show = apt.output("apt-cache", &["show", &format!("{package}={version}")])?;
        for field in ["Pre-Depends", "Depends"] {
            if let Some(depends) = field_of(&show, field) {
                todo.extend(exact_deps(&depends, version));
            }
        }
    }
    Ok(seen)
}

/// The private apt: `dir` holds its configuration, lists and caches.
struct Apt {
    dir: PathBuf,
    config: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources: String = SOURCES
            .iter()
            .map(|(url, suite)| format!("deb [signed-by={KEYRING}] {url} {suite} main\n"))
            .collect();
        fs::write(dir.join("sources.list"), sources)?;
        // An empty dpkg status: nothing counts as installed, and the host's is not read.
        fs::write(dir.join("status"), "")?;
        let d = dir.display();
        // Read through APT_CONFIG, which apt reads before /etc/apt/apt.conf.d; pointing the
        // parts directory at /dev/null keeps the host's snippets (DEP-11 downloads, update
        // hooks) out.
        let config = format!(
            "Dir::Etc::Parts \"/dev/null\";\n\
             Dir::Etc::Main \"/dev/null\";\n\
             Dir::Etc::SourceList \"{d}/sources.list\";\n\
             Dir::Etc::SourceParts \"/dev/null\";\n\
             Dir::Etc::Preferences \"/dev/null\";\n\
             Dir::Etc::PreferencesParts \"/dev/null\";\n\
             Dir::State \"{d}\";\n\
             Dir::State::Lists \"{d}/lists\";\n\
             Dir::State::status \"{d}/status\";\n\
             Dir::Cache \"{d}/cache\";\n\
             // apt keeps two 85 MB binary caches of the lists; one makes queries fast.\n\
             Dir::Cache::srcpkgcache \"\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n\
             Acquire::Languages \"none\";\n\
             Acquire::GzipIndexes \"true\";\n\
             // As root, apt downloads as the user _apt, which may not write into the cache\n\
             // (apt-get download writes into its working directory).\n\
             APT::Sandbox::User \"root\";\n"
        );
        let path = dir.join("apt.conf");
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(Apt {
            dir: dir.to_path_buf(),
            config: path,
        })
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists"))
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != "partial")))
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", &self.config);
        c
    }

    /// `apt-get update` of the private lists; any suite that fails is an error.
    fn update(&self, series: &str) -> Result<()> {
        eprintln!("vm: updating the package lists of {SUITES_SHOWN}");
        let out = self
            .command("apt-get")
            .args(["-q", "update"])
            .output()
            .context("could not start apt-get")?;
        let said = String::from_utf8_lossy(&out.stderr);
        // With older lists in place, apt only warns of a suite it could not fetch and exits 0.
        if !out.status.success() || said.contains("Failed to fetch") {
            // The first failure says enough (usually the same for every suite).
            let first = said.lines().find(|l| l.contains("Failed to fetch"));
            bail!(
                "apt-get update of the Debian archive failed ({}): {}\n\
                 Fetching kernel {series} needs http://deb.debian.org/debian and \
                 http://deb.debian.org/debian-security reachable (suites {}); or give the path \
                 to a vmlinuz instead",
                out.status,
                first.unwrap_or(said.trim()),
                SOURCES.map(|(_, s)| s).join(", ")
            );
        }
        Ok(())
    }

    /// Runs a query and returns its standard output.
    fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let what = format!("{program} {}", args.join(" "));
        let out = cmd::output(self.command(program).args(args), &what)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// The newest version in `apt-cache madison` output whose upstream version is of `series`
/// ("6.1.x", not "6.12.x"), with the suite that has it.
fn newest(madison: &str, series: &str) -> Option<(String, String)> {
    madison
        .lines()
        .filter_map(|line| {
            let mut cols = line.split('|').map(str::trim);
            let (_, version, source) = (cols.next()?, cols.next()?, cols.next()?);
            // "http://deb.debian.org/debian trixie-backports/main amd64 Packages"
            let suite = source.split_whitespace().nth(1)?.split('/').next()?;
            let upstream = upstream(version);
            (upstream == series || upstream.starts_with(&format!("{series}.")))
                .then(|| (version.to_string(), suite.to_string()))
        })
        .max_by(|a, b| version_cmp(&a.0, &b.0))
}

/// "1:6.1.192-3" → "6.1.192": without epoch and Debian revision.
fn upstream(version: &str) -> &str {
    let v = version.split_once(':').map_or(version, |(_, v)| v);
    v.rsplit_once('-').map_or(v, |(u, _)| u)
}

/// Debian version order (deb-version(7)): epoch numerically, then upstream version and
/// revision, each compared in alternating non-digit runs (`~` before everything, even the
/// end; letters before other characters) and numbers.
fn version_cmp(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, rest)) if e.bytes().all(|c| c.is_ascii_digit()) => {
                (e.parse().unwrap_or(0), rest)
            }
            _ => (0, v),
        };
        let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
        (epoch, upstream, revision)
    }
    fn order(c: Option<&u8>) -> i32 {
        match c {
            Some(b'~') => -1,
            None => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(*c),
            Some(c) => i32::from(*c) + 256,
        }
    }
    fn part(mut a: &[u8], mut b: &[u8]) -> Ordering {
        while !a.is_empty() || !b.is_empty() {
            let (na, nb) = (
                a.iter().take_while(|c| !c.is_ascii_digit()).count(),
                b.iter().take_while(|c| !c.is_ascii_digit()).count(),
            );
            for i in 0..na.max(nb) {
                let (x, y) = (order(a[..na].get(i)), order(b[..nb].get(i)));
                if x != y {
                    return x.cmp(&y);
                }
            }
            (a, b) = (&a[na..], &b[nb..]);
            let (da, db) = (
                a.iter().take_while(|c| c.is_ascii_digit()).count(),
                b.iter().take_while(|c| c.is_ascii_digit()).count(),
            );
            let trim =
                |d: &[u8]| -> Vec<u8> { d.iter().copied().skip_while(|c| *c == b'0').collect() };
            let (x, y) = (trim(&a[..da]), trim(&b[..db]));
            match x.len().cmp(&y.len()).then_with(|| x.cmp(&y)) {
                Ordering::Equal => (a, b) = (&a[da..], &b[db..]),
                other => return other,
            }
        }
        Ordering::Equal
    }
    let ((ea, ua, ra), (eb, ub, rb)) = (split(a), split(b));
    ea.cmp(&eb)
        .then_with(|| part(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| part(ra.as_bytes(), rb.as_bytes()))
}

/// The value of `field` in the first paragraph of `apt-cache show` output, continuation
/// lines joined.
fn field_of(show: &str, field: &str) -> Option<String> {
    let mut lines = show.lines().take_while(|l| !l.is_empty());
    let first = lines.find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    })?;
    let mut value = first.trim().to_string();
    for more in lines.take_while(|l| l.starts_with([' ', '\t'])) {
        value.push(' ');
        value.push_str(more.trim());
    }
    Some(value)
}

/// The packages a Depends line requires at exactly `version` (`name (= version)`);
/// alternatives (`a | b`) are never part of one kernel build.
fn exact_deps(depends: &str, version: &str) -> Vec<String> {
    depends
        .split(',')
        .filter(|clause| !clause.contains('|'))
        .filter_map(|clause| {
            let (name, constraint) = clause.trim().split_once('(')?;
            let wanted = constraint
                .trim_end()
                .strip_suffix(')')?
                .trim()
                .strip_prefix('=')?;
            let name = name.trim();
            // A name may carry an architecture qualifier ("foo:any").
            let name = name.split_once(':').map_or(name, |(n, _)| n);
            (wanted.trim() == version).then(|| name.to_string())
        })
        .collect()
}

/// The kernel release (`uname -r`) from the one ABI image package among `packages`
/// (`linux-image-6.1.0-57-amd64` → `6.1.0-57-amd64`), checked against the series.
fn abi_release(packages: &BTreeSet<String>, series: &str) -> Result<String> {
    let releases: Vec<&str> = packages
        .iter()
        .filter(|p| p.as_str() != META)
        .filter_map(|p| p.strip_prefix("linux-image-"))
        .collect();
    match releases[..] {
        [release] if release.starts_with(&format!("{series}.")) => Ok(release.to_string()),
        _ => bail!(
            "{META} of series {series} depends on linux-image packages {releases:?}: expected \
             exactly one, of release {series}.*"
        ),
    }
}

/// "vmlinuz-6.1.0-57-amd64" → "6.1.0-57-amd64".
fn release_of_vmlinuz(file_name: &str) -> Option<&str> {
    file_name.strip_prefix("vmlinuz-").filter(|r| !r.is_empty())
}

/// Brings every package layout to `boot/vmlinuz-<release>` and `lib/modules/<release>/`, the
/// one the boot code and the host's kmod (which reads `<base>/lib/modules`) expect. Trixie's
/// packages put modules under `usr/lib/modules` (merged /usr); 7.3's put vmlinuz, config and
/// System.map there too, and have no `boot/`.
fn normalize(root: &Path, release: &str) -> Result<()> {
    let modules = root.join("lib/modules");
    let usr_modules = root.join("usr/lib/modules");
    if !modules.exists() && usr_modules.is_dir() {
        fs::create_dir_all(root.join("lib"))?;
        fs::rename(&usr_modules, &modules).with_context(|| {
            format!("moving {} to {}", usr_modules.display(), modules.display())
        })?;
    }
    let boot = root.join("boot");
    fs::create_dir_all(&boot)?;
    let dir = modules.join(release);
    for name in ["vmlinuz", "config", "System.map"] {
        let (from, to) = (dir.join(name), boot.join(format!("{name}-{release}")));
        if from.is_file() && !to.exists() {
            fs::rename(&from, &to)
                .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        }
    }
    // Exactly the image of the release the packages named; anything else means the packages'
    // layout changed.
    let names: Vec<String> = fs::read_dir(&boot)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let images: Vec<&str> = names.iter().filter_map(|n| release_of_vmlinuz(n)).collect();
    if images != [release] || !dir.is_dir() {
        bail!(
            "the unpacked packages of kernel {release} hold images {images:?} in boot/ and \
             {} modules directory {}",
            if dir.is_dir() { "the" } else { "no" },
            dir.display()
        );
    }
    Ok(())
}

/// kmod's depmod, which writes modules.dep (and the other indexes) for the unpacked modules.
fn depmod_binary() -> Result<PathBuf> {
    // Often in /usr/sbin, which a non-root PATH lacks.
    let found = ["/usr/sbin/depmod", "/sbin/depmod"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    match found {
        Some(p) => Ok(p),
        None if Command::new("depmod").arg("--version").output().is_ok() => Ok("depmod".into()),
        None => bail!(
            "depmod is needed to index the kernel's modules: install kmod (apt-get install kmod)"
        ),
    }
}

/// `kernels/<series>.partial` beside `kernels/<series>` (not `with_extension`: "6.1" has one).
fn partial_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dir.with_file_name(name)
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MADISON: &str = "\
linux-image-amd64 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages
linux-image-amd64 | 6.12.118-1 | http://deb.debian.org/debian-security trixie-security/main amd64 Packages
linux-image-amd64 | 6.12.117-1 | http://deb.debian.org/debian trixie/main amd64 Packages
linux-image-amd64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages
linux-image-amd64 |  6.1.192-3 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-image-amd64 |  6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages
linux-image-amd64 | 5.10.262-1 | http://deb.debian.org/debian-security bullseye-security/main amd64 Packages
linux-image-amd64 | 5.10.223-1 | http://deb.debian.org/debian bullseye/main amd64 Packages
";

    fn pick(madison: &str, series: &str) -> Option<(String, String)> {
        newest(madison, series)
    }

    #[test]
    fn newest_of_each_series() {
        let want = |v: &str, s: &str| Some((v.to_string(), s.to_string()));
        assert_eq!(
            pick(MADISON, "5.10"),
            want("5.10.262-1", "bullseye-security")
        );
        assert_eq!(pick(MADISON, "6.1"), want("6.1.192-3", "bookworm-security"));
        assert_eq!(pick(MADISON, "6.12"), want("6.12.118-1", "trixie-security"));
        assert_eq!(
            pick(MADISON, "7.3"),
            want("7.3.4-1~bpo13+1", "trixie-backports")
        );
        assert_eq!(pick(MADISON, "6.2"), None);
        assert_eq!(pick("", "6.1"), None);
        assert_eq!(pick("garbage\n| |\n", "6.1"), None);
    }

    #[test]
    fn newest_does_not_trust_the_order() {
        // 6.1 must not take 6.12's versions; 6.1.9 < 6.1.10 numerically; a backport (~bpo)
        // sorts below the release it came from.
        let madison = "\
linux-image-amd64 | 6.1.9-1 | http://deb.debian.org/debian bookworm/main amd64 Packages
linux-image-amd64 | 6.12.1-1 | http://deb.debian.org/debian trixie/main amd64 Packages
linux-image-amd64 | 6.1.10-1~bpo11+1 | http://deb.debian.org/debian bullseye-backports/main amd64 Packages
linux-image-amd64 | 6.1.10-1 | http://deb.debian.org/debian bookworm-security/main amd64 Packages
";
        assert_eq!(
            pick(madison, "6.1"),
            Some(("6.1.10-1".to_string(), "bookworm-security".to_string()))
        );
    }

    #[test]
    fn debian_version_order() {
        use Ordering::*;
        for (a, b, want) in [
            ("6.1.192-3", "6.1.192-3", Equal),
            ("6.1.9-1", "6.1.10-1", Less),
            ("7.3.4-1~bpo13+1", "7.3.4-1", Less),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1:1.0-1", "2.0-1", Greater),
            ("1.0a-1", "1.0+-1", Less),
            ("1.0-1", "1.0-1.1", Less),
            ("1.01-1", "1.1-1", Equal),
        ] {
            assert_eq!(version_cmp(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn upstream_strips_epoch_and_revision() {
        assert_eq!(upstream("6.1.192-3"), "6.1.192");
        assert_eq!(upstream("1:7.3.4-1~bpo13+1"), "7.3.4");
        assert_eq!(upstream("6.12"), "6.12");
    }

    #[test]
    fn classic_image_depends_on_one_abi_package() {
        let show = "Package: linux-image-amd64\nVersion: 6.1.192-3\n\
                    Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)\nSize: 1\n\n\
                    Package: linux-image-amd64\nDepends: other\n";
        let depends = field_of(show, "Depends").unwrap();
        let deps = exact_deps(&depends, "6.1.192-3");
        assert_eq!(deps, ["linux-image-6.1.0-57-amd64"]);
        // The ABI package's own dependencies are not part of the kernel.
        let abi =
            "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool";
        assert!(exact_deps(abi, "6.1.192-3").is_empty());
        let set: BTreeSet<String> = [META.to_string(), deps[0].clone()].into();
        assert_eq!(abi_release(&set, "6.1").unwrap(), "6.1.0-57-amd64");
        assert!(abi_release(&set, "6.12").is_err());
    }

    #[test]
    fn split_image_depends_on_binary_modules_and_base() {
        let v = "7.3.4-1~bpo13+1";
        let meta = "linux-base-amd64 (= 7.3.4-1~bpo13+1), linux-image-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-modules-amd64 (= 7.3.4-1~bpo13+1)";
        assert_eq!(
            exact_deps(meta, v),
            [
                "linux-base-amd64",
                "linux-image-7.3.4+deb13-amd64",
                "linux-modules-amd64"
            ]
        );
        let image = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)";
        assert_eq!(
            exact_deps(image, v),
            [
                "linux-base-7.3.4+deb13-amd64",
                "linux-binary-7.3.4+deb13-amd64",
                "linux-modules-7.3.4+deb13-amd64"
            ]
        );
        // Another version, another build: not followed.
        assert!(exact_deps("linux-base-amd64 (= 7.3.3-1)", v).is_empty());
        let set: BTreeSet<String> = [
            META,
            "linux-base-amd64",
            "linux-image-7.3.4+deb13-amd64",
            "linux-binary-7.3.4+deb13-amd64",
            "linux-modules-7.3.4+deb13-amd64",
        ]
        .map(String::from)
        .into();
        assert_eq!(abi_release(&set, "7.3").unwrap(), "7.3.4+deb13-amd64");
    }

    #[test]
    fn field_joins_continuation_lines() {
        let show = "Package: x\nDepends: a (= 1),\n b (= 1)\nSize: 2\n";
        assert_eq!(field_of(show, "Depends").unwrap(), "a (= 1), b (= 1)");
        assert_eq!(field_of(show, "Pre-Depends"), None);
    }

    #[test]
    fn release_from_the_vmlinuz_name() {
        assert_eq!(
            release_of_vmlinuz("vmlinuz-5.10.0-46-amd64"),
            Some("5.10.0-46-amd64")
        );
        assert_eq!(
            release_of_vmlinuz("vmlinuz-7.3.4+deb13-amd64"),
            Some("7.3.4+deb13-amd64")
        );
        assert_eq!(release_of_vmlinuz("vmlinuz-"), None);
        assert_eq!(release_of_vmlinuz("config-6.1.0-57-amd64"), None);
    }

    #[test]
    fn unknown_series_is_named() {
        let e = fetch("4.19", Path::new("/nonexistent"), false)
            .err()
            .unwrap();
        let e = format!("{e:#}");
        assert!(
            e.contains("4.19") && e.contains("5.10, 6.1, 6.12, 7.3"),
            "{e}"
        );
    }
}
