//! WATCH: a stream of `{"type":..,"object":..}` lines over a chunked response.
//!
//! - Start: `resourceVersion=N` replays the history after N, then follows live changes. N
//!   older than the history kept answers 200 with one `ERROR` event (a `Status` 410 Expired,
//!   "too old resource version: N (M)") and ends, as kube-apiserver does. N newer than the
//!   store answers 504 "Too large resource version".
//! - Initial events: with `resourceVersion` unset or "0" (or `sendInitialEvents=true`, which
//!   needs `allowWatchBookmarks=true` and `resourceVersionMatch=NotOlderThan`) the stream
//!   first sends a synthetic `ADDED` for every current object (`sendInitialEvents=false` turns
//!   that off); with `sendInitialEvents=true` a `BOOKMARK` annotated
//!   `k8s.io/initial-events-end: "true"` follows them.
//! - Selectors apply per watcher: an object modified into the selection is sent as `ADDED`,
//!   one modified out of it as `DELETED` (its previous state at the new version).
//! - `allowWatchBookmarks=true`: a `BOOKMARK` (just kind, apiVersion and
//!   `metadata.resourceVersion`, the store's version once every change of the resource has
//!   been sent) whenever the stream has been idle for the bookmark interval.
//! - `timeoutSeconds`: the stream ends cleanly then. A watcher that falls behind the history
//!   limit gets the 410 `ERROR` event too.
//! - Faults: [`super::ApiServer::drop_watches`] cuts streams mid-way (no final chunk).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::Response;
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Shared;
use super::http::{Body, Filter, Query, Target, bool_param, param, too_large};
use super::status::ApiError;
use super::store::{Change, ChangeType, Stored};

/// Changes taken from the store per lock.
const BATCH: usize = 512;
/// Bytes gathered into one chunk before it is sent.
const CHUNK: usize = 64 << 10;

type Chunk = Result<Frame<Bytes>, io::Error>;

/// One watcher's parameters and position.
struct Watcher {
    shared: Arc<Shared>,
    res: usize,
    filter: Filter,
    /// Every change of the resource up to this version has been considered.
    cursor: u64,
    bookmarks: bool,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Chunk>,
}

fn line(ty: &str, object: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(object.len() + 32);
    b.extend_from_slice(b"{\"type\":\"");
    b.extend_from_slice(ty.as_bytes());
    b.extend_from_slice(b"\",\"object\":");
    b.extend_from_slice(object);
    b.extend_from_slice(b"}\n");
    b.freeze()
}

fn error_line(e: &ApiError) -> Bytes {
    line(
        "ERROR",
        &serde_json::to_vec(&e.to_status()).unwrap_or_default(),
    )
}

/// What this watcher is sent for a change, if anything.
fn change_line(filter: &Filter, ch: &Change) -> Option<Bytes> {
    let now = filter.matches(&ch.object);
    match ch.ty {
        ChangeType::Added | ChangeType::Deleted => {
            now.then(|| line(ch.ty.as_str(), &ch.object.json))
        }
        ChangeType::Modified => {
            let before = ch.prev.as_deref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some(line("MODIFIED", &ch.object.json)),
                (false, true) => Some(line("ADDED", &ch.object.json)),
                (true, false) => {
                    let prev = ch.prev.as_deref()?;
                    let mut last = prev.value.clone();
                    last["metadata"]["resourceVersion"] = Value::String(ch.rv.to_string());
                    Some(line(
                        "DELETED",
                        &serde_json::to_vec(&last).unwrap_or_default(),
                    ))
                }
                (false, false) => None,
            }
        }
    }
}

/// Starts a watch of target `t` (a collection, or one object by name).
pub(crate) fn start(
    shared: &Arc<Shared>,
    t: &Target,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let r = t.resource();
    let filter = Filter::from_query(t, query)?;
    let bookmarks = bool_param(query, "allowWatchBookmarks")? == Some(true);
    let send_initial = bool_param(query, "sendInitialEvents")?;
    let timeout = match param(query, "timeoutSeconds") {
        None | Some("") => None,
        Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {s:?}"))
        })?)),
    };
    let rv = param(query, "resourceVersion").filter(|v| !v.is_empty());
    if send_initial == Some(true) {
        if !bookmarks {
            return Err(ApiError::new(
                422,
                "Invalid",
                "ListOptions.meta.k8s.io \"\" is invalid: allowWatchBookmarks: Forbidden: allowWatchBookmarks must be set to true when sendInitialEvents is specified",
            ));
        }
        if param(query, "resourceVersionMatch") != Some("NotOlderThan") {
            return Err(ApiError::new(
                422,
                "Invalid",
                "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
    }
    let initial = send_initial.unwrap_or(matches!(rv, None | Some("0")));
    let from = rv.filter(|v| *v != "0").map(|v| {
        v.parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))
    });
    let from = from.transpose()?;

    let store = shared.store();
    let current = store.rv();
    if let Some(n) = from.filter(|n| *n > current) {
        return Err(too_large(n, current));
    }
    // Subscribed before reading the store, so no later change goes unnoticed.
    let mut changes = store.subscribe(t.res);
    changes.mark_unchanged();
    let (cursor, first): (u64, Vec<Arc<Stored>>) = if initial {
        let namespace = t.namespace.as_deref().or((!r.namespaced).then_some(""));
        let (items, _) = store.list(t.res, namespace, None, None, |o| filter.matches(o));
        (current, items)
    } else {
        let from = from.unwrap_or(current);
        let floor = store.floor(t.res);
        if from < floor {
            drop(store);
            let e = ApiError::expired(format!("too old resource version: {from} ({floor})"));
            return Ok(stream_response(super::http::full(error_line(&e))));
        }
        (from, Vec::new())
    };
    drop(store);

    let (tx, rx) = mpsc::channel::<Chunk>(8);
    let watcher = Watcher {
        shared: shared.clone(),
        res: t.res,
        filter,
        cursor,
        bookmarks,
        timeout,
        tx,
    };
    let end_bookmark = send_initial == Some(true);
    let open = OpenWatch::new(shared.clone());
    tokio::spawn(watcher.run(open, changes, first, end_bookmark));
    // The body ends in an error (no final chunk) when watches are cut, even with chunks
    // still queued; the watcher then finds its channel closed.
    let cut = shared.cut_watches.subscribe();
    let stream = futures::stream::unfold(Some((rx, cut)), |state| async move {
        let (mut rx, mut cut) = state?;
        tokio::select! {
            biased;
            _ = cut.changed() => Some((Err(io::Error::other("watch cut")), None)),
            chunk = rx.recv() => chunk.map(|c| (c, Some((rx, cut)))),
        }
    });
    Ok(stream_response(StreamBody::new(stream).boxed()))
}

fn stream_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Counts an open watch for as long as it lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> OpenWatch {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        OpenWatch(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a watch stopped sending.
enum Stop {
    /// The client went away.
    Gone,
    /// The watcher fell behind the history: send 410 and end.
    TooOld(u64),
}

impl Watcher {
    async fn send(&self, chunk: Bytes) -> Result<(), Stop> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Ok(Frame::data(chunk)))
            .await
            .map_err(|_| Stop::Gone)
    }

    /// Sends every change after the cursor; returns whether anything was sent.
    async fn drain(&mut self) -> Result<bool, Stop> {
        let mut sent = false;
        loop {
            let (batch, full) = {
                let store = self.shared.store();
                let changes = store
                    .changes_since(self.res, self.cursor, BATCH)
                    .map_err(Stop::TooOld)?;
                let full = changes.len() == BATCH;
                let mut out = BytesMut::new();
                for ch in &changes {
                    if let Some(l) = change_line(&self.filter, ch) {
                        out.extend_from_slice(&l);
                    }
                }
                self.cursor = match changes.last() {
                    Some(last) => last.rv,
                    // Nothing of this resource up to the store's version is unsent.
                    None => store.rv(),
                };
                (out.freeze(), full)
            };
            sent |= !batch.is_empty();
            self.send(batch).await?;
            if !full {
                return Ok(sent);
            }
        }
    }

    fn bookmark(&self, initial_end: bool) -> Bytes {
        let r = &super::resources::RESOURCES[self.res];
        let mut metadata = json!({"resourceVersion": self.cursor.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": metadata});
        line("BOOKMARK", &serde_json::to_vec(&obj).unwrap_or_default())
    }

    async fn run(
        mut self,
        _open: OpenWatch,
        mut changes: tokio::sync::watch::Receiver<u64>,
        first: Vec<Arc<Stored>>,
        end_bookmark: bool,
    ) {
        match self.stream(&mut changes, first, end_bookmark).await {
            Ok(()) | Err(Stop::Gone) => {}
            Err(Stop::TooOld(floor)) => {
                let e = ApiError::expired(format!(
                    "too old resource version: {} ({floor})",
                    self.cursor
                ));
                let _ = self.send(error_line(&e)).await;
            }
        }
    }

    async fn stream(
        &mut self,
        changes: &mut tokio::sync::watch::Receiver<u64>,
        first: Vec<Arc<Stored>>,
        end_bookmark: bool,
    ) -> Result<(), Stop> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut chunk = BytesMut::new();
        for o in &first {
            chunk.extend_from_slice(&line("ADDED", &o.json));
            if chunk.len() >= CHUNK {
                self.send(chunk.split().freeze()).await?;
            }
        }
        if end_bookmark {
            chunk.extend_from_slice(&self.bookmark(true));
        }
        self.send(chunk.freeze()).await?;
        let interval = self.shared.bookmark_interval;
        let mut idle_since = Instant::now();
        loop {
            if self.drain().await? {
                idle_since = Instant::now();
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(Stop::Gone);
                    }
                }
                _ = tokio::time::sleep_until(idle_since + interval), if self.bookmarks => {
                    self.drain().await?;
                    self.send(self.bookmark(false)).await?;
                    idle_since = Instant::now();
                }
                _ = sleep_until_opt(deadline) => return Ok(()),
                _ = self.tx.closed() => return Err(Stop::Gone),
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
