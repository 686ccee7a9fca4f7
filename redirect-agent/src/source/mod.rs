//! Where the Store comes from: a manifest directory (local runs, demos, tests) or, in a
//! cluster, kube watchers over the same kinds.

pub mod manifest;

pub use manifest::{
    DEFAULT_POLL_INTERVAL, DocumentRef, ManifestError, SourceLocation, load_dir, load_texts,
    watch_dir,
};
