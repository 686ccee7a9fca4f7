//! Where the Store comes from. A [`Source`] yields whole snapshots; the agent loop
//! (`agent::run_loop`) turns each into `desired() → diff() → apply`. Two implementations:
//!
//! - [`manifest::ManifestSource`]: a directory of YAML manifests (local runs, demo, tests);
//!   all or nothing, so an invalid set is rejected and the last good state stays;
//! - [`kube::KubeSource`]: kube-runtime watchers on the API server (in a cluster); objects are
//!   kept in local caches, an event marks the snapshot dirty and a debounce window coalesces
//!   bursts; an object that cannot be read is skipped with a warning, never the whole set.

pub mod kube;
pub mod manifest;

use std::future::Future;

pub use manifest::{
    DEFAULT_POLL_INTERVAL, DocumentRef, ManifestError, ManifestSource, SourceLocation, load_dir,
    load_texts, watch_dir,
};

use crate::store::Store;

/// One message of a source.
#[derive(Debug)]
pub enum Update {
    /// A complete snapshot to sync to.
    Snapshot(Store),
    /// The source's input is invalid as a whole; the last good state stays in force. Each
    /// entry names the input and the reason.
    Rejected(Vec<Rejection>),
}

/// Why a source's input was rejected: a message naming the input, and a bounded label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub message: String,
    pub label: &'static str,
}

/// A producer of Store snapshots.
pub trait Source: Send {
    /// Short name for logs and `/status` (`manifests`, `kube`).
    fn name(&self) -> &'static str;

    /// The next update; `None` when the source has stopped for good.
    fn next(&mut self) -> impl Future<Output = Option<Update>> + Send;
}

/// Which source the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A directory of YAML manifests (`--manifests`).
    Manifests,
    /// The Kubernetes API (in-cluster config, or `KUBECONFIG`).
    Kube,
}

impl SourceKind {
    /// `kube` inside a pod (the kubelet sets `KUBERNETES_SERVICE_HOST`), else `manifests`.
    pub fn default_for_env(kubernetes_service_host: Option<&str>) -> SourceKind {
        match kubernetes_service_host {
            Some(h) if !h.is_empty() => SourceKind::Kube,
            _ => SourceKind::Manifests,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_source_is_kube_in_a_pod_and_manifests_elsewhere() {
        assert_eq!(
            SourceKind::default_for_env(Some("10.96.0.1")),
            SourceKind::Kube
        );
        assert_eq!(SourceKind::default_for_env(Some("")), SourceKind::Manifests);
        assert_eq!(SourceKind::default_for_env(None), SourceKind::Manifests);
    }
}
