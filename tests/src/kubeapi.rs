//! The Kubernetes API of a mini-cluster, for agents started with `--source kube`: an
//! [`ApiServer`] stand-in listening inside the node's network namespace, kept equal to the
//! scene's manifest directory by a mirror thread (as `kubectl apply --prune` would), so that one
//! scene, one set of test steps and one set of expected outcomes serve both sources.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::MiniCluster;
use crate::apiserver::{ApiServer, Options};

/// How often the mirror looks at the manifest directory.
const MIRROR_INTERVAL: Duration = Duration::from_millis(50);

/// `(apiVersion, kind, namespace, name)` of a manifest object.
type ObjectId = (String, String, String, String);

/// The API server of a mini-cluster and the mirror that feeds it. Dropping it stops both.
pub struct KubeApi {
    pub server: Arc<ApiServer>,
    pub kubeconfig: PathBuf,
    stop: Arc<AtomicBool>,
    mirror: Arc<Mutex<Mirror>>,
    thread: Option<JoinHandle<()>>,
    /// Mirror errors (a manifest the API would not take), for test failure messages.
    errors: Arc<Mutex<Vec<String>>>,
}

impl KubeApi {
    /// Starts the API server in the node netns with the objects of `manifests`, and keeps it
    /// equal to the directory from then on. Without `crds_installed`, Sandboxes and RouteGroups
    /// are applied once the test installs the CRDs.
    pub fn start(mc: &MiniCluster, manifests: &Path, crds_installed: bool) -> Result<KubeApi> {
        let server = Arc::new(ApiServer::start_with(Options {
            netns: Some(mc.node_netns_path().to_path_buf()),
            bookmark_interval: Duration::from_millis(500),
            crds_installed,
            ..Options::default()
        })?);
        let kubeconfig = mc.workdir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut first = Mirror {
            dir: manifests.to_path_buf(),
            server: server.clone(),
            applied: BTreeMap::new(),
            errors: errors.clone(),
        };
        first.once().context("first mirror of the manifests")?;
        if !crds_installed {
            first
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        let mirror = Arc::new(Mutex::new(first));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let looping = mirror.clone();
        let thread = std::thread::Builder::new()
            .name("kube-mirror".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    let mut m = looping.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = m.once() {
                        m.error(format!("{e:#}"));
                    }
                    drop(m);
                    std::thread::sleep(MIRROR_INTERVAL);
                }
            })?;
        Ok(KubeApi {
            server,
            kubeconfig,
            stop,
            mirror,
            thread: Some(thread),
            errors,
        })
    }

    /// Mirrors the directory now: a test step that changed it continues once the API server
    /// has the change, as `kubectl apply` returns after the write.
    pub fn sync_now(&self) -> Result<()> {
        self.mirror.lock().unwrap_or_else(|e| e.into_inner()).once()
    }

    /// Problems the mirror met (manifests the API server refused).
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Mirror {
    dir: PathBuf,
    server: Arc<ApiServer>,
    /// What was applied, by id: the object as read from the directory.
    applied: BTreeMap<ObjectId, Value>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Mirror {
    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 100 && !errors.contains(&e) {
            errors.push(e);
        }
    }

    /// Applies what changed in the directory and deletes what left it. A file that does not
    /// parse is left out (the API would not take it either), with an error recorded.
    fn once(&mut self) -> Result<()> {
        let mut now: BTreeMap<ObjectId, Value> = BTreeMap::new();
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
            })
            .collect();
        paths.sort();
        for path in paths {
            let Ok(text) = fs::read_to_string(&path) else {
                continue; // removed while listing
            };
            for doc in yaml_serde::Deserializer::from_str(&text) {
                match Value::deserialize(doc) {
                    Ok(Value::Null) => {}
                    Ok(v) => {
                        if let Some(id) = object_id(&v) {
                            now.insert(id, v);
                        }
                    }
                    Err(e) => self.error(format!("{}: {e}", path.display())),
                }
            }
        }
        for (id, obj) in &now {
            if self.applied.get(id) == Some(obj) {
                continue;
            }
            match self.server.apply_json(obj.clone()) {
                Ok(_) => {
                    self.applied.insert(id.clone(), obj.clone());
                }
                Err(e) => self.error(format!("{} {}/{}: {e:#}", id.1, id.2, id.3)),
            }
        }
        let gone: Vec<ObjectId> = self
            .applied
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.server.delete(&id.0, &id.1, &id.2, &id.3)?;
            self.applied.remove(&id);
        }
        Ok(())
    }
}

fn object_id(v: &Value) -> Option<ObjectId> {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
    Some((
        s("/apiVersion")?,
        s("/kind")?,
        s("/metadata/namespace").unwrap_or_else(|| crate::NAMESPACE.to_string()),
        s("/metadata/name")?,
    ))
}
