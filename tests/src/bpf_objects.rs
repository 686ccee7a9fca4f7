//! The kernel objects an agent pinned (links, programs, maps), found with `bpftool`, and the
//! check that they are all gone after a cleanup.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// `bpftool -j ARGS` as JSON.
pub fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output()?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Some listings print nothing at all when empty.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Ids of the links, programs and maps pinned in one pin directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedObjects {
    pub links: Vec<u64>,
    pub progs: Vec<u64>,
    pub maps: Vec<u64>,
}

impl PinnedObjects {
    /// Every link (with its program) and map the agent pins in `pin_dir`.
    pub fn of(pin_dir: &Path) -> Result<PinnedObjects> {
        let mut found = PinnedObjects::default();
        for (_, link) in redirect_common::ALL_PROGRAMS {
            let path = pin_dir.join(link);
            // One of the two record hooks is attached, never both.
            let record_hook = redirect_common::RECORD_PROGRAMS
                .iter()
                .any(|(_, l)| *l == link);
            if record_hook && !path.exists() {
                continue;
            }
            let info = bpftool_json(&["link", "show", "pinned", path.to_str().context("path")?])?;
            found.links.push(info["id"].as_u64().context("link id")?);
            found
                .progs
                .push(info["prog_id"].as_u64().context("prog id")?);
        }
        for map in redirect_common::ALL_MAPS {
            let path = pin_dir.join(map);
            let info = bpftool_json(&["map", "show", "pinned", path.to_str().context("path")?])?;
            found.maps.push(info["id"].as_u64().context("map id")?);
        }
        // The last good state the agent persisted, a map it pins itself.
        let state = pin_dir.join("state_v1");
        if state.exists() {
            let info = bpftool_json(&["map", "show", "pinned", state.to_str().context("path")?])?;
            found.maps.push(info["id"].as_u64().context("map id")?);
        }
        Ok(found)
    }

    pub fn count(&self) -> usize {
        self.links.len() + self.maps.len()
    }

    /// Waits until none of these objects exists in the kernel any more (it frees them
    /// asynchronously), at most `timeout`; the error names what is left.
    pub fn wait_gone(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ids = |what: &str| -> Result<Vec<u64>> {
                Ok(bpftool_json(&[what, "show"])?
                    .as_array()
                    .map(|a| a.iter().filter_map(|o| o["id"].as_u64()).collect())
                    .unwrap_or_default())
            };
            let (links, progs, maps) = (ids("link")?, ids("prog")?, ids("map")?);
            let left: Vec<String> = self
                .links
                .iter()
                .filter(|i| links.contains(i))
                .map(|i| format!("link {i}"))
                .chain(
                    self.progs
                        .iter()
                        .filter(|i| progs.contains(i))
                        .map(|i| format!("prog {i}")),
                )
                .chain(
                    self.maps
                        .iter()
                        .filter(|i| maps.contains(i))
                        .map(|i| format!("map {i}")),
                )
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("still in the kernel after cleanup: {left:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
