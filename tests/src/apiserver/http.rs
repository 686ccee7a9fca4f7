//! The HTTP side: connections, routing of paths, discovery, list, get and the write verbs.
//! Watches are in [`super::watch`].
//!
//! Paths: `/api/v1/...` and `/apis/{group}/{version}/...`, then `{plural}`,
//! `namespaces/{ns}/{plural}`, `.../{name}` and `.../{name}/status`; the cluster-wide
//! collection of a namespaced resource serves GET (list, watch) and DELETE only, as in the
//! real server. Bodies are JSON (or YAML for `application/yaml` and apply patches), at most
//! [`MAX_BODY`] bytes. Anything unknown answers a `Status` (404 for unknown paths, 405 for
//! unsupported verbs, 415 for unsupported content types).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch as signal;

use super::patch::merge_patch;
use super::resources::{self, RESOURCES, Resource};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{DeleteOptions, Key, Store, Stored, Write, meta_str};
use super::{RequestRecord, Shared, watch};

/// Largest request body accepted.
pub(crate) const MAX_BODY: usize = 32 << 20;

pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// Query parameters in order, decoded.
pub(crate) type Query = [(String, String)];

pub(crate) fn param<'a>(query: &'a Query, name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `strconv.ParseBool`, as the real server parses boolean parameters.
pub(crate) fn bool_param(query: &Query, name: &str) -> Result<Option<bool>, ApiError> {
    match param(query, name) {
        None | Some("") => Ok(None),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
        Some(v) => Err(ApiError::bad_request(format!(
            "invalid boolean {v:?} for {name}"
        ))),
    }
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `a=1&b=x+y` as pairs (form encoding, as Go's `url.ParseQuery` reads it).
pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub(crate) fn json_response(code: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn value_response(code: u16, v: &Value) -> Response<Body> {
    json_response(code, serde_json::to_vec(v).unwrap_or_default())
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    value_response(e.code, &e.to_status())
}

/// Serves connections from `listener` until `shutdown` changes. A connection is cut (closed
/// without finishing its response) when the server goes down.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: signal::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors and the like: let others finish.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.is_down() {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let mut cut = shared.cut_connections.subscribe();
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = cut.changed() => {}
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    if shared.is_down() {
        return Err(io::Error::other("the API server is down"));
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let user_agent = req
        .headers()
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = match shared.take_failure() {
        Some(code) => error_response(&ApiError::with_code(code)),
        None => route(&shared, req, &path, &query)
            .await
            .unwrap_or_else(|e| error_response(&e)),
    };
    shared.record(RequestRecord {
        method,
        path,
        query,
        user_agent,
        status: resp.status().as_u16(),
        at: SystemTime::now(),
    });
    Ok(resp)
}

/// What a resource path names.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub res: usize,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub status: bool,
}

impl Target {
    pub fn resource(&self) -> &'static Resource {
        &RESOURCES[self.res]
    }
}

/// Resolves the segments after `/api/v1` or `/apis/{group}/{version}`.
fn target(store: &Store, group: &str, version: &str, rest: &[String]) -> Result<Target, ApiError> {
    let lookup =
        |plural: &str| resources::by_plural(group, version, plural).filter(|&i| store.served(i));
    let (namespace, rest) = match rest {
        [ns, n, plural, ..]
            if ns == "namespaces" && lookup(plural).is_some_and(|i| RESOURCES[i].namespaced) =>
        {
            (Some(n.clone()), &rest[2..])
        }
        _ => (None, rest),
    };
    let [plural, tail @ ..] = rest else {
        return Err(ApiError::no_route());
    };
    let res = lookup(plural).ok_or_else(ApiError::no_route)?;
    let r = &RESOURCES[res];
    if !r.namespaced && namespace.is_some() {
        return Err(ApiError::no_route());
    }
    let (name, status) = match tail {
        [] => (None, false),
        [name] => (Some(name.clone()), false),
        [name, sub] if sub == "status" && r.status => (Some(name.clone()), true),
        _ => return Err(ApiError::no_route()),
    };
    if name.is_some() && r.namespaced && namespace.is_none() {
        return Err(ApiError::no_route());
    }
    Ok(Target {
        res,
        namespace,
        name,
        status,
    })
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    path: &str,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get_only = |v: Option<Value>| -> Result<Response<Body>, ApiError> {
        if req.method() != Method::GET {
            return Err(ApiError::method_not_allowed());
        }
        v.map(|v| value_response(200, &v))
            .ok_or_else(ApiError::no_route)
    };
    let crds = shared.store().crds_installed();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return get_only(Some(resources::version())),
        ["healthz" | "livez" | "readyz"] => return Ok(json_response(200, "ok")),
        ["api"] => return get_only(Some(resources::api_versions(&shared.address()))),
        ["apis"] => return get_only(Some(resources::api_group_list(crds))),
        ["api", "v1"] => return get_only(resources::api_resource_list("", "v1", crds)),
        ["apis", g] => return get_only(resources::api_group(g, crds)),
        ["apis", g, v] => return get_only(resources::api_resource_list(g, v, crds)),
        ["api", "v1", ..] => ("", "v1", 2),
        ["apis", g, v, ..] => (*g, *v, 3),
        _ => return Err(ApiError::no_route()),
    };
    let rest: Vec<String> = segs[rest..].iter().map(|s| s.to_string()).collect();
    let t = target(&shared.store(), group, version, &rest)?;
    let watching = req.method() == Method::GET && bool_param(query, "watch")? == Some(true);
    if watching && !t.status {
        return watch::start(shared, &t, query);
    }
    match (req.method().clone(), t.name.is_some(), t.status) {
        (Method::GET, false, _) => list(shared, &t, query),
        (Method::GET, true, _) => get(shared, &t),
        (Method::POST, false, _) => {
            let body = read_body(req).await?;
            create(shared, &t, &body.0, &body.1)
        }
        (Method::PUT, true, _) => {
            let body = read_body(req).await?;
            replace(shared, &t, &body.0, &body.1)
        }
        (Method::PATCH, true, _) => {
            let body = read_body(req).await?;
            patch(shared, &t, &body.0, &body.1, query)
        }
        (Method::DELETE, true, false) => {
            let body = read_body(req).await?;
            delete(shared, &t, &body.1, query)
        }
        (Method::DELETE, false, false) => {
            let body = read_body(req).await?;
            delete_collection(shared, &t, &body.1, query)
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// The content type (without parameters) and the body.
async fn read_body(req: Request<Incoming>) -> Result<(String, Bytes), ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    format!("the request body is larger than {MAX_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    Ok((content_type, body))
}

/// A JSON (or, for YAML content types, YAML) body as a value.
fn parse_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let value = match content_type {
        "" | "application/json" | "*/*" => serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON in the request body: {e}")))?,
        "application/yaml" | "application/apply-patch+yaml" => {
            yaml_serde::from_slice::<Value>(body).map_err(|e| {
                ApiError::bad_request(format!("invalid YAML in the request body: {e}"))
            })?
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {other:?})"
                ),
            ));
        }
    };
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request(
            "the request body is not a JSON object",
        ))
    }
}

/// Namespace and label/field selectors of a list or watch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn from_query(t: &Target, query: &Query) -> Result<Filter, ApiError> {
        let labels = LabelSelector::parse(param(query, "labelSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(param(query, "fieldSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let r = t.resource();
        if let Some(bad) = fields.fields().find(|f| !r.supports_field(f)) {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {bad}"
            )));
        }
        Ok(Filter {
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            labels,
            fields,
        })
    }

    pub fn matches(&self, o: &Stored) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta_str(&o.value, "namespace") == Some(ns))
            && self
                .name
                .as_deref()
                .is_none_or(|n| meta_str(&o.value, "name") == Some(n))
            && (self.labels.is_empty() || self.labels.matches(o.labels()))
            && (self.fields.is_empty() || self.fields.matches(&o.value))
    }
}

/// An opaque continue token: the list's resourceVersion and the last key served, as the
/// real server encodes them (base64url of JSON).
fn encode_continue(rv: u64, key: &Key) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{}/{}", key.0, key.1)});
    URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, Key), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((rv, (ns.to_string(), name.to_string())))
}

fn parse_rv(v: &str) -> Result<u64, ApiError> {
    v.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))
}

pub(crate) fn too_large(rv: u64, current: u64) -> ApiError {
    ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {rv}, current: {current}"),
    )
}

/// LIST: `limit`/`continue` pages over the current state (later pages are not a snapshot: a
/// watch from the list's resourceVersion replays whatever changed meanwhile);
/// `resourceVersion` (NotOlderThan, the default, or Exact only when it is the current one).
fn list(shared: &Shared, t: &Target, query: &Query) -> Result<Response<Body>, ApiError> {
    let r = t.resource();
    let filter = Filter::from_query(t, query)?;
    let limit = match param(query, "limit") {
        None | Some("") => None,
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
    };
    let rv_param = param(query, "resourceVersion").filter(|v| !v.is_empty());
    let version_match = param(query, "resourceVersionMatch").filter(|v| !v.is_empty());
    if !matches!(version_match, None | Some("NotOlderThan" | "Exact")) {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!("resourceVersionMatch: Unsupported value: {version_match:?}"),
        ));
    }
    if version_match.is_some() && rv_param.is_none() {
        return Err(ApiError::new(
            422,
            "Invalid",
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    let continue_from = param(query, "continue")
        .filter(|c| !c.is_empty())
        .map(decode_continue)
        .transpose()?;
    let store = shared.store();
    let current = store.rv();
    let (list_rv, after, limit) = match continue_from {
        Some((rv, key)) => {
            if rv < store.floor(t.res) {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some(key), limit)
        }
        // "0": any version will do, served whole like the watch cache does.
        None if rv_param == Some("0") => (current, None, None),
        None => {
            if let Some(v) = rv_param {
                let v = parse_rv(v)?;
                if v > current {
                    return Err(too_large(v, current));
                }
                if version_match == Some("Exact") && v != current {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {v} ({current})"
                    )));
                }
            }
            (current, None, limit)
        }
    };
    let namespace = t.namespace.as_deref().or((!r.namespaced).then_some(""));
    let (items, next) = store.list(t.res, namespace, after.as_ref(), limit, |o| {
        filter.matches(o)
    });
    drop(store);
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(key) = next {
        metadata["continue"] = Value::String(encode_continue(list_rv, &key));
    }
    let head = json!({"kind": r.list_kind(), "apiVersion": r.api_version(), "metadata": metadata});
    Ok(json_response(200, list_body(&head, &items)))
}

/// `{..head, "items": [..]}` from the stored bytes, without re-serializing the objects.
fn list_body(head: &Value, items: &[Arc<Stored>]) -> Vec<u8> {
    let head = serde_json::to_vec(head).unwrap_or_else(|_| b"{}".to_vec());
    let size = head.len() + items.iter().map(|o| o.json.len() + 1).sum::<usize>() + 16;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&head[..head.len() - 1]);
    out.extend_from_slice(b",\"items\":[");
    for (i, o) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&o.json);
    }
    out.extend_from_slice(b"]}");
    out
}

fn namespace_of(t: &Target) -> &str {
    t.namespace.as_deref().unwrap_or("")
}

fn name_of(t: &Target) -> &str {
    t.name.as_deref().unwrap_or("")
}

fn get(shared: &Shared, t: &Target) -> Result<Response<Body>, ApiError> {
    let obj = shared
        .store()
        .get(t.res, namespace_of(t), name_of(t))
        .ok_or_else(|| ApiError::not_found(t.resource(), name_of(t)))?;
    Ok(json_response(200, obj.json.clone()))
}

fn create(
    shared: &Shared,
    t: &Target,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    if t.resource().namespaced && t.namespace.is_none() {
        return Err(ApiError::method_not_allowed());
    }
    let value = parse_body(content_type, body)?;
    let obj = shared
        .store()
        .create(t.res, namespace_of(t), value, Write::Main)?;
    Ok(json_response(201, obj.json.clone()))
}

fn write_mode(t: &Target) -> Write {
    if t.status { Write::Status } else { Write::Main }
}

fn replace(
    shared: &Shared,
    t: &Target,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let value = parse_body(content_type, body)?;
    let obj = shared
        .store()
        .update(t.res, namespace_of(t), name_of(t), value, write_mode(t))?;
    Ok(json_response(200, obj.json.clone()))
}

/// PATCH: merge and strategic merge patches as RFC 7386 merge patches (lists replace
/// wholesale; `$patch` directives are not understood); apply patches merge the applied
/// configuration into the object, or create it (no field ownership, no apply conflicts).
fn patch(
    shared: &Shared,
    t: &Target,
    content_type: &str,
    body: &[u8],
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let r = t.resource();
    let apply = match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
        "application/apply-patch+yaml" => true,
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            ));
        }
    };
    if apply && param(query, "fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::new(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    let body_type = if apply {
        content_type
    } else {
        "application/json"
    };
    let patch = parse_body(body_type, body)?;
    let (namespace, name) = (namespace_of(t), name_of(t));
    let mut store = shared.store();
    let Some(existing) = store.get(t.res, namespace, name) else {
        if apply && !t.status {
            if meta_str(&patch, "name").is_some_and(|n| n != name) {
                return Err(ApiError::bad_request(format!(
                    "the name of the object does not match the name on the URL ({name})"
                )));
            }
            let mut obj = patch;
            if !obj["metadata"].is_object() {
                obj["metadata"] = json!({});
            }
            obj["metadata"]["name"] = Value::String(name.to_string());
            let created = store.create(t.res, namespace, obj, Write::Main)?;
            return Ok(json_response(201, created.json.clone()));
        }
        return Err(ApiError::not_found(r, name));
    };
    let mut merged = existing.value.clone();
    merge_patch(&mut merged, &patch);
    let obj = store.update(t.res, namespace, name, merged, write_mode(t))?;
    Ok(json_response(200, obj.json.clone()))
}

/// `DeleteOptions` from the body (if any) and the `propagationPolicy` parameter.
fn delete_options(body: &[u8], query: &Query) -> Result<DeleteOptions, ApiError> {
    let mut opts = DeleteOptions::default();
    let mut policy = param(query, "propagationPolicy").map(str::to_string);
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
        let pre = |f: &str| v.get("preconditions")?.get(f)?.as_str().map(str::to_string);
        opts.resource_version = pre("resourceVersion");
        opts.uid = pre("uid");
        if let Some(p) = v.get("propagationPolicy").and_then(Value::as_str) {
            policy = Some(p.to_string());
        }
        if v.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
            policy = Some("Orphan".into());
        }
    }
    opts.orphan = match policy.as_deref() {
        None | Some("" | "Background" | "Foreground") => false,
        Some("Orphan") => true,
        Some(p) => {
            return Err(ApiError::bad_request(format!(
                "unsupported propagationPolicy {p:?}"
            )));
        }
    };
    Ok(opts)
}

/// DELETE: immediate; answers a `Status` with `status: Success` and the object's details, as
/// the real server does for an object deleted at once.
fn delete(
    shared: &Shared,
    t: &Target,
    body: &[u8],
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let opts = delete_options(body, query)?;
    let r = t.resource();
    let old = shared
        .store()
        .delete(t.res, namespace_of(t), name_of(t), &opts)?;
    Ok(value_response(
        200,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name_of(t),
                "group": r.group,
                "kind": r.plural,
                "uid": meta_str(&old.value, "uid").unwrap_or_default(),
            },
        }),
    ))
}

/// DELETE on a collection: deletes every object the selectors match and answers their list.
fn delete_collection(
    shared: &Shared,
    t: &Target,
    body: &[u8],
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let r = t.resource();
    let filter = Filter::from_query(t, query)?;
    let opts = delete_options(body, query)?;
    let mut store = shared.store();
    let namespace = t.namespace.as_deref().or((!r.namespaced).then_some(""));
    let (items, _) = store.list(t.res, namespace, None, None, |o| filter.matches(o));
    let mut deleted = Vec::with_capacity(items.len());
    for o in items {
        let ns = meta_str(&o.value, "namespace").unwrap_or_default();
        let name = meta_str(&o.value, "name").unwrap_or_default();
        // A dependent of an earlier item may be gone already.
        if let Ok(old) = store.delete(t.res, ns, name, &opts) {
            deleted.push(old);
        }
    }
    let head = json!({
        "kind": r.list_kind(),
        "apiVersion": r.api_version(),
        "metadata": {"resourceVersion": store.rv().to_string()},
    });
    drop(store);
    Ok(json_response(200, list_body(&head, &deleted)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_like_go() {
        let q = parse_query(
            "watch=1&labelSelector=app+in+%28a%2Cb%29&fieldSelector=spec.nodeName%3Dn1&x",
        );
        assert_eq!(param(&q, "labelSelector"), Some("app in (a,b)"));
        assert_eq!(param(&q, "fieldSelector"), Some("spec.nodeName=n1"));
        assert_eq!(param(&q, "x"), Some(""));
        assert_eq!(bool_param(&q, "watch"), Ok(Some(true)));
        assert_eq!(bool_param(&q, "missing"), Ok(None));
        assert!(bool_param(&parse_query("watch=yes"), "watch").is_err());
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let key = ("default".to_string(), "pod-2".to_string());
        let token = encode_continue(42, &key);
        assert_eq!(decode_continue(&token), Ok((42, key)));
        assert_eq!(decode_continue("%%%").unwrap_err().code, 400);
        assert_eq!(decode_continue("e30").unwrap_err().code, 400);
    }

    fn resolve(path: &str, crds: bool) -> Result<Target, ApiError> {
        let store = Store::new(10, [0; 16], crds);
        let segs: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let (g, v, skip) = if segs[0] == "api" {
            ("", "v1", 2)
        } else {
            (segs[1].as_str(), segs[2].as_str(), 3)
        };
        target(&store, g, v, &segs[skip..])
    }

    #[test]
    fn paths_resolve_to_resources() {
        let t = resolve("/api/v1/namespaces/ns1/pods/p/status", true).unwrap();
        assert_eq!(
            (
                t.resource().plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.status
            ),
            ("pods", Some("ns1"), Some("p"), true)
        );
        let t = resolve("/api/v1/namespaces/ns1", true).unwrap();
        assert_eq!(
            (t.resource().plural, t.namespace, t.name.as_deref()),
            ("namespaces", None, Some("ns1"))
        );
        let t = resolve("/api/v1/namespaces/ns1/status", true).unwrap();
        assert!(t.status && t.resource().plural == "namespaces");
        let t = resolve("/api/v1/pods", true).unwrap();
        assert_eq!((t.namespace, t.name), (None, None));
        let t = resolve(
            "/apis/redirect.dev/v1alpha1/namespaces/a/sandboxes/s/status",
            true,
        )
        .unwrap();
        assert!(t.status && t.resource().kind == "Sandbox");
        let t = resolve(
            "/apis/redirect.dev/v1alpha1/namespaces/a/routegroups/r/status",
            true,
        )
        .unwrap();
        assert!(t.status && t.resource().kind == "RouteGroup");
        for missing in [
            "/api/v1/pods/p",
            "/api/v1/namespaces/a/namespaces",
            "/api/v1/namespaces/a/endpoints",
            "/apis/redirect.dev/v1alpha1/namespaces/a/routegroups/r/scale",
            "/api/v1/namespaces/a/pods/p/log",
        ] {
            assert_eq!(resolve(missing, true).unwrap_err().code, 404, "{missing}");
        }
        assert_eq!(
            resolve("/apis/redirect.dev/v1alpha1/sandboxes", false)
                .unwrap_err()
                .code,
            404
        );
    }
}
