//! Running programs inside a node or pod: `setns(CLONE_NEWNET)` and the move into the pod's
//! cgroup happen in `pre_exec`, before `exec`, so the program's first socket already has the
//! pod's netns and cgroup. Every process gets its own process group, killed as a whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;

/// Environment variables removed from every command: nothing inside the cluster may talk to
/// a proxy outside it.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// Output of a program run to completion.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl RunOutput {
    /// Whether the program exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout when the program succeeded, else an error holding the status and stderr.
    pub fn check(self) -> Result<String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            bail!(
                "exited with {}: stderr: {} stdout: {}",
                self.status,
                self.stderr.trim(),
                self.stdout.trim()
            )
        }
    }
}

/// Where a program runs: a netns and, for pods, a cgroup.
pub(crate) struct Place<'a> {
    pub label: &'a str,
    pub netns: &'a Path,
    /// The cgroup directory the process joins (a pod's `c0`), if any.
    pub cgroup: Option<&'a Path>,
    pub workdir: &'a Path,
    pub log_seq: &'a AtomicU32,
}

impl Place<'_> {
    pub fn command(&self, argv: &[&str]) -> Result<Command> {
        let (program, args) = argv.split_first().context("empty argv")?;
        let netns = File::open(self.netns)
            .with_context(|| format!("opening netns {}", self.netns.display()))?;
        let procs = match self.cgroup {
            Some(dir) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", dir.display()))?,
            ),
            None => None,
        };
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        // SAFETY: the closure only makes async-signal-safe system calls (write, setns) on
        // descriptors opened above; both are O_CLOEXEC and close at exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    // "0" moves the writing process: do it before any socket exists.
                    let n = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                    if n != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    pub fn spawn(&self, argv: &[&str]) -> Result<Proc> {
        let mut cmd = self.command(argv)?;
        let seq = self.log_seq.fetch_add(1, Ordering::Relaxed);
        let base = Path::new(argv[0])
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("proc");
        let log = self
            .workdir
            .join(format!("{}-{seq}-{base}.log", self.label));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(out.try_clone()?).stderr(out);
        let mut proc = Proc::spawn(cmd)?;
        proc.log = Some(log);
        proc.label = format!("{}: {}", self.label, argv.join(" "));
        Ok(proc)
    }

    pub fn run(&self, argv: &[&str], timeout: Duration) -> Result<RunOutput> {
        let cmd = self.command(argv)?;
        run_command(cmd, None, timeout)
            .with_context(|| format!("in {}: {}", self.label, argv.join(" ")))
    }
}

/// Whether `pid` (our child) has exited, without reaping it: while it is a zombie its pid,
/// which is also its process group id, cannot be reused, so the group can be killed safely.
fn exited_unreaped(pid: u32) -> bool {
    // SAFETY: waitid with WNOWAIT only inspects our own child; siginfo is plain data.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        r == 0 && info.si_pid() != 0
    }
}

fn kill_group(pid: u32) {
    // SAFETY: kill(2) on the process group this harness created (pgid == leader pid).
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

/// Runs `cmd` (in its own process group) with a time limit, feeding `stdin` and capturing
/// stdout and stderr. On timeout the group is killed and an error holds what was printed.
pub(crate) fn run_command(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<RunOutput> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let pid = child.id();
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let out_rx = reader(child.stdout.take());
    let err_rx = reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let timed_out = loop {
        if exited_unreaped(pid) {
            break false;
        }
        if Instant::now() >= deadline {
            break true;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // Kill leftovers of the group (and the leader on timeout) so the pipes close.
    kill_group(pid);
    let status = child.wait()?;
    let grace = Duration::from_secs(2);
    let stdout = String::from_utf8_lossy(&out_rx.recv_timeout(grace).unwrap_or_default()).into();
    let stderr = String::from_utf8_lossy(&err_rx.recv_timeout(grace).unwrap_or_default()).into();
    let output = RunOutput {
        status,
        stdout,
        stderr,
    };
    if timed_out {
        bail!("timed out after {timeout:?}; output so far: {output:?}");
    }
    Ok(output)
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// Runs a host tool (`ip`, `nft`) in the test's own namespaces; fails on a non-zero exit.
pub(crate) fn tool(argv: &[&str], stdin: Option<&str>) -> Result<String> {
    let (program, args) = argv.split_first().context("empty argv")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    if stdin.is_none() {
        cmd.stdin(Stdio::null());
    }
    run_command(cmd, stdin.map(str::as_bytes), Duration::from_secs(20))
        .and_then(RunOutput::check)
        .with_context(|| argv.join(" "))
}

/// A spawned process. Dropping it kills its whole process group and reaps it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    status: Option<ExitStatus>,
    log: Option<PathBuf>,
    label: String,
}

impl Proc {
    /// Spawns `cmd` in a new process group (use [`crate::Pod::command`] or
    /// [`crate::Node::command`] to get a command that enters the cluster).
    pub fn spawn(mut cmd: Command) -> Result<Proc> {
        cmd.process_group(0);
        let label = format!("{:?}", cmd.get_program());
        let child = cmd.spawn().with_context(|| format!("spawning {label}"))?;
        Ok(Proc {
            child,
            status: None,
            log: None,
            label,
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file holding stdout and stderr, for processes started with `spawn(argv)`.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// What the process printed so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() && exited_unreaped(self.pid()) {
            kill_group(self.pid());
            self.status = Some(self.child.wait()?);
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` until the log contains `needle`; fails early if the process
    /// exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                bail!(
                    "{} exited with {status} before printing {needle:?}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process (not its group); a no-op after it was reaped.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).map_err(|e| anyhow!("kill {signal}: {e}"))
    }

    /// Kills the process group with SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        kill_group(self.pid());
        let s = self.child.wait()?;
        self.status = Some(s);
        Ok(s)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
