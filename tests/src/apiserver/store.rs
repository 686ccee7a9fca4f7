//! Objects, the global resourceVersion, per-resource change history and compaction.
//!
//! One counter versions every write of every resource, as etcd's revision does; an object's
//! `metadata.resourceVersion` is the version of its last write. The empty store is at version
//! 1 (the first write makes 2), so no list ever answers "0", which clients read as "any". Each resource keeps its
//! objects in a `BTreeMap` by (namespace, name), with the JSON bytes serialized once per
//! write, and its changes in a history that watches replay. History at or below a resource's
//! *floor* is gone: [`Store::compact`] raises every floor to the current version, and a
//! history longer than its limit drops its oldest changes.
//!
//! Writes are the registry's, simplified: create sets `uid`, `creationTimestamp`,
//! `generation: 1`; an update keeps `uid` and `creationTimestamp` and bumps `generation` when
//! anything but `metadata` and `status` changed; a write that changes nothing is not a write
//! (no new version, no event), as with etcd's guaranteed update; deletion is immediate (no
//! `deletionTimestamp`, finalizers are ignored) and deletes dependents whose every owner is
//! gone (what the garbage collector does shortly after).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::resources::{RESOURCES, Resource};
use super::status::ApiError;

/// (namespace, name); the namespace is "" for cluster-scoped objects.
pub(crate) type Key = (String, String);

/// One version of one object.
#[derive(Debug)]
pub(crate) struct Stored {
    pub value: Value,
    /// `value` serialized.
    pub json: Bytes,
    pub rv: u64,
}

impl Stored {
    fn new(value: Value, rv: u64) -> Arc<Stored> {
        let json = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
        Arc::new(Stored { value, json, rv })
    }

    pub fn labels(&self) -> Option<&Map<String, Value>> {
        self.value
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
    }

    fn uid(&self) -> &str {
        meta_str(&self.value, "uid").unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One write, as watches see it.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub ty: ChangeType,
    /// The new state; for a deletion the last state with `resourceVersion` set to `rv`.
    pub object: Arc<Stored>,
    /// The state before a modification.
    pub prev: Option<Arc<Stored>>,
}

/// Which part of an object an update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// The main resource: `.status` is kept when the resource has a status subresource.
    Main,
    /// The `/status` subresource: only `.status` changes.
    Status,
    /// An administrator's direct write ([`super::ApiServer::apply_json`]): everything but
    /// `uid` and `creationTimestamp` changes, status included.
    Admin,
}

/// Delete preconditions (`DeleteOptions.preconditions`) and propagation.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeleteOptions {
    pub resource_version: Option<String>,
    pub uid: Option<String>,
    /// `propagationPolicy: Orphan`: dependents are left alone.
    pub orphan: bool,
}

#[derive(Debug)]
struct Collection {
    objects: BTreeMap<Key, Arc<Stored>>,
    history: VecDeque<Arc<Change>>,
    /// Changes at or below this version are gone.
    floor: u64,
    notify: watch::Sender<u64>,
}

/// Every object of every served resource. Not synchronized: the server keeps it in a mutex.
#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    collections: Vec<Collection>,
    history_limit: usize,
    /// uid of every object, for owner lookups.
    uids: HashMap<String, (usize, Key)>,
    /// Owner uid -> objects naming it in `metadata.ownerReferences`.
    dependents: HashMap<String, BTreeSet<(usize, Key)>>,
    seed: [u8; 16],
    counter: u64,
    crds_installed: bool,
}

/// `metadata.<field>` as a string.
pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn set_rv(value: &mut Value, rv: u64) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// The uids in `metadata.ownerReferences`.
fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The object without `metadata` and `status`: what `generation` versions.
fn spec_part(obj: &Value) -> Map<String, Value> {
    let mut m = obj.as_object().cloned().unwrap_or_default();
    m.remove("metadata");
    m.remove("status");
    m
}

/// RFC 1123 subdomain: what the real server requires of these resources' names.
fn check_name(r: &Resource, name: &str) -> Result<(), ApiError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            r,
            name,
            format!(
                "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ))
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time since the epoch.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Store {
    /// An empty store; `seed` makes this server's uids unique.
    pub fn new(history_limit: usize, seed: [u8; 16], crds_installed: bool) -> Store {
        Store {
            rv: 1,
            collections: RESOURCES
                .iter()
                .map(|_| Collection {
                    objects: BTreeMap::new(),
                    history: VecDeque::new(),
                    floor: 1,
                    notify: watch::channel(1).0,
                })
                .collect(),
            history_limit: history_limit.max(1),
            uids: HashMap::new(),
            dependents: HashMap::new(),
            seed,
            counter: 0,
            crds_installed,
        }
    }

    /// The current (latest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Whether `res` is served now (custom resources only once their CRDs are installed).
    pub fn served(&self, res: usize) -> bool {
        !RESOURCES[res].crd || self.crds_installed
    }

    pub fn crds_installed(&self) -> bool {
        self.crds_installed
    }

    pub fn install_crds(&mut self) {
        self.crds_installed = true;
    }

    /// Changes of `res` at or below this are gone.
    pub fn floor(&self, res: usize) -> u64 {
        self.collections[res].floor
    }

    /// Drops all history: watches and continue tokens from before now are too old.
    pub fn compact(&mut self) {
        for c in &mut self.collections {
            c.history.clear();
            c.floor = self.rv;
        }
    }

    /// A receiver that changes whenever `res` does.
    pub fn subscribe(&self, res: usize) -> watch::Receiver<u64> {
        self.collections[res].notify.subscribe()
    }

    pub fn get(&self, res: usize, namespace: &str, name: &str) -> Option<Arc<Stored>> {
        self.collections[res]
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Up to `limit` (None or 0: no limit) objects of `res` (in `namespace`, or all) after key
    /// `after` that pass `keep`, in key order, and the key to continue after when more would
    /// pass.
    pub fn list(
        &self,
        res: usize,
        namespace: Option<&str>,
        after: Option<&Key>,
        limit: Option<usize>,
        keep: impl Fn(&Stored) -> bool,
    ) -> (Vec<Arc<Stored>>, Option<Key>) {
        let limit = limit.filter(|&l| l > 0);
        let objects = &self.collections[res].objects;
        let start = match (after, namespace) {
            (Some(k), _) => Bound::Excluded(k.clone()),
            (None, Some(ns)) => Bound::Included((ns.to_string(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut last: Option<&Key> = None;
        let matching = objects
            .range((start, Bound::Unbounded))
            .take_while(|((ns, _), _)| namespace.is_none_or(|want| ns == want))
            .filter(|(_, o)| keep(o));
        for (key, obj) in matching {
            if let (Some(limit), Some(last)) = (limit, last)
                && items.len() >= limit
            {
                return (items, Some(last.clone()));
            }
            last = Some(key);
            items.push(obj.clone());
        }
        (items, None)
    }

    /// Every object of `res`.
    pub fn all(&self, res: usize) -> impl Iterator<Item = &Arc<Stored>> {
        self.collections[res].objects.values()
    }

    /// The changes of `res` after `cursor`, at most `max`; `Err(floor)` when some are gone.
    pub fn changes_since(
        &self,
        res: usize,
        cursor: u64,
        max: usize,
    ) -> Result<Vec<Arc<Change>>, u64> {
        let c = &self.collections[res];
        if cursor < c.floor {
            return Err(c.floor);
        }
        let start = c.history.partition_point(|ch| ch.rv <= cursor);
        Ok(c.history.range(start..).take(max).cloned().collect())
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn new_uid(&mut self) -> String {
        self.counter += 1;
        let mut b = self.seed;
        for (i, x) in self.counter.to_be_bytes().iter().enumerate() {
            b[8 + i] ^= x;
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// Five characters of the alphabet the real server's `generateName` uses.
    fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        self.counter += 1;
        // splitmix64 of the counter, keyed by the seed.
        let mut x =
            self.counter ^ u64::from_le_bytes(self.seed[..8].try_into().unwrap_or_default());
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        (0..5)
            .map(|i| ALPHABET[((x >> (i * 8)) % ALPHABET.len() as u64) as usize] as char)
            .collect()
    }

    fn record(
        &mut self,
        res: usize,
        ty: ChangeType,
        object: Arc<Stored>,
        prev: Option<Arc<Stored>>,
    ) {
        let rv = object.rv;
        let c = &mut self.collections[res];
        c.history.push_back(Arc::new(Change {
            rv,
            ty,
            object,
            prev,
        }));
        while c.history.len() > self.history_limit {
            if let Some(old) = c.history.pop_front() {
                c.floor = old.rv;
            }
        }
        c.notify.send_replace(rv);
    }

    /// Checks `apiVersion`/`kind` against the resource (filling them in when missing) and
    /// makes sure `metadata` is an object.
    fn normalize(r: &Resource, value: &mut Value) -> Result<(), ApiError> {
        let Some(obj) = value.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ));
        };
        let api_version = r.api_version();
        match obj.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v != api_version => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )));
            }
            _ => {
                obj.insert("apiVersion".into(), Value::String(api_version));
            }
        }
        match obj.get("kind").and_then(Value::as_str) {
            Some(k) if k != r.kind => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    r.kind
                )));
            }
            _ => {
                obj.insert("kind".into(), Value::String(r.kind.into()));
            }
        }
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj.insert("metadata".into(), json!({}));
        }
        Ok(())
    }

    /// Sets the namespace from the request (rejecting a different one in the body).
    fn place(r: &Resource, value: &mut Value, namespace: &str) -> Result<(), ApiError> {
        let meta = value["metadata"].as_object_mut().expect("normalized");
        if r.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), Value::String(namespace.into()));
                }
            }
        } else {
            meta.remove("namespace");
        }
        Ok(())
    }

    /// Creates an object of `res` in `namespace` ("" for cluster-scoped resources).
    pub fn create(
        &mut self,
        res: usize,
        namespace: &str,
        mut value: Value,
        write: Write,
    ) -> Result<Arc<Stored>, ApiError> {
        let r = &RESOURCES[res];
        let namespace = if r.namespaced { namespace } else { "" };
        Self::normalize(r, &mut value)?;
        Self::place(r, &mut value, namespace)?;
        let name = match meta_str(&value, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => {
                let Some(prefix) = meta_str(&value, "generateName").filter(|n| !n.is_empty())
                else {
                    return Err(ApiError::invalid(
                        r,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                };
                let prefix = prefix.to_string();
                let mut name = String::new();
                for _ in 0..16 {
                    name = format!("{prefix}{}", self.name_suffix());
                    if self.get(res, namespace, &name).is_none() {
                        break;
                    }
                }
                name
            }
        };
        check_name(r, &name)?;
        let key = (namespace.to_string(), name);
        if self.collections[res].objects.contains_key(&key) {
            return Err(ApiError::already_exists(r, &key.1));
        }
        if r.status && write != Write::Admin {
            value.as_object_mut().expect("normalized").remove("status");
        }
        // An administrator (a test acting as the kubelet's side of the world) may choose the
        // uid, e.g. a pod's, which names its cgroup; clients never can.
        let given = meta_str(&value, "uid")
            .filter(|u| write == Write::Admin && !u.is_empty() && !self.uids.contains_key(*u))
            .map(str::to_string);
        let uid = match given {
            Some(u) => u,
            None => self.new_uid(),
        };
        let rv = self.next_rv();
        let meta = value["metadata"].as_object_mut().expect("normalized");
        meta.insert("name".into(), Value::String(key.1.clone()));
        meta.insert("uid".into(), Value::String(uid.clone()));
        meta.insert(
            "creationTimestamp".into(),
            Value::String(rfc3339(SystemTime::now())),
        );
        meta.insert("generation".into(), json!(1));
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        meta.remove("deletionTimestamp");
        let stored = Stored::new(value, rv);
        self.uids.insert(uid, (res, key.clone()));
        self.index_owners(res, &key, None, Some(&stored.value));
        self.collections[res].objects.insert(key, stored.clone());
        self.record(res, ChangeType::Added, stored.clone(), None);
        Ok(stored)
    }

    /// Replaces object `name` with `value` (the part of it `write` allows). A non-empty
    /// `metadata.resourceVersion` in `value` must be the stored one (else 409 Conflict).
    pub fn update(
        &mut self,
        res: usize,
        namespace: &str,
        name: &str,
        mut value: Value,
        write: Write,
    ) -> Result<Arc<Stored>, ApiError> {
        let r = &RESOURCES[res];
        let namespace = if r.namespaced { namespace } else { "" };
        let Some(old) = self.get(res, namespace, name) else {
            return Err(ApiError::not_found(r, name));
        };
        Self::normalize(r, &mut value)?;
        Self::place(r, &mut value, namespace)?;
        match meta_str(&value, "name") {
            Some(n) if !n.is_empty() && n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        match meta_str(&value, "resourceVersion").filter(|v| !v.is_empty()) {
            Some(v) if v.parse::<u64>().ok() != Some(old.rv) => {
                return Err(ApiError::conflict(r, name));
            }
            Some(_) => {}
            None if !r.unconditional_update && write != Write::Admin => {
                return Err(ApiError::invalid(
                    r,
                    name,
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                ));
            }
            None => {}
        }
        match meta_str(&value, "uid").filter(|v| !v.is_empty()) {
            Some(uid) if uid != old.uid() => {
                return Err(ApiError::precondition(
                    r,
                    name,
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        old.uid()
                    ),
                ));
            }
            _ => {}
        }
        let mut new = match write {
            Write::Status => {
                let mut new = old.value.clone();
                match value.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        new.as_object_mut()
                            .expect("stored objects are objects")
                            .remove("status");
                    }
                }
                new
            }
            Write::Main if r.status => {
                match old.value.get("status") {
                    Some(s) => value["status"] = s.clone(),
                    None => {
                        value.as_object_mut().expect("normalized").remove("status");
                    }
                }
                value
            }
            Write::Main | Write::Admin => value,
        };
        let generation = old
            .value
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = if spec_part(&new) == spec_part(&old.value) {
            generation
        } else {
            generation + 1
        };
        {
            let meta = new["metadata"].as_object_mut().expect("normalized");
            meta.insert("name".into(), Value::String(name.into()));
            for field in ["uid", "creationTimestamp"] {
                match old.value["metadata"].get(field) {
                    Some(v) => meta.insert(field.into(), v.clone()),
                    None => meta.remove(field),
                };
            }
            meta.insert("generation".into(), json!(generation));
            meta.insert("resourceVersion".into(), Value::String(old.rv.to_string()));
            meta.remove("deletionTimestamp");
        }
        if new == old.value {
            return Ok(old);
        }
        let rv = self.next_rv();
        set_rv(&mut new, rv);
        let stored = Stored::new(new, rv);
        let key = (namespace.to_string(), name.to_string());
        self.index_owners(res, &key, Some(&old.value), Some(&stored.value));
        self.collections[res].objects.insert(key, stored.clone());
        self.record(res, ChangeType::Modified, stored.clone(), Some(old));
        Ok(stored)
    }

    /// Deletes object `name` and returns it as it was. Unless orphaning, objects whose owners
    /// (`metadata.ownerReferences`) are all gone afterwards are deleted too, recursively.
    pub fn delete(
        &mut self,
        res: usize,
        namespace: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Arc<Stored>, ApiError> {
        let r = &RESOURCES[res];
        let namespace = if r.namespaced { namespace } else { "" };
        let Some(old) = self.get(res, namespace, name) else {
            return Err(ApiError::not_found(r, name));
        };
        if let Some(uid) = opts.uid.as_deref().filter(|u| *u != old.uid()) {
            return Err(ApiError::precondition(
                r,
                name,
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old.uid()
                ),
            ));
        }
        if let Some(v) = opts
            .resource_version
            .as_deref()
            .filter(|v| v.parse::<u64>().ok() != Some(old.rv))
        {
            return Err(ApiError::precondition(
                r,
                name,
                format!(
                    "Precondition failed: ResourceVersion in precondition: {v}, ResourceVersion in object meta: {}",
                    old.rv
                ),
            ));
        }
        self.remove(res, (namespace.to_string(), name.to_string()));
        if !opts.orphan {
            let mut gone = vec![old.uid().to_string()];
            while let Some(uid) = gone.pop() {
                for (dres, key) in self.orphans_of(&uid) {
                    if let Some(d) = self.remove(dres, key) {
                        gone.push(d.uid().to_string());
                    }
                }
            }
        }
        Ok(old)
    }

    /// Moves the object at `key` in the owner index from the owners of `old` to those of
    /// `new`.
    fn index_owners(&mut self, res: usize, key: &Key, old: Option<&Value>, new: Option<&Value>) {
        for uid in old.map(owner_uids).unwrap_or_default() {
            if let Some(set) = self.dependents.get_mut(&uid) {
                set.remove(&(res, key.clone()));
                if set.is_empty() {
                    self.dependents.remove(&uid);
                }
            }
        }
        for uid in new.map(owner_uids).unwrap_or_default() {
            self.dependents
                .entry(uid)
                .or_default()
                .insert((res, key.clone()));
        }
    }

    /// Objects that name `uid` as an owner and have no owner left.
    fn orphans_of(&self, uid: &str) -> Vec<(usize, Key)> {
        let Some(dependents) = self.dependents.get(uid) else {
            return Vec::new();
        };
        dependents
            .iter()
            .filter(|(res, key)| {
                self.collections[*res].objects.get(key).is_some_and(|o| {
                    owner_uids(&o.value)
                        .iter()
                        .all(|u| !self.uids.contains_key(u))
                })
            })
            .cloned()
            .collect()
    }

    fn remove(&mut self, res: usize, key: Key) -> Option<Arc<Stored>> {
        let old = self.collections[res].objects.remove(&key)?;
        self.uids.remove(old.uid());
        self.index_owners(res, &key, Some(&old.value), None);
        let rv = self.next_rv();
        let mut last = old.value.clone();
        set_rv(&mut last, rv);
        let deleted = Stored::new(last, rv);
        self.record(res, ChangeType::Deleted, deleted, None);
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::by_kind;

    fn pods() -> usize {
        by_kind("v1", "Pod").unwrap()
    }

    fn sandboxes() -> usize {
        by_kind("redirect.dev/v1alpha1", "Sandbox").unwrap()
    }

    fn pod(name: &str, node: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"nodeName": node}})
    }

    fn store() -> Store {
        Store::new(1000, [7; 16], true)
    }

    #[test]
    fn an_administrator_may_choose_a_new_objects_uid_and_a_client_may_not() {
        let mut s = store();
        let with_uid = |name: &str| {
            let mut p = pod(name, "n1");
            p["metadata"]["uid"] = json!("chosen-1");
            p
        };
        let a = s.create(pods(), "ns", with_uid("a"), Write::Admin).unwrap();
        assert_eq!(meta_str(&a.value, "uid"), Some("chosen-1"));
        let b = s.create(pods(), "ns", with_uid("b"), Write::Admin).unwrap();
        assert_ne!(
            meta_str(&b.value, "uid"),
            Some("chosen-1"),
            "uids stay unique"
        );
        let c = s.create(pods(), "ns", with_uid("c"), Write::Main).unwrap();
        assert_ne!(meta_str(&c.value, "uid"), Some("chosen-1"));
    }

    #[test]
    fn every_write_takes_the_next_global_version() {
        let mut s = store();
        let a = s.create(pods(), "ns", pod("a", "n1"), Write::Main).unwrap();
        let b = s
            .create(
                sandboxes(),
                "ns",
                json!({"metadata": {"name": "b"}, "spec": {"routingKey": "k"}}),
                Write::Main,
            )
            .unwrap();
        let a2 = s
            .update(pods(), "ns", "a", pod("a", "n2"), Write::Main)
            .unwrap();
        assert_eq!((a.rv, b.rv, a2.rv, s.rv()), (2, 3, 4, 4));
        assert_eq!(meta_str(&a2.value, "resourceVersion"), Some("4"));
        assert_eq!(a2.value["apiVersion"], "v1");
        assert_eq!(a2.value["kind"], "Pod");
        assert_eq!(a2.value["metadata"]["namespace"], "ns");
        assert_eq!(meta_str(&a2.value, "uid"), meta_str(&a.value, "uid"));
        assert_eq!(
            meta_str(&a2.value, "creationTimestamp"),
            meta_str(&a.value, "creationTimestamp")
        );
        let uid = meta_str(&a.value, "uid").unwrap();
        assert_eq!(uid.len(), 36);
        assert_ne!(Some(uid), meta_str(&b.value, "uid"));
        let deleted = s
            .delete(pods(), "ns", "a", &DeleteOptions::default())
            .unwrap();
        assert_eq!(deleted.rv, 4, "delete answers the object as it was");
        assert_eq!(s.rv(), 5);
        assert!(s.get(pods(), "ns", "a").is_none());
    }

    #[test]
    fn history_replays_changes_in_order_with_deletions_at_their_version() {
        let mut s = store();
        s.create(pods(), "ns", pod("a", "n1"), Write::Main).unwrap();
        s.create(pods(), "ns", pod("b", "n1"), Write::Main).unwrap();
        s.update(pods(), "ns", "a", pod("a", "n2"), Write::Main)
            .unwrap();
        s.delete(pods(), "ns", "b", &DeleteOptions::default())
            .unwrap();
        let all = s.changes_since(pods(), 1, 100).unwrap();
        let seen: Vec<(u64, ChangeType)> = all.iter().map(|c| (c.rv, c.ty)).collect();
        assert_eq!(
            seen,
            [
                (2, ChangeType::Added),
                (3, ChangeType::Added),
                (4, ChangeType::Modified),
                (5, ChangeType::Deleted)
            ]
        );
        assert_eq!(
            all[2].prev.as_ref().unwrap().value["spec"]["nodeName"],
            "n1"
        );
        assert_eq!(meta_str(&all[3].object.value, "resourceVersion"), Some("5"));
        assert_eq!(s.changes_since(pods(), 3, 100).unwrap().len(), 2);
        assert_eq!(s.changes_since(pods(), 3, 1).unwrap()[0].rv, 4);
        assert!(s.changes_since(pods(), 5, 100).unwrap().is_empty());
        assert!(s.changes_since(sandboxes(), 1, 100).unwrap().is_empty());
        assert!(
            s.changes_since(sandboxes(), 0, 100).is_err(),
            "before the empty store"
        );
    }

    #[test]
    fn compaction_makes_older_versions_too_old() {
        let mut s = store();
        s.create(pods(), "ns", pod("a", "n1"), Write::Main).unwrap();
        s.create(pods(), "ns", pod("b", "n1"), Write::Main).unwrap();
        s.compact();
        assert_eq!(s.floor(pods()), 3);
        assert_eq!(s.changes_since(pods(), 2, 100).unwrap_err(), 3);
        assert!(s.changes_since(pods(), 3, 100).unwrap().is_empty());
        assert_eq!(s.changes_since(sandboxes(), 1, 100).unwrap_err(), 3);
        s.create(pods(), "ns", pod("c", "n1"), Write::Main).unwrap();
        assert_eq!(s.changes_since(pods(), 3, 100).unwrap().len(), 1);
    }

    #[test]
    fn history_beyond_its_limit_is_dropped_like_compaction() {
        let mut s = Store::new(2, [0; 16], true);
        for name in ["a", "b", "c"] {
            s.create(pods(), "ns", pod(name, "n1"), Write::Main)
                .unwrap();
        }
        assert_eq!(s.floor(pods()), 2);
        assert!(s.changes_since(pods(), 1, 10).is_err());
        assert_eq!(s.changes_since(pods(), 2, 10).unwrap().len(), 2);
    }

    #[test]
    fn stale_resource_version_conflicts_and_custom_resources_need_one() {
        let mut s = store();
        s.create(pods(), "ns", pod("a", "n1"), Write::Main).unwrap();
        s.update(pods(), "ns", "a", pod("a", "n2"), Write::Main)
            .unwrap();
        let mut stale = pod("a", "n3");
        stale["metadata"]["resourceVersion"] = json!("1");
        assert_eq!(
            s.update(pods(), "ns", "a", stale, Write::Main)
                .unwrap_err()
                .reason,
            "Conflict"
        );
        s.create(
            sandboxes(),
            "ns",
            json!({"metadata": {"name": "x"}, "spec": {}}),
            Write::Main,
        )
        .unwrap();
        let err = s
            .update(
                sandboxes(),
                "ns",
                "x",
                json!({"metadata": {"name": "x"}, "spec": {"a": 1}}),
                Write::Main,
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        let err = s
            .create(pods(), "ns", pod("a", "n1"), Write::Main)
            .unwrap_err();
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
    }

    #[test]
    fn generation_tracks_spec_and_status_is_split_off() {
        let mut s = store();
        let sbx = sandboxes();
        let created = s
            .create(
                sbx,
                "ns",
                json!({"metadata": {"name": "x"}, "spec": {"k": 1}, "status": {"s": 1}}),
                Write::Main,
            )
            .unwrap();
        assert_eq!(created.value["metadata"]["generation"], 1);
        assert!(
            created.value.get("status").is_none(),
            "status is dropped on create"
        );
        let with_status = json!({"metadata": {"name": "x", "resourceVersion": "2"}, "spec": {"k": 2}, "status": {"s": 2}});
        let st = s
            .update(sbx, "ns", "x", with_status.clone(), Write::Status)
            .unwrap();
        assert_eq!(
            (
                st.value["spec"]["k"].clone(),
                st.value["status"]["s"].clone()
            ),
            (json!(1), json!(2))
        );
        assert_eq!(st.value["metadata"]["generation"], 1);
        let mut main = with_status;
        main["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        main["status"] = json!({"s": 3});
        let m = s.update(sbx, "ns", "x", main, Write::Main).unwrap();
        assert_eq!(
            (m.value["spec"]["k"].clone(), m.value["status"]["s"].clone()),
            (json!(2), json!(2))
        );
        assert_eq!(m.value["metadata"]["generation"], 2);
        let mut labelled = m.value.clone();
        labelled["metadata"]["labels"] = json!({"a": "b"});
        let l = s.update(sbx, "ns", "x", labelled, Write::Main).unwrap();
        assert_eq!(l.value["metadata"]["generation"], 2, "metadata is not spec");
    }

    #[test]
    fn a_write_that_changes_nothing_is_not_a_write() {
        let mut s = store();
        let a = s.create(pods(), "ns", pod("a", "n1"), Write::Main).unwrap();
        let same = s
            .update(pods(), "ns", "a", a.value.clone(), Write::Main)
            .unwrap();
        assert_eq!((same.rv, s.rv()), (2, 2));
        assert_eq!(s.changes_since(pods(), 1, 10).unwrap().len(), 1);
    }

    #[test]
    fn generate_name_makes_unique_names() {
        let mut s = store();
        let obj = json!({"metadata": {"generateName": "lease-"}});
        let a = s.create(pods(), "ns", obj.clone(), Write::Main).unwrap();
        let b = s.create(pods(), "ns", obj, Write::Main).unwrap();
        let (na, nb) = (
            meta_str(&a.value, "name").unwrap(),
            meta_str(&b.value, "name").unwrap(),
        );
        assert!(na.starts_with("lease-") && na.len() == 11, "{na}");
        assert_ne!(na, nb);
        let err = s
            .create(pods(), "ns", json!({"metadata": {}}), Write::Main)
            .unwrap_err();
        assert_eq!(err.code, 422);
        let err = s
            .create(pods(), "ns", pod("Bad_Name", "n"), Write::Main)
            .unwrap_err();
        assert_eq!(err.code, 422);
    }

    #[test]
    fn deleting_an_owner_deletes_dependents_whose_owners_are_all_gone() {
        let mut s = store();
        let owner = s
            .create(
                sandboxes(),
                "ns",
                json!({"metadata": {"name": "o"}}),
                Write::Main,
            )
            .unwrap();
        let other = s
            .create(
                sandboxes(),
                "ns",
                json!({"metadata": {"name": "o2"}}),
                Write::Main,
            )
            .unwrap();
        let uid = meta_str(&owner.value, "uid").unwrap().to_string();
        let uid2 = meta_str(&other.value, "uid").unwrap().to_string();
        let owned = |name: &str, uids: &[&str]| {
            let refs: Vec<Value> = uids.iter().map(|u| json!({"uid": u, "kind": "Sandbox", "name": "x", "apiVersion": "redirect.dev/v1alpha1"})).collect();
            json!({"metadata": {"name": name, "ownerReferences": refs}})
        };
        let child = s
            .create(pods(), "ns", owned("child", &[&uid]), Write::Main)
            .unwrap();
        let child_uid = meta_str(&child.value, "uid").unwrap().to_string();
        s.create(pods(), "ns", owned("shared", &[&uid, &uid2]), Write::Main)
            .unwrap();
        let events = by_kind("v1", "Event").unwrap();
        s.create(
            events,
            "ns",
            owned("grandchild", &[&child_uid]),
            Write::Main,
        )
        .unwrap();
        s.delete(sandboxes(), "ns", "o", &DeleteOptions::default())
            .unwrap();
        assert!(s.get(pods(), "ns", "child").is_none());
        assert!(s.get(events, "ns", "grandchild").is_none());
        assert!(
            s.get(pods(), "ns", "shared").is_some(),
            "another owner is alive"
        );
        // An owner reference removed by an update no longer counts.
        s.create(pods(), "ns", owned("released", &[&uid2]), Write::Main)
            .unwrap();
        s.update(
            pods(),
            "ns",
            "released",
            owned("released", &[]),
            Write::Main,
        )
        .unwrap();
        s.delete(sandboxes(), "ns", "o2", &DeleteOptions::default())
            .unwrap();
        assert!(
            s.get(pods(), "ns", "shared").is_none(),
            "its last owner is gone"
        );
        assert!(s.get(pods(), "ns", "released").is_some());

        let o3 = s
            .create(
                sandboxes(),
                "ns",
                json!({"metadata": {"name": "o3"}}),
                Write::Main,
            )
            .unwrap();
        let uid3 = meta_str(&o3.value, "uid").unwrap().to_string();
        s.create(pods(), "ns", owned("kept", &[&uid3]), Write::Main)
            .unwrap();
        let orphan = DeleteOptions {
            orphan: true,
            ..Default::default()
        };
        s.delete(sandboxes(), "ns", "o3", &orphan).unwrap();
        assert!(s.get(pods(), "ns", "kept").is_some());
    }

    #[test]
    fn delete_preconditions_are_honoured() {
        let mut s = store();
        s.create(pods(), "ns", pod("a", "n1"), Write::Main).unwrap();
        let stale = DeleteOptions {
            resource_version: Some("7".into()),
            ..Default::default()
        };
        assert_eq!(s.delete(pods(), "ns", "a", &stale).unwrap_err().code, 409);
        let wrong_uid = DeleteOptions {
            uid: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(
            s.delete(pods(), "ns", "a", &wrong_uid).unwrap_err().code,
            409
        );
        let right = DeleteOptions {
            resource_version: Some("2".into()),
            ..Default::default()
        };
        s.delete(pods(), "ns", "a", &right).unwrap();
        assert_eq!(s.delete(pods(), "ns", "a", &right).unwrap_err().code, 404);
    }

    #[test]
    fn pages_follow_key_order_within_a_namespace() {
        let mut s = store();
        for (ns, name) in [("b", "2"), ("a", "9"), ("b", "1"), ("c", "1"), ("b", "3")] {
            s.create(pods(), ns, pod(name, "n"), Write::Main).unwrap();
        }
        let names = |v: &[Arc<Stored>]| -> Vec<String> {
            v.iter()
                .map(|o| meta_str(&o.value, "name").unwrap().to_string())
                .collect()
        };
        let (page, next) = s.list(pods(), Some("b"), None, Some(2), |_| true);
        assert_eq!(names(&page), ["1", "2"]);
        let next = next.unwrap();
        let (page, last) = s.list(pods(), Some("b"), Some(&next), Some(2), |_| true);
        assert_eq!((names(&page), last), (vec!["3".to_string()], None));
        let (all, _) = s.list(pods(), None, None, None, |o| {
            o.value["metadata"]["name"] == "1"
        });
        assert_eq!(all.len(), 2);
        let (exact, next) = s.list(pods(), Some("b"), None, Some(3), |_| true);
        assert_eq!(
            (exact.len(), next),
            (3, None),
            "no continue when nothing is left"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_199);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }
}
