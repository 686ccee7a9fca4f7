//! A directory of Kubernetes YAML manifests as the source of the Store: every `*.yaml`/`*.yml`
//! file (sorted by name, not recursive, hidden files skipped), each possibly holding several
//! `---`-separated documents of the kinds the agent reads.
//!
//! Loading is all or nothing: any error rejects the whole snapshot (the caller keeps its last
//! good state), and every error found is reported, each naming its file, line and object.

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use yaml_serde::Value;

use crate::crd::{API_VERSION, RouteGroup, Sandbox, SpecError};
use crate::slice::Slice;
use crate::source::{Rejection, Source, Update};
use crate::store::{DEFAULT_NAMESPACE, ObjectName, Store};

/// How often [`watch_dir`] looks at the directory by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Bounds of the poll interval.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(60);

/// A place in the manifests: `file[:line[:column]]` (1-based).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceLocation {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}

/// Which document of a file: `Sandbox team-a/feature-x` when it names itself, else
/// `document 2` (1-based among the file's non-empty documents).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocumentRef {
    pub index: usize,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl fmt::Display for DocumentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => write!(
                f,
                "{kind} {}/{name}",
                self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
            ),
            (Some(kind), None) => write!(f, "{kind} (document {})", self.index),
            (None, _) => write!(f, "document {}", self.index),
        }
    }
}

/// Why a manifest directory was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: cannot list manifests: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error("{}: cannot read: {source}", file.display())]
    Read { file: PathBuf, source: io::Error },
    #[error("{at}: {document}: YAML syntax error: {reason}")]
    Syntax {
        at: SourceLocation,
        document: DocumentRef,
        reason: String,
    },
    /// Not a valid object: missing apiVersion/kind/name, missing or mistyped field, unknown
    /// field of a redirect.dev kind.
    #[error("{at}: {document}: {reason}")]
    Invalid {
        at: SourceLocation,
        document: DocumentRef,
        reason: String,
    },
    #[error(
        "{at}: {document}: unknown kind {kind:?} of apiVersion {api_version:?} (expected Service \
         v1, EndpointSlice discovery.k8s.io/v1, Pod v1, Sandbox or RouteGroup redirect.dev/v1alpha1)"
    )]
    UnknownKind {
        at: SourceLocation,
        document: DocumentRef,
        api_version: String,
        kind: String,
    },
    /// A redirect.dev object whose spec breaks a rule (routing key syntax, TTL...).
    #[error("{at}: {document}: {source}")]
    Spec {
        at: SourceLocation,
        document: DocumentRef,
        source: SpecError,
    },
    #[error("{at}: {document}: duplicate object, first defined at {first}")]
    Duplicate {
        at: SourceLocation,
        document: DocumentRef,
        first: SourceLocation,
    },
    #[error("routing key {key:?} is used by both {first} ({first_at}) and {second} ({second_at})")]
    KeyConflict {
        key: String,
        first: ObjectName,
        first_at: SourceLocation,
        second: ObjectName,
        second_at: SourceLocation,
    },
}

impl ManifestError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ManifestError::ReadDir { .. } | ManifestError::Read { .. } => "io",
            ManifestError::Syntax { .. } => "yaml_syntax",
            ManifestError::Invalid { .. } => "invalid_object",
            ManifestError::UnknownKind { .. } => "unknown_kind",
            ManifestError::Spec { source, .. } => source.metric_label(),
            ManifestError::Duplicate { .. } => "duplicate_object",
            ManifestError::KeyConflict { .. } => "key_conflict",
        }
    }
}

/// Loads every manifest of `dir` into a Store, or reports every problem found.
pub fn load_dir(dir: &Path) -> Result<Store, Vec<ManifestError>> {
    load_read(read_dir_files(dir).map_err(|e| vec![*e])?)
}

/// Loads manifests given as `(file name, content)` (the file name is used in messages only).
pub fn load_texts(files: &[(PathBuf, String)]) -> Result<Store, Vec<ManifestError>> {
    let mut loader = Loader::default();
    for (file, text) in files {
        loader.file(file, text);
    }
    loader.finish()
}

type ReadFiles = Vec<(PathBuf, io::Result<String>)>;

/// Internal results carry errors boxed (they are large and rare).
type Fallible<T> = Result<T, Box<ManifestError>>;

/// The manifest files of `dir` (sorted) with their contents.
fn read_dir_files(dir: &Path) -> Fallible<ReadFiles> {
    let read_dir_err = |source| {
        Box::new(ManifestError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
        let path = entry.map_err(read_dir_err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let manifest =
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"));
        // Follows symlinks (ConfigMap volumes link every file through `..data`).
        if manifest && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p);
            (p, text)
        })
        .collect())
}

fn load_read(files: ReadFiles) -> Result<Store, Vec<ManifestError>> {
    let mut loader = Loader::default();
    for (file, text) in files {
        match text {
            Ok(text) => loader.file(&file, &text),
            Err(source) => loader.errors.push(ManifestError::Read { file, source }),
        }
    }
    loader.finish()
}

/// Watches `dir` by polling every `interval` (clamped to 10ms..=60s): sends the loaded Store
/// (or the errors) once at start and then whenever a manifest file appears, disappears or
/// changes content. The watch ends when the receiver is dropped.
pub fn watch_dir(
    dir: impl Into<PathBuf>,
    interval: Duration,
) -> mpsc::Receiver<Result<Store, Vec<ManifestError>>> {
    let dir = dir.into();
    let interval = interval.clamp(MIN_POLL_INTERVAL, MAX_POLL_INTERVAL);
    let (tx, rx) = mpsc::channel(1);
    let spawned = std::thread::Builder::new()
        .name("manifest-watch".into())
        .spawn(move || {
            let mut last = None;
            while !tx.is_closed() {
                let files = read_dir_files(&dir);
                let fp = fingerprint(&files);
                if last != Some(fp) {
                    last = Some(fp);
                    let loaded = files.map_err(|e| vec![*e]).and_then(load_read);
                    if tx.blocking_send(loaded).is_err() {
                        break;
                    }
                }
                std::thread::sleep(interval);
            }
        });
    if let Err(error) = spawned {
        // The receiver then yields None at once, which the caller sees as the end of the source.
        tracing::error!(%error, "cannot start the manifest watcher thread");
    }
    rx
}

/// The manifest directory as a [`Source`]: polls it, and yields a snapshot whenever what it
/// holds changed (or the rejection of every error found, all or nothing).
pub struct ManifestSource {
    rx: mpsc::Receiver<Result<Store, Vec<ManifestError>>>,
}

impl ManifestSource {
    /// Watches `dir`, looking every `interval` (clamped to 10 ms..60 s).
    pub fn new(dir: impl Into<PathBuf>, interval: Duration) -> Self {
        ManifestSource {
            rx: watch_dir(dir, interval),
        }
    }
}

impl Source for ManifestSource {
    fn name(&self) -> &'static str {
        "manifests"
    }

    async fn next(&mut self) -> Option<Update> {
        Some(match self.rx.recv().await? {
            Ok(store) => Update::Snapshot(store),
            Err(errors) => Update::Rejected(
                errors
                    .iter()
                    .map(|e| Rejection {
                        message: e.to_string(),
                        label: e.metric_label(),
                    })
                    .collect(),
            ),
        })
    }
}

/// A hash of the directory listing and contents (and of read errors).
fn fingerprint(files: &Fallible<ReadFiles>) -> u64 {
    let mut h = DefaultHasher::new();
    match files {
        Err(e) => e.to_string().hash(&mut h),
        Ok(files) => {
            for (path, text) in files {
                path.hash(&mut h);
                match text {
                    Ok(t) => t.hash(&mut h),
                    Err(e) => e.to_string().hash(&mut h),
                }
            }
        }
    }
    h.finish()
}

/// Splits YAML text into documents at `---` lines, as `(0-based first line, text)`; each
/// document keeps its own `---` line so positions inside it stay exact.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 0;
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let is_marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        if is_marker && n > 0 {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset;
            start_line = n;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs
}

/// Removes the positions yaml_serde writes into messages (`at line 3 column 5`); the error
/// carries the position of the whole file instead.
fn strip_positions(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let line_len = digits(after);
        let tail = &after[line_len..];
        rest = match tail.strip_prefix(" column ") {
            Some(col) if line_len > 0 => &col[digits(col)..],
            _ => {
                out.push_str(" at line ");
                after
            }
        };
    }
    out.push_str(rest);
    out
}

/// Keys of `original` (a parsed manifest) that the typed object dropped, as paths.
fn unknown_fields(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            for (k, v) in a {
                let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                let sub = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                match b.get(k) {
                    None if !v.is_null() => out.push(sub),
                    None => {}
                    Some(t) => unknown_fields(v, t, &sub, out),
                }
            }
        }
        (Value::Sequence(a), Value::Sequence(b)) => {
            for (i, (v, t)) in a.iter().zip(b).enumerate() {
                unknown_fields(v, t, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[derive(Default)]
struct Loader {
    store: Store,
    origins: HashMap<ObjectName, SourceLocation>,
    errors: Vec<ManifestError>,
}

/// One document being loaded.
struct Doc<'a> {
    file: &'a Path,
    text: &'a str,
    first_line: usize,
    at: SourceLocation,
    document: DocumentRef,
}

impl Doc<'_> {
    /// The location of a yaml_serde error, in the whole file.
    fn at_error(&self, e: &yaml_serde::Error) -> SourceLocation {
        match e.location() {
            Some(l) => SourceLocation {
                file: self.file.to_path_buf(),
                line: Some(self.first_line + l.line()),
                column: Some(l.column()),
            },
            None => self.at.clone(),
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> Box<ManifestError> {
        Box::new(ManifestError::Invalid {
            at: self.at.clone(),
            document: self.document.clone(),
            reason: reason.into(),
        })
    }

    fn parse<T: DeserializeOwned>(&self) -> Fallible<T> {
        yaml_serde::from_str(self.text).map_err(|e| {
            Box::new(ManifestError::Invalid {
                at: self.at_error(&e),
                document: self.document.clone(),
                reason: strip_positions(&e.to_string()),
            })
        })
    }
}

impl Loader {
    fn file(&mut self, file: &Path, text: &str) {
        let mut index = 0;
        for (first_line, chunk) in split_documents(text) {
            let value: Value = match yaml_serde::from_str(chunk) {
                Ok(v) => v,
                Err(e) => {
                    index += 1;
                    let doc = Doc {
                        file,
                        text: chunk,
                        first_line,
                        at: SourceLocation {
                            file: file.to_path_buf(),
                            line: Some(first_line + 1),
                            column: None,
                        },
                        document: DocumentRef {
                            index,
                            ..Default::default()
                        },
                    };
                    self.errors.push(ManifestError::Syntax {
                        at: doc.at_error(&e),
                        document: doc.document,
                        reason: strip_positions(&e.to_string()),
                    });
                    continue;
                }
            };
            if value.is_null() {
                continue; // empty document, or comments only
            }
            index += 1;
            // The object starts at its first line that is not blank, a comment or `---`.
            let object_line = chunk
                .lines()
                .position(|l| {
                    let t = l.trim();
                    !(t.is_empty() || t.starts_with('#') || (t.starts_with("---") && t.len() == 3))
                })
                .unwrap_or(0);
            let str_at = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
            let meta = value.get("metadata");
            let name = meta.and_then(|m| str_at(m, "name"));
            let doc = Doc {
                file,
                text: chunk,
                first_line,
                at: SourceLocation {
                    file: file.to_path_buf(),
                    line: Some(first_line + object_line + 1),
                    column: None,
                },
                document: DocumentRef {
                    index,
                    kind: str_at(&value, "kind"),
                    namespace: name
                        .as_ref()
                        .map(|_| meta.and_then(|m| str_at(m, "namespace")))
                        .unwrap_or_default(),
                    name,
                },
            };
            if let Err(e) = self.document(&doc, &value) {
                self.errors.push(*e);
            }
        }
    }

    fn document(&mut self, doc: &Doc<'_>, value: &Value) -> Fallible<()> {
        if !value.is_mapping() {
            return Err(doc.invalid("a manifest document must be a mapping (an object)"));
        }
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (api_version, doc.document.kind.as_deref()) else {
            return Err(doc.invalid("apiVersion and kind are required"));
        };
        if doc.document.name.as_deref().is_none_or(str::is_empty) {
            return Err(doc.invalid("metadata.name is required"));
        }
        match (api_version, kind) {
            ("v1", "Service") => {
                let mut svc: Service = doc.parse()?;
                self.register(doc, "Service", &mut svc.metadata)?;
                for p in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
                    if !(1..=65535).contains(&p.port) {
                        return Err(
                            doc.invalid(format!("spec.ports: port {} is not in 1..=65535", p.port))
                        );
                    }
                }
                self.store.services.push(svc.into());
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let mut eps: EndpointSlice = doc.parse()?;
                self.register(doc, "EndpointSlice", &mut eps.metadata)?;
                self.store.endpoint_slices.push(Slice::from(eps).into());
            }
            ("v1", "Pod") => {
                let mut pod: Pod = doc.parse()?;
                self.register(doc, "Pod", &mut pod.metadata)?;
                self.store.pods.push(pod.into());
            }
            (API_VERSION, "Sandbox") => {
                let mut sb: Sandbox = doc.parse()?;
                self.check_fields(doc, value, &sb.spec)?;
                self.register(doc, "Sandbox", &mut sb.metadata)?;
                self.spec_errors(doc, sb.spec.validate())?;
                self.store.sandboxes.push(sb.into());
            }
            (API_VERSION, "RouteGroup") => {
                let mut rg: RouteGroup = doc.parse()?;
                self.check_fields(doc, value, &rg.spec)?;
                self.register(doc, "RouteGroup", &mut rg.metadata)?;
                self.spec_errors(doc, rg.spec.validate())?;
                self.store.route_groups.push(rg.into());
            }
            _ => {
                return Err(Box::new(ManifestError::UnknownKind {
                    at: doc.at.clone(),
                    document: doc.document.clone(),
                    api_version: api_version.to_string(),
                    kind: kind.to_string(),
                }));
            }
        }
        Ok(())
    }

    /// Rejects fields of a redirect.dev spec that the type does not know (typos such as
    /// `fallbak` would otherwise be dropped silently).
    fn check_fields<S: Serialize>(&self, doc: &Doc<'_>, value: &Value, spec: &S) -> Fallible<()> {
        let (Some(original), Ok(typed)) = (value.get("spec"), yaml_serde::to_value(spec)) else {
            return Ok(());
        };
        let mut unknown = Vec::new();
        unknown_fields(original, &typed, "spec", &mut unknown);
        match unknown.is_empty() {
            true => Ok(()),
            false => Err(doc.invalid(format!("unknown field {}", unknown.join(", ")))),
        }
    }

    /// Reports all but the last spec error directly and returns the last one.
    fn spec_errors(&mut self, doc: &Doc<'_>, errors: Vec<SpecError>) -> Fallible<()> {
        let mut errors = errors.into_iter().map(|source| ManifestError::Spec {
            at: doc.at.clone(),
            document: doc.document.clone(),
            source,
        });
        let Some(first) = errors.next() else {
            return Ok(());
        };
        self.errors.extend(errors);
        Err(Box::new(first))
    }

    /// Defaults the namespace and records where the object came from; rejects duplicates.
    fn register(&mut self, doc: &Doc<'_>, kind: &str, meta: &mut ObjectMeta) -> Fallible<()> {
        meta.namespace
            .get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
        let name = ObjectName::new(kind, meta);
        if let Some(first) = self.origins.get(&name) {
            return Err(Box::new(ManifestError::Duplicate {
                at: doc.at.clone(),
                document: doc.document.clone(),
                first: first.clone(),
            }));
        }
        self.origins.insert(name, doc.at.clone());
        Ok(())
    }

    fn finish(mut self) -> Result<Store, Vec<ManifestError>> {
        for c in self.store.key_conflicts() {
            let at = |n: &ObjectName| self.origins.get(n).cloned().unwrap_or_default();
            self.errors.push(ManifestError::KeyConflict {
                first_at: at(&c.first),
                second_at: at(&c.second),
                key: c.key,
                first: c.first,
                second: c.second,
            });
        }
        if !self.errors.is_empty() {
            return Err(self.errors);
        }
        self.store.sort();
        self.store.warnings = self.store.dangling_references();
        Ok(self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: shop}
spec:
  clusterIP: 10.200.128.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

    const SANDBOX: &str = "\
apiVersion: redirect.dev/v1alpha1
kind: Sandbox
metadata: {name: fx, namespace: shop}
spec:
  routingKey: feature-x
  forks:
  - service: checkout
    selector: {app: checkout, sandbox: fx}
";

    fn load(files: &[(&str, &str)]) -> Result<Store, Vec<ManifestError>> {
        let files: Vec<_> = files
            .iter()
            .map(|(f, t)| (PathBuf::from(f), t.to_string()))
            .collect();
        load_texts(&files)
    }

    fn messages(r: Result<Store, Vec<ManifestError>>) -> Vec<String> {
        r.expect_err("the manifests should be rejected")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn multi_document_files_load_every_object_with_namespaces_defaulted() {
        let text = format!(
            "{SERVICE}---\n{SANDBOX}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\n---\n# trailing comment\n"
        );
        let store = load(&[("shop.yaml", &text)]).unwrap();
        assert_eq!(store.services.len(), 1);
        assert_eq!(store.sandboxes[0].spec.routing_key, "feature-x");
        assert_eq!(store.pods[0].metadata.namespace.as_deref(), Some("default"));
        assert!(store.warnings.is_empty(), "{:?}", store.warnings);
    }

    #[test]
    fn invalid_yaml_is_reported_with_file_and_line() {
        let text =
            format!("{SERVICE}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n");
        let errors = messages(load(&[("pods.yaml", &text)]));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("pods.yaml:12:"), "{}", errors[0]);
        assert!(
            errors[0].contains("document 2: YAML syntax error"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_missing_field_names_the_object_and_the_field() {
        let text = "apiVersion: redirect.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: fx}\nspec:\n  forks: []\n";
        let errors = messages(load(&[("sb.yaml", text)]));
        assert!(errors[0].starts_with("sb.yaml:"), "{}", errors[0]);
        assert!(errors[0].contains("Sandbox default/fx"), "{}", errors[0]);
        assert!(
            errors[0].contains("missing field `routingKey`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn an_invalid_routing_key_is_named() {
        let text = SANDBOX.replace("feature-x", "feature x!");
        let errors = messages(load(&[("sb.yaml", &text)]));
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0],
            "sb.yaml:1: Sandbox shop/fx: invalid routing key \"feature x!\": only A-Z a-z 0-9 . _ ~ - are allowed"
        );
    }

    #[test]
    fn a_misspelt_sandbox_field_is_rejected_not_ignored() {
        let text = SANDBOX.replace("  forks:", "  fallbak: Baseline\n  forks:");
        let errors = messages(load(&[("sb.yaml", &text)]));
        assert!(
            errors[0].ends_with("unknown field spec.fallbak"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn two_sandboxes_with_the_same_key_are_a_conflict_naming_both() {
        let other = SANDBOX.replace("name: fx", "name: fx2");
        let errors = messages(load(&[("a.yaml", SANDBOX), ("b.yaml", &other)]));
        assert_eq!(
            errors,
            [
                "routing key \"feature-x\" is used by both Sandbox shop/fx (a.yaml:1) and Sandbox shop/fx2 (b.yaml:1)"
            ]
        );
    }

    #[test]
    fn the_same_object_twice_is_a_duplicate() {
        let errors = messages(load(&[("a.yaml", SERVICE), ("b.yaml", SERVICE)]));
        assert_eq!(
            errors,
            ["b.yaml:1: Service shop/checkout: duplicate object, first defined at a.yaml:1"]
        );
    }

    #[test]
    fn unknown_kinds_are_errors() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
        let errors = messages(load(&[("d.yaml", text)]));
        assert!(
            errors[0].starts_with("d.yaml:1: Deployment default/web: unknown kind"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unnamed_objects_are_named_by_document_index() {
        let text = format!("{SERVICE}---\napiVersion: v1\nkind: Pod\nmetadata: {{}}\n");
        let errors = messages(load(&[("p.yaml", &text)]));
        assert_eq!(
            errors,
            ["p.yaml:8: Pod (document 2): metadata.name is required"]
        );
    }

    #[test]
    fn every_error_of_every_file_is_reported() {
        let errors = messages(load(&[
            ("a.yaml", "kind: [\n"),
            (
                "b.yaml",
                "apiVersion: v1\nkind: Nope\nmetadata: {name: x}\n",
            ),
        ]));
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn a_fork_of_a_missing_service_is_a_warning_not_an_error() {
        let store = load(&[("sb.yaml", SANDBOX)]).unwrap();
        assert_eq!(
            store.warnings,
            ["Sandbox shop/fx: fork of Service shop/checkout has no effect: no such Service"]
        );
    }

    #[test]
    fn positions_are_stripped_from_messages() {
        assert_eq!(
            strip_positions("bad at line 3 column 5, ctx at line 1 column 1"),
            "bad, ctx"
        );
        assert_eq!(strip_positions("at line is text"), "at line is text");
    }

    #[test]
    fn directory_loading_takes_only_yaml_files_sorted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.yml"), SANDBOX).unwrap();
        std::fs::write(dir.path().join("a.yaml"), SERVICE).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "not yaml: [").unwrap();
        let store = load_dir(dir.path()).unwrap();
        assert_eq!(store.services.len(), 1);
        assert_eq!(store.sandboxes.len(), 1);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let errors = messages(load_dir(Path::new("/nonexistent/redirect-manifests")));
        assert!(errors[0].contains("cannot list manifests"), "{}", errors[0]);
    }

    #[tokio::test]
    async fn the_watcher_emits_at_start_and_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.yaml"), SERVICE).unwrap();
        let mut rx = watch_dir(dir.path(), Duration::from_millis(10));
        async fn next(
            rx: &mut mpsc::Receiver<Result<Store, Vec<ManifestError>>>,
        ) -> Result<Store, Vec<ManifestError>> {
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the watcher should send within 5s")
                .expect("the watcher should not stop")
        }
        let first = next(&mut rx).await.unwrap();
        assert_eq!(first.services.len(), 1);

        // Nothing changes: nothing is sent.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rx.recv())
                .await
                .is_err()
        );

        std::fs::write(dir.path().join("sb.yaml"), "kind: [").unwrap();
        let broken = next(&mut rx).await;
        assert!(broken.is_err());

        std::fs::write(dir.path().join("sb.yaml"), SANDBOX).unwrap();
        let fixed = next(&mut rx).await.unwrap();
        assert_eq!(fixed.sandboxes.len(), 1);
    }
}
