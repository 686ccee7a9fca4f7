//! One watch: a kube-runtime watcher (list, then watch from the list's version; relist on 410
//! Gone; bookmarks; reconnect with jittered exponential backoff) feeding a local cache of
//! projected objects. Each change wakes the source; an object that cannot be read is left out
//! (logged once, counted, shown in `/status`) and the rest goes on.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::health::Health;

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

/// The objects of one kind, as the last list and the events since left them.
#[derive(Debug)]
pub struct Cache<T> {
    inner: Mutex<CacheInner<T>>,
}

/// An object and the `resourceVersion` it arrived with.
type Versioned<T> = (Option<String>, Arc<T>);

#[derive(Debug)]
struct CacheInner<T> {
    objects: BTreeMap<ObjectKey, Versioned<T>>,
    /// Objects of a relist in progress; they replace `objects` at once when it completes, so
    /// a snapshot never sees half a list.
    pending: Option<BTreeMap<ObjectKey, Versioned<T>>>,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache {
            inner: Mutex::new(CacheInner {
                objects: BTreeMap::new(),
                pending: None,
            }),
        }
    }
}

/// Whether two caches hold the same objects at the same versions.
fn same_versions<T>(
    a: &BTreeMap<ObjectKey, Versioned<T>>,
    b: &BTreeMap<ObjectKey, Versioned<T>>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, (va, _)), (kb, (vb, _)))| ka == kb && va == vb)
}

impl<T> Cache<T> {
    /// Every object, sorted by namespace/name.
    pub fn snapshot(&self) -> Vec<Arc<T>> {
        self.lock()
            .objects
            .values()
            .map(|(_, o)| o.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn begin_list(&self) {
        self.lock().pending = Some(BTreeMap::new());
    }

    fn listed(&self, key: ObjectKey, version: Option<String>, obj: T) {
        let mut inner = self.lock();
        if let Some(p) = inner.pending.as_mut() {
            p.insert(key, (version, Arc::new(obj)));
        }
    }

    /// Completes a relist; returns whether it changed anything (a relist after a reconnect
    /// usually finds what the cache already holds: no new snapshot for it).
    fn end_list(&self) -> bool {
        let mut inner = self.lock();
        match inner.pending.take() {
            Some(p) => {
                let changed = !same_versions(&inner.objects, &p);
                inner.objects = p;
                changed
            }
            None => false,
        }
    }

    /// Adds or replaces an object; returns whether it is new or at another version.
    fn apply(&self, key: ObjectKey, version: Option<String>, obj: T) -> bool {
        let mut inner = self.lock();
        let same = version.is_some() && inner.objects.get(&key).is_some_and(|(v, _)| *v == version);
        inner.objects.insert(key, (version, Arc::new(obj)));
        !same
    }

    /// Removes an object; returns whether it was there.
    fn remove(&self, key: &ObjectKey) -> bool {
        self.lock().objects.remove(key).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Turns a watched object into what the cache keeps, or says why it cannot be used.
pub type Convert<K, T> = Box<dyn Fn(K) -> Result<T, String> + Send + Sync>;

/// Where one watch reports.
pub struct WatchSink<T> {
    pub cache: Arc<Cache<T>>,
    pub health: Arc<Health>,
    pub index: usize,
    pub changed: Arc<Notify>,
    pub kind: &'static str,
}

/// Runs the watch until the task is dropped.
pub async fn run<K, T>(
    api: Api<K>,
    config: watcher::Config,
    convert: Convert<K, T>,
    sink: WatchSink<T>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Send + 'static,
{
    let WatchSink {
        cache,
        health,
        index,
        changed,
        kind,
    } = sink;
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut crd_missing_logged = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::Init) => cache.begin_list(),
            Ok(watcher::Event::InitApply(obj)) => {
                let key = key_of(&obj);
                let version = obj.resource_version();
                match convert(obj) {
                    Ok(t) => {
                        cache.listed(key.clone(), version, t);
                        health.update(index, |w| {
                            w.skipped.remove(&format!("{}/{}", key.0, key.1));
                        });
                    }
                    Err(reason) => skip(&health, index, kind, &key, &reason),
                }
            }
            Ok(watcher::Event::InitDone) => {
                let differs = cache.end_list();
                let objects = cache.len();
                let mut first = false;
                health.update(index, |w| {
                    if !w.synced {
                        tracing::info!(kind, objects, "first list received");
                        first = true;
                    }
                    w.synced = true;
                    w.crd_missing = false;
                    w.lists_total += 1;
                });
                health.event(index, objects);
                crd_missing_logged = false;
                if first || differs {
                    changed.notify_one();
                }
            }
            Ok(watcher::Event::Apply(obj)) => {
                let key = key_of(&obj);
                let version = obj.resource_version();
                let differs = match convert(obj) {
                    Ok(t) => {
                        health.update(index, |w| {
                            w.skipped.remove(&format!("{}/{}", key.0, key.1));
                        });
                        cache.apply(key.clone(), version, t)
                    }
                    Err(reason) => {
                        // What was routed by the previous version stops: the new one is not valid.
                        skip(&health, index, kind, &key, &reason);
                        cache.remove(&key)
                    }
                };
                health.event(index, cache.len());
                if differs {
                    changed.notify_one();
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                let key = key_of(&obj);
                health.update(index, |w| {
                    w.skipped.remove(&format!("{}/{}", key.0, key.1));
                });
                let differs = cache.remove(&key);
                health.event(index, cache.len());
                if differs {
                    changed.notify_one();
                }
            }
            Err(error) => {
                let crd_missing = is_not_found(&error);
                health.error(index, &error.to_string(), crd_missing);
                if crd_missing {
                    if !crd_missing_logged {
                        crd_missing_logged = true;
                        tracing::error!(
                            kind,
                            "the {kind} CRD is not installed: install it with `kubectl apply -f \
                             deploy/crds.yaml` (or `redirect-agent crd | kubectl apply -f -`); \
                             the other kinds are served, and this watch retries"
                        );
                        // No objects of that kind: the first snapshot need not wait for it.
                        changed.notify_one();
                    }
                } else {
                    tracing::warn!(kind, %error, "watch failed; retrying with backoff (the last good state stays in force)");
                }
            }
        }
    }
}

fn key_of<K: Resource>(obj: &K) -> ObjectKey {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn skip(health: &Health, index: usize, kind: &str, key: &ObjectKey, reason: &str) {
    let name = format!("{}/{}", key.0, key.1);
    tracing::warn!(kind, object = %name, reason, "object skipped: it cannot be used for routing");
    health.update(index, |w| {
        w.skipped.insert(name, reason.to_string());
    });
}

/// The list or watch answered 404: the resource is not served (its CRD is not installed).
pub fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.is_not_found(),
        watcher::Error::WatchError(s) => s.is_not_found(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ObjectKey {
        ("ns".into(), n.into())
    }

    #[test]
    fn a_relist_replaces_the_cache_at_once_when_it_completes() {
        let v = |n: &str| Some(n.to_string());
        let cache = Cache::<u32>::default();
        assert!(cache.apply(key("old"), v("1"), 1));
        assert!(
            !cache.apply(key("old"), v("1"), 1),
            "the same version again"
        );
        cache.begin_list();
        cache.listed(key("a"), v("2"), 2);
        assert_eq!(
            cache.snapshot().iter().map(|v| **v).collect::<Vec<_>>(),
            [1],
            "half a list is never seen"
        );
        cache.listed(key("b"), v("3"), 3);
        assert!(cache.end_list(), "the relist changed the cache");
        assert_eq!(
            cache.snapshot().iter().map(|v| **v).collect::<Vec<_>>(),
            [2, 3]
        );
        cache.begin_list();
        cache.listed(key("a"), v("2"), 2);
        cache.listed(key("b"), v("3"), 3);
        assert!(
            !cache.end_list(),
            "a relist of the same versions changes nothing"
        );
        assert!(cache.remove(&key("a")));
        assert!(!cache.remove(&key("a")));
        assert_eq!(cache.len(), 1);
    }
}
