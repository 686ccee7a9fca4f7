//! Booting a kernel under QEMU with this machine's root shared over 9p, the console streamed to
//! a log and the terminal, and the guest's step markers read back.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{guest, initramfs::ROOT_TAG};

pub struct Machine<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The console goes here as well as to the terminal.
    pub log: &'a Path,
    /// Prefix of the console lines shown on the terminal.
    pub label: &'a str,
    pub timeout: Duration,
}

/// What the guest reported.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// The guest's `uname -r`, once it got that far.
    pub release: Option<String>,
    /// Steps in order, with their exit status (None: started, never finished).
    pub steps: Vec<(String, Option<i32>)>,
    /// The guest reached its end.
    pub done: bool,
    /// Why the boot failed, from the first init.
    pub boot_failure: Option<String>,
    /// Console lines of each step (for the summary: test counts, verifier table).
    pub output: Vec<(String, Vec<String>)>,
}

impl Report {
    /// Folds one console line in.
    pub fn line(&mut self, line: &str) {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(guest::BEGIN) {
            self.release = Some(rest.trim().to_string());
        } else if let Some(name) = line.strip_prefix(guest::STEP) {
            self.steps.push((name.to_string(), None));
            self.output.push((name.to_string(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix(guest::EXIT) {
            if let Some((name, code)) = rest.rsplit_once(' ')
                && let Some(step) = self.steps.iter_mut().rev().find(|(n, _)| n == name)
            {
                step.1 = code.parse().ok();
            }
        } else if line.starts_with(guest::DONE) {
            self.done = true;
        } else if let Some(why) = line.strip_prefix("vm-test: boot failed: ") {
            self.boot_failure = Some(why.to_string());
        } else if let Some((_, out)) = self.output.last_mut() {
            out.push(line.to_string());
        }
    }

    pub fn passed(&self) -> bool {
        self.done && !self.steps.is_empty() && self.steps.iter().all(|(_, c)| *c == Some(0))
    }
}

fn qemu_command(m: &Machine) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    // Software emulation: the harness must not depend on (nested) KVM, which may hang stock
    // kernels; emulation is only for correctness, never for timing.
    c.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-m", &m.memory_mib.to_string()])
        .args(["-smp", &m.cpus.to_string()])
        .args([
            "-machine",
            "q35",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-nic", "none"])
        .args(["-device", "virtio-rng-pci"])
        .arg("-virtfs")
        .arg(format!(
            "local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
        ))
        .arg("-kernel")
        .arg(m.vmlinuz)
        .arg("-initrd")
        .arg(m.initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=4 panic=-1 no_timer_check rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Boots the machine and follows its console until the guest powers off or the time is up.
pub fn boot(m: &Machine) -> Result<Report> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!(
            "qemu-system-x86_64 is not installed: run ./x setup (it installs qemu-system-x86, \
             busybox-static and kmod)"
        );
    }
    let mut child = qemu_command(m)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut log =
        fs::File::create(m.log).with_context(|| format!("creating {}", m.log.display()))?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = Instant::now() + m.timeout;
    let mut report = Report::default();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(5))) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                println!("[{}] {}", m.label, line.trim_end_matches('\r'));
                report.line(&line);
            }
            // Both streams closed: QEMU has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for qemu")?;
    if timed_out {
        bail!(
            "{}: no power-off within {:?} (last step: {:?}); console in {}",
            m.label,
            m.timeout,
            report.steps.last(),
            m.log.display()
        );
    }
    if !report.done && report.boot_failure.is_none() && !status.success() {
        bail!(
            "{}: qemu exited with {status} before the guest finished; console in {}",
            m.label,
            m.log.display()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_fold_into_steps_exits_and_their_output() {
        let mut r = Report::default();
        for l in [
            "[    0.1] noise before the guest",
            "vm-test: begin 5.10.0-35-amd64\r",
            "vm-test: step kernel-check",
            "ring buffers   yes",
            "vm-test: exit kernel-check 0",
            "vm-test: step e2e",
            "test result: FAILED. 1 passed; 1 failed",
            "vm-test: exit e2e 101",
            "vm-test: done",
        ] {
            r.line(l);
        }
        assert_eq!(r.release.as_deref(), Some("5.10.0-35-amd64"));
        assert_eq!(
            r.steps,
            vec![
                ("kernel-check".to_string(), Some(0)),
                ("e2e".to_string(), Some(101))
            ]
        );
        assert_eq!(r.output[1].1, ["test result: FAILED. 1 passed; 1 failed"]);
        assert!(r.done && !r.passed());
    }

    #[test]
    fn a_guest_that_never_finishes_a_step_has_not_passed() {
        let mut r = Report::default();
        for l in ["vm-test: begin 6.1", "vm-test: step e2e", "vm-test: done"] {
            r.line(l);
        }
        assert!(!r.passed());
        r.line("vm-test: boot failed: insmod 01-9p.ko");
        assert_eq!(r.boot_failure.as_deref(), Some("insmod 01-9p.ko"));
    }
}
