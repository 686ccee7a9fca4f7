//! Conformance of the API server stand-in (`redirect_tests::apiserver`) with the real kube-rs
//! client: `kube::Api` verbs, kube-runtime's `watcher`/`reflector` through every fault the
//! stand-in injects, and a few raw-HTTP checks of the wire format.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use redirect_agent::crd::Sandbox;
use redirect_tests::apiserver::{ApiServer, Options, RequestRecord};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Longest any one test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a condition may take to become true.
const WAIT: Duration = Duration::from_secs(15);

async fn bounded(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

fn client(api: &ApiServer) -> Result<Client> {
    Ok(Client::try_from(kube::Config::new(api.url().parse()?))?)
}

fn pod_json(name: &str, node: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
    })
}

fn pod(name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(pod_json(name, node, labels)).expect("a valid pod")
}

fn sandbox(name: &str, key: &str) -> Sandbox {
    serde_json::from_value(json!({
        "apiVersion": "redirect.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"routingKey": key, "forks": []},
    }))
    .expect("a valid sandbox")
}

fn names<K: ResourceExt>(items: impl IntoIterator<Item = K>) -> Vec<String> {
    items.into_iter().map(|o| o.name_any()).collect()
}

fn api_error(e: kube::Error) -> Result<(u16, String, String)> {
    match e {
        kube::Error::Api(s) => Ok((s.code, s.reason.clone(), s.message.clone())),
        other => bail!("expected an API error, got {other:?}"),
    }
}

fn lists(api: &ApiServer, plural: &str) -> Vec<RequestRecord> {
    api.requests()
        .into_iter()
        .filter(|r| r.is_list_of(plural))
        .collect()
}

fn watches(api: &ApiServer, plural: &str) -> Vec<RequestRecord> {
    api.requests()
        .into_iter()
        .filter(|r| r.is_watch_of(plural))
        .collect()
}

/// Polls `ok` until it holds, at most [`WAIT`]; `why` describes the state on failure.
async fn eventually(
    what: &str,
    mut ok: impl FnMut() -> bool,
    why: impl Fn() -> String,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {}", why());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A kube-runtime watcher (with the default backoff) feeding a reflector, driven on a task;
/// its events are logged as `Init`, `InitApply(name)`, `InitDone`, `Apply(name)`,
/// `Delete(name)` and `Error(..)`.
struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    reader: Store<K>,
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    fn start(api: Api<K>, config: watcher::Config) -> Watched<K> {
        let (reader, writer) = reflector::store();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let task = tokio::spawn(async move {
            let mut events = pin!(watcher(api, config).default_backoff().reflect(writer));
            while let Some(ev) = events.next().await {
                let entry = match ev {
                    Ok(e) => e.to_string(),
                    Err(e) => format!("Error({e})"),
                };
                sink.lock().unwrap().push(entry);
            }
        });
        Watched { reader, log, task }
    }

    fn names(&self) -> BTreeSet<String> {
        self.reader.state().iter().map(|o| o.name_any()).collect()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, entry: &str) -> usize {
        self.log().iter().filter(|e| *e == entry).count()
    }

    /// Waits until the reflector holds exactly `want`, after an `InitDone`.
    async fn wait_for_names(&self, want: &[&str]) -> Result<()> {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        eventually(
            &format!("the reflector to hold {want:?}"),
            || self.count("InitDone") > 0 && self.names() == want,
            || format!("holds {:?}, log {:?}", self.names(), self.log()),
        )
        .await
    }
}

impl<K: Resource + 'static> Drop for Watched<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn create_get_and_list_in_pages_of_two() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        for i in [3, 1, 5, 2, 4] {
            pods.create(&PostParams::default(), &pod(&format!("p{i}"), "n1", &[]))
                .await?;
        }
        let got = pods.get("p3").await?;
        ensure!(
            got.uid().is_some_and(|u| u.len() == 36),
            "uid {:?}",
            got.uid()
        );
        ensure!(got.creation_timestamp().is_some());
        ensure!(got.metadata.generation == Some(1));
        ensure!(
            got.resource_version().as_deref() == Some("2"),
            "the empty store is at 1"
        );

        let duplicate = pods
            .create(&PostParams::default(), &pod("p3", "n1", &[]))
            .await
            .expect_err("a second p3");
        let (code, reason, _) = api_error(duplicate)?;
        ensure!((code, reason.as_str()) == (409, "AlreadyExists"));

        let mut seen = Vec::new();
        let mut lp = ListParams::default().limit(2);
        loop {
            let page = pods.list(&lp).await?;
            ensure!(page.metadata.resource_version.as_deref() == Some("6"));
            ensure!(page.items.len() <= 2);
            seen.extend(names(page.items));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => lp = lp.continue_token(&token),
                None => break,
            }
        }
        ensure!(seen == ["p1", "p2", "p3", "p4", "p5"], "{seen:?}");
        let pages = lists(&api, "pods");
        ensure!(pages.len() == 3, "{pages:?}");
        ensure!(pages.iter().all(|r| r.param("limit") == Some("2")));
        ensure!(pages[0].param("continue").is_none());
        ensure!(pages[1..].iter().all(|r| r.param("continue").is_some()));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn continue_token_from_before_a_compaction_is_expired() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        for i in 1..=3 {
            api.apply_json(pod_json(&format!("p{i}"), "n1", &[]))?;
        }
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let first = pods.list(&ListParams::default().limit(1)).await?;
        let token = first.metadata.continue_.context("a continue token")?;
        // Compaction at a later version: the list's version (4) is gone.
        api.apply_json(pod_json("p4", "n1", &[]))?;
        api.compact();
        let err = pods
            .list(&ListParams::default().limit(1).continue_token(&token))
            .await
            .expect_err("an expired token");
        let (code, reason, _) = api_error(err)?;
        ensure!((code, reason.as_str()) == (410, "Expired"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        api.apply_json(pod_json("a", "n1", &[("app", "web"), ("tier", "front")]))?;
        api.apply_json(pod_json("b", "n2", &[("app", "web"), ("tier", "back")]))?;
        api.apply_json(pod_json("c", "n1", &[("app", "db")]))?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let list =
            async |lp: ListParams| -> Result<Vec<String>> { Ok(names(pods.list(&lp).await?)) };
        ensure!(list(ListParams::default().labels("app=web")).await? == ["a", "b"]);
        ensure!(
            list(ListParams::default().labels("app in (web,db),tier!=back")).await? == ["a", "c"]
        );
        ensure!(list(ListParams::default().labels("!tier")).await? == ["c"]);
        ensure!(list(ListParams::default().fields("spec.nodeName=n1")).await? == ["a", "c"]);
        ensure!(
            list(
                ListParams::default()
                    .fields("spec.nodeName=n1")
                    .labels("app==web")
            )
            .await?
                == ["a"]
        );
        ensure!(list(ListParams::default().fields("metadata.name!=a")).await? == ["b", "c"]);

        let all: Api<Pod> = Api::all(client(&api)?);
        ensure!(
            names(
                all.list(&ListParams::default().fields("metadata.namespace=default"))
                    .await?
            )
            .len()
                == 3
        );

        let err = pods
            .list(&ListParams::default().fields("spec.foo=x"))
            .await
            .expect_err("an unsupported field");
        let (code, reason, message) = api_error(err)?;
        ensure!(
            (code, reason.as_str()) == (400, "BadRequest") && message.contains("spec.foo"),
            "{code} {reason} {message}"
        );
        let err = pods
            .list(&ListParams::default().labels("app in web"))
            .await
            .expect_err("a malformed selector");
        ensure!(api_error(err)?.0 == 400);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn field_selected_watcher_sees_only_its_nodes_pods() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        api.apply_json(pod_json("p1", "n1", &[]))?;
        api.apply_json(pod_json("p2", "n2", &[]))?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let w = Watched::start(
            pods.clone(),
            watcher::Config::default().fields("spec.nodeName=n1"),
        );
        w.wait_for_names(&["p1"]).await?;

        pods.create(&PostParams::default(), &pod("p3", "n1", &[]))
            .await?;
        pods.create(&PostParams::default(), &pod("p4", "n2", &[]))
            .await?;
        // Pending, then bound to n1: moves into the selection.
        pods.create(&PostParams::default(), &pod("p5", "", &[]))
            .await?;
        pods.patch(
            "p5",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n1"}})),
        )
        .await?;
        w.wait_for_names(&["p1", "p3", "p5"]).await?;
        // Moved off n1 (as an administrator would; nodeName is immutable to clients).
        api.apply_json(pod_json("p1", "n2", &[]))?;
        w.wait_for_names(&["p3", "p5"]).await?;

        let log = w.log();
        ensure!(log.contains(&"Apply(p5)".to_string()), "{log:?}");
        ensure!(log.contains(&"Delete(p1)".to_string()), "{log:?}");
        ensure!(
            !log.iter().any(|e| e.contains("p2") || e.contains("p4")),
            "saw another node's pod: {log:?}"
        );
        let all = watches(&api, "pods");
        ensure!(!all.is_empty());
        ensure!(
            all.iter()
                .all(|r| r.param("fieldSelector") == Some("spec.nodeName=n1"))
        );
        ensure!(
            lists(&api, "pods")
                .iter()
                .all(|r| r.param("fieldSelector") == Some("spec.nodeName=n1"))
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn watch_from_a_compacted_version_makes_the_watcher_relist() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        api.apply_json(pod_json("p1", "n1", &[]))?;
        let w = Watched::start(pods, watcher::Config::default());
        w.wait_for_names(&["p1"]).await?;
        eventually(
            "the watch to be open",
            || api.open_watches() == 1,
            || format!("{:?}", w.log()),
        )
        .await?;
        let version_seen = api.resource_version();

        // Out of reach while its history goes away.
        api.set_down(true);
        api.apply_json(pod_json("p2", "n1", &[]))?;
        api.delete("v1", "Pod", "default", "p1")?;
        api.compact();
        let compacted = api.resource_version();
        api.set_down(false);

        w.wait_for_names(&["p2"]).await?;
        let all_lists = lists(&api, "pods");
        ensure!(all_lists.len() == 2, "expected a relist: {all_lists:?}");
        ensure!(w.count("Init") == 2, "{:?}", w.log());
        let stale: Vec<_> = watches(&api, "pods")
            .into_iter()
            .filter(|r| r.param("resourceVersion") == Some(&version_seen.to_string()))
            .collect();
        ensure!(
            stale.len() >= 2,
            "the first watch and the one answered 410: {stale:?}"
        );
        ensure!(
            w.log()
                .iter()
                .any(|e| e.starts_with("Error(") && e.contains("too old resource version")),
            "{:?}",
            w.log()
        );
        // The watch after the relist follows the relist's events: wait for its request.
        let compacted = compacted.to_string();
        eventually(
            "a watch from the relisted version",
            || {
                watches(&api, "pods")
                    .last()
                    .is_some_and(|r| r.param("resourceVersion") == Some(&compacted))
            },
            || format!("{:?}", watches(&api, "pods")),
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bookmarks_advance_the_watchers_version() -> Result<()> {
    bounded(async {
        let api = ApiServer::start_with(Options {
            bookmark_interval: Duration::from_millis(100),
            ..Options::default()
        })?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        api.apply_json(pod_json("p1", "n1", &[]))?;
        let w = Watched::start(pods, watcher::Config::default());
        w.wait_for_names(&["p1"]).await?;
        // Writes to another resource move the global version past every pod.
        for i in 0..3 {
            api.apply_json(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("s{i}"), "namespace": "default"},
                "spec": {"ports": [{"port": 80}]},
            }))?;
        }
        let latest = api.resource_version().to_string();
        let p1_version =
            api.get("v1", "Pod", "default", "p1").context("p1")?["metadata"]["resourceVersion"]
                .clone();
        ensure!(p1_version != json!(latest));
        // The watcher only learns `latest` from a bookmark; each cut shows where it resumes.
        let resumed_at_latest = || {
            watches(&api, "pods")
                .iter()
                .any(|r| r.param("resourceVersion") == Some(latest.as_str()))
        };
        let deadline = Instant::now() + WAIT;
        while !resumed_at_latest() {
            ensure!(Instant::now() < deadline, "{:?}", watches(&api, "pods"));
            tokio::time::sleep(Duration::from_millis(150)).await;
            api.drop_watches();
        }
        ensure!(lists(&api, "pods").len() == 1, "no relist");
        ensure!(
            watches(&api, "pods")
                .iter()
                .all(|r| r.param("allowWatchBookmarks") == Some("true")),
            "kube-runtime asks for bookmarks by default"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dropped_watch_resumes_from_the_last_version_without_a_relist() -> Result<()> {
    bounded(async {
        let api = ApiServer::start_with(Options {
            bookmark_interval: Duration::from_secs(3600),
            ..Options::default()
        })?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let w = Watched::start(pods.clone(), watcher::Config::default());
        w.wait_for_names(&[]).await?;
        let p1 = pods
            .create(&PostParams::default(), &pod("p1", "n1", &[]))
            .await?;
        w.wait_for_names(&["p1"]).await?;
        eventually(
            "one open watch",
            || api.open_watches() == 1,
            || api.open_watches().to_string(),
        )
        .await?;

        api.drop_watches();
        pods.create(&PostParams::default(), &pod("p2", "n1", &[]))
            .await?;
        w.wait_for_names(&["p1", "p2"]).await?;

        ensure!(lists(&api, "pods").len() == 1, "{:?}", lists(&api, "pods"));
        ensure!(
            w.count("Init") == 1 && w.count("Apply(p2)") == 1,
            "{:?}",
            w.log()
        );
        let resumed = watches(&api, "pods");
        ensure!(resumed.len() >= 2, "{resumed:?}");
        ensure!(
            resumed[1].param("resourceVersion") == p1.resource_version().as_deref(),
            "{resumed:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unreachable_server_fails_requests_and_the_watcher_recovers() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        api.apply_json(pod_json("p1", "n1", &[]))?;
        let w = Watched::start(pods.clone(), watcher::Config::default());
        w.wait_for_names(&["p1"]).await?;

        api.set_down(true);
        let err = pods.get("p1").await.expect_err("the server is down");
        ensure!(
            !matches!(err, kube::Error::Api(_)),
            "no answer expected: {err:?}"
        );
        eventually(
            "the watch to be cut",
            || api.open_watches() == 0,
            || api.open_watches().to_string(),
        )
        .await?;
        api.apply_json(pod_json("p2", "n1", &[]))?;
        eventually(
            "the watcher to report the outage",
            || w.log().iter().any(|e| e.starts_with("Error(")),
            || format!("{:?}", w.log()),
        )
        .await?;
        api.set_down(false);

        w.wait_for_names(&["p1", "p2"]).await?;
        ensure!(pods.get("p2").await?.name_any() == "p2");
        ensure!(
            lists(&api, "pods").len() == 1,
            "the history was kept: no relist"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn watch_timeout_ends_the_stream_and_the_watcher_rewatches() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let w = Watched::start(pods, watcher::Config::default().timeout(1));
        w.wait_for_names(&[]).await?;
        eventually(
            "a second watch after the timeout",
            || watches(&api, "pods").len() >= 2,
            || format!("{:?}", watches(&api, "pods")),
        )
        .await?;
        ensure!(
            watches(&api, "pods")
                .iter()
                .all(|r| r.param("timeoutSeconds") == Some("1"))
        );
        ensure!(lists(&api, "pods").len() == 1);
        ensure!(
            !w.log().iter().any(|e| e.starts_with("Error(")),
            "{:?}",
            w.log()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_then_the_end_bookmark() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        for name in ["a", "b", "c"] {
            api.apply_json(pod_json(name, "n1", &[]))?;
        }
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let w = Watched::start(pods.clone(), watcher::Config::default().streaming_lists());
        w.wait_for_names(&["a", "b", "c"]).await?;
        pods.create(&PostParams::default(), &pod("d", "n1", &[]))
            .await?;
        w.wait_for_names(&["a", "b", "c", "d"]).await?;
        let log = w.log();
        ensure!(
            log[..6]
                == [
                    "Init",
                    "InitApply(a)",
                    "InitApply(b)",
                    "InitApply(c)",
                    "InitDone",
                    "Apply(d)"
                ],
            "{log:?}"
        );
        ensure!(lists(&api, "pods").is_empty());
        let first = watches(&api, "pods")
            .into_iter()
            .next()
            .context("a watch")?;
        ensure!(
            first.param("sendInitialEvents") == Some("true"),
            "{first:?}"
        );
        ensure!(first.param("resourceVersionMatch") == Some("NotOlderThan"));
        ensure!(first.param("resourceVersion") == Some("0"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn sandbox_status_patch_changes_only_status() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let sandboxes: Api<Sandbox> = Api::namespaced(client(&api)?, "default");
        let mut with_status = serde_json::to_value(sandbox("s1", "k1"))?;
        with_status["status"] = json!({"forkCount": 9});
        let created = sandboxes
            .create(&PostParams::default(), &serde_json::from_value(with_status)?)
            .await?;
        ensure!(created.status.is_none(), "status is dropped on create");

        let patched = sandboxes
            .patch_status(
                "s1",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"routingKey": "ignored"}, "status": {"forkCount": 2, "readyEndpoints": 1}})),
            )
            .await?;
        let v = serde_json::to_value(&patched)?;
        ensure!(v["spec"]["routingKey"] == "k1", "{v}");
        ensure!(v["status"]["forkCount"] == 2 && v["status"]["readyEndpoints"] == 1, "{v}");
        ensure!(patched.metadata.generation == Some(1));
        ensure!(patched.resource_version() != created.resource_version());

        let main = sandboxes
            .patch(
                "s1",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"routingKey": "k2"}, "status": {"forkCount": 7}})),
            )
            .await?;
        let v = serde_json::to_value(&main)?;
        ensure!(v["spec"]["routingKey"] == "k2" && v["status"]["forkCount"] == 2, "{v}");
        ensure!(main.metadata.generation == Some(2));

        let mut stale = patched.clone();
        stale.status.get_or_insert_with(Default::default).fork_count = 5;
        let err = sandboxes
            .replace_status("s1", &PostParams::default(), &stale)
            .await
            .expect_err("a stale status replace");
        ensure!(api_error(err)?.0 == 409);
        let stored = api
            .get("redirect.dev/v1alpha1", "Sandbox", "default", "s1")
            .context("s1")?;
        ensure!(stored["status"]["forkCount"] == 2);
        let requests = api.requests();
        ensure!(
            requests
                .iter()
                .any(|r| r.method == "PATCH" && r.path == "/apis/redirect.dev/v1alpha1/namespaces/default/sandboxes/s1/status"),
            "{requests:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn replace_with_a_stale_resource_version_conflicts() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let original = pods
            .create(&PostParams::default(), &pod("p", "n1", &[]))
            .await?;
        let mut newer = original.clone();
        newer.labels_mut().insert("v".into(), "2".into());
        let replaced = pods.replace("p", &PostParams::default(), &newer).await?;
        ensure!(replaced.labels().get("v").map(String::as_str) == Some("2"));

        let mut stale = original;
        stale.labels_mut().insert("v".into(), "3".into());
        let (code, reason, message) = api_error(
            pods.replace("p", &PostParams::default(), &stale)
                .await
                .expect_err("stale"),
        )?;
        ensure!(
            (code, reason.as_str()) == (409, "Conflict"),
            "{code} {reason}"
        );
        ensure!(
            message.contains("the object has been modified"),
            "{message}"
        );

        // Custom resources need a resourceVersion to be replaced at all.
        let sandboxes: Api<Sandbox> = Api::namespaced(client(&api)?, "default");
        sandboxes
            .create(&PostParams::default(), &sandbox("s", "k"))
            .await?;
        let err = sandboxes
            .replace("s", &PostParams::default(), &sandbox("s", "k2"))
            .await
            .expect_err("no resourceVersion");
        ensure!(api_error(err)?.0 == 422);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn lease_create_twice_and_stale_replace_conflict() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let leases: Api<Lease> = Api::namespaced(client(&api)?, "kube-node-lease");
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "redirect-controller"},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
        }))?;
        let first = leases.create(&PostParams::default(), &lease).await?;
        let err = leases
            .create(&PostParams::default(), &lease)
            .await
            .expect_err("exists");
        ensure!(api_error(err)?.1 == "AlreadyExists");

        let mut renewed = first.clone();
        renewed
            .spec
            .get_or_insert_with(Default::default)
            .holder_identity = Some("b".into());
        let renewed = leases
            .replace("redirect-controller", &PostParams::default(), &renewed)
            .await?;
        ensure!(renewed.spec.and_then(|s| s.holder_identity).as_deref() == Some("b"));

        let mut late = first;
        late.spec
            .get_or_insert_with(Default::default)
            .holder_identity = Some("c".into());
        let err = leases
            .replace("redirect-controller", &PostParams::default(), &late)
            .await
            .expect_err("taken over meanwhile");
        ensure!(api_error(err)?.0 == 409);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn server_side_apply_creates_then_merges() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let params = PatchParams::apply("redirect-test").force();
        let first = pods
            .patch(
                "ssa",
                &params,
                &Patch::Apply(pod_json("ssa", "n1", &[("a", "1")])),
            )
            .await?;
        ensure!(first.metadata.generation == Some(1) && first.uid().is_some());
        let second = pods
            .patch(
                "ssa",
                &params,
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "ssa", "labels": {"b": "2"}},
                })),
            )
            .await?;
        let labels: Vec<(&str, &str)> = second
            .labels()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        ensure!(labels == [("a", "1"), ("b", "2")], "{labels:?}");
        ensure!(second.uid() == first.uid());
        ensure!(second.spec.and_then(|s| s.node_name).as_deref() == Some("n1"));
        let patches: Vec<RequestRecord> = api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect();
        ensure!(patches.len() == 2);
        ensure!(
            patches
                .iter()
                .all(|r| r.param("fieldManager") == Some("redirect-test")
                    && r.param("force") == Some("true"))
        );

        let generated: Pod = serde_json::from_value(json!({
            "metadata": {"generateName": "fork-"},
            "spec": {"containers": []},
        }))?;
        let created = pods.create(&PostParams::default(), &generated).await?;
        ensure!(created.name_any().starts_with("fork-") && created.name_any().len() == 10);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn deleting_an_owner_deletes_its_dependents() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let sandboxes: Api<Sandbox> = Api::namespaced(client(&api)?, "default");
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");
        let owner = sandboxes
            .create(&PostParams::default(), &sandbox("s", "k"))
            .await?;
        let uid = owner.uid().context("uid")?;
        let mut owned = pod_json("fork", "n1", &[]);
        owned["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox", "name": "s", "uid": uid,
        }]);
        pods.create(&PostParams::default(), &serde_json::from_value(owned)?)
            .await?;
        pods.create(&PostParams::default(), &pod("bystander", "n1", &[]))
            .await?;

        let answer = sandboxes.delete("s", &DeleteParams::default()).await?;
        let status = answer.right().context("a Status for an immediate delete")?;
        ensure!(status.details.map(|d| d.uid) == Some(uid.clone()));
        ensure!(names(pods.list(&ListParams::default()).await?) == ["bystander"]);
        let (code, ..) = api_error(
            sandboxes
                .delete("s", &DeleteParams::default())
                .await
                .expect_err("gone"),
        )?;
        ensure!(code == 404);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn injected_failures_answer_their_status() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        api.apply_json(pod_json("p", "n1", &[]))?;
        let pods: Api<Pod> = Api::namespaced(client(&api)?, "default");

        api.fail_next(1, 500);
        let (code, reason, _) = api_error(pods.get("p").await.expect_err("injected"))?;
        ensure!((code, reason.as_str()) == (500, "InternalError"));
        ensure!(pods.get("p").await.is_ok(), "only the next request fails");

        // kube-client retries 503 by itself.
        api.clear_requests();
        api.fail_next(2, 503);
        pods.get("p").await?;
        let statuses: Vec<u16> = api.requests().iter().map(|r| r.status).collect();
        ensure!(statuses == [503, 503, 200], "{statuses:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn custom_resources_answer_404_until_the_crds_are_installed() -> Result<()> {
    bounded(async {
        let api = ApiServer::start_with(Options {
            crds_installed: false,
            ..Options::default()
        })?;
        let client = client(&api)?;
        let sandboxes: Api<Sandbox> = Api::namespaced(client.clone(), "default");
        let err = sandboxes
            .list(&ListParams::default())
            .await
            .expect_err("no CRD");
        ensure!(api_error(err)?.0 == 404);
        let discovery = kube::Discovery::new(client.clone()).run().await?;
        ensure!(!discovery.has_group("redirect.dev"));
        ensure!(discovery.has_group("coordination.k8s.io") && discovery.has_group(""));

        api.install_crds();
        ensure!(
            sandboxes
                .list(&ListParams::default())
                .await?
                .items
                .is_empty()
        );
        let discovery = kube::Discovery::new(client).run().await?;
        let group = discovery
            .get("redirect.dev")
            .context("redirect.dev discovered")?;
        let (resource, caps) = group
            .recommended_resources()
            .into_iter()
            .find(|(r, _)| r.kind == "Sandbox")
            .context("Sandbox discovered")?;
        ensure!(resource.plural == "sandboxes" && resource.version == "v1alpha1");
        ensure!(
            caps.subresources.iter().any(|(r, _)| r.plural == "status"),
            "{caps:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn written_kubeconfig_connects_a_client() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        api.apply_json(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}),
        )?;
        let path =
            std::env::temp_dir().join(format!("standin-kubeconfig-{}.yaml", std::process::id()));
        api.write_kubeconfig(&path)?;
        let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
        std::fs::remove_file(&path)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        ensure!(config.default_namespace == "default");
        let namespaces: Api<Namespace> = Api::all(Client::try_from(config)?);
        let ns = namespaces.get("team-a").await?;
        ensure!(ns.metadata.namespace.is_none(), "cluster-scoped");
        Ok(())
    })
    .await
}

/// One HTTP/1.1 request on its own connection; the status and the (de-chunked) body.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> Result<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let (content_type, body) = body.unwrap_or(("application/json", ""));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: standin\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    let (head, mut rest) = answer.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.split(' ').nth(1).context("no status")?.parse()?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, rest.to_string()));
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("truncated chunk")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok((status, body));
        }
        body.push_str(after.get(..size).context("short chunk")?);
        rest = after.get(size + 2..).context("short chunk")?;
    }
}

#[tokio::test]
async fn watch_from_a_compacted_version_is_one_expired_error_event() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        api.apply_json(pod_json("a", "n1", &[]))?;
        api.apply_json(pod_json("b", "n1", &[]))?;
        api.compact();
        let (status, body) = raw(
            api.addr(),
            "GET",
            "/api/v1/namespaces/default/pods?watch=1&resourceVersion=2",
            None,
        )
        .await?;
        ensure!(status == 200);
        let lines: Vec<&str> = body.lines().collect();
        ensure!(lines.len() == 1, "{body}");
        let event: Value = serde_json::from_str(lines[0])?;
        ensure!(event["type"] == "ERROR");
        let s = &event["object"];
        ensure!(
            s["kind"] == "Status" && s["code"] == 410 && s["reason"] == "Expired",
            "{s}"
        );
        ensure!(s["message"] == "too old resource version: 2 (3)", "{s}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn watch_from_zero_starts_with_synthetic_adds_and_ends_at_its_timeout() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        api.apply_json(pod_json("a", "n1", &[]))?;
        api.apply_json(pod_json("b", "n2", &[]))?;
        let started = Instant::now();
        let (status, body) = raw(
            api.addr(),
            "GET",
            "/api/v1/pods?watch=true&resourceVersion=0&timeoutSeconds=1&fieldSelector=spec.nodeName%3Dn2",
            None,
        )
        .await?;
        ensure!(status == 200);
        ensure!(started.elapsed() >= Duration::from_millis(900), "ended early");
        let events: Vec<Value> = body.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        ensure!(events.len() == 1, "{body}");
        ensure!(events[0]["type"] == "ADDED" && events[0]["object"]["metadata"]["name"] == "b");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn malformed_requests_answer_a_status() -> Result<()> {
    bounded(async {
        let api = ApiServer::start()?;
        let check = |(code, body): (u16, String), want: u16, reason: &str| -> Result<()> {
            let s: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
            ensure!(
                code == want && s["code"] == want && s["reason"] == reason,
                "{code} {s}"
            );
            ensure!(s["kind"] == "Status" && s["status"] == "Failure", "{s}");
            Ok(())
        };
        let pods = "/api/v1/namespaces/default/pods";
        check(
            raw(
                api.addr(),
                "POST",
                pods,
                Some(("application/json", "{not json")),
            )
            .await?,
            400,
            "BadRequest",
        )?;
        check(
            raw(api.addr(), "POST", pods, Some(("application/json", "[1]"))).await?,
            400,
            "BadRequest",
        )?;
        check(
            raw(
                api.addr(),
                "POST",
                pods,
                Some(("application/json", "{\"kind\":\"Service\"}")),
            )
            .await?,
            400,
            "BadRequest",
        )?;
        check(
            raw(
                api.addr(),
                "POST",
                pods,
                Some(("application/json", "{\"metadata\":{}}")),
            )
            .await?,
            422,
            "Invalid",
        )?;
        check(
            raw(api.addr(), "POST", pods, Some(("text/plain", "x"))).await?,
            415,
            "UnsupportedMediaType",
        )?;
        check(
            raw(
                api.addr(),
                "PATCH",
                &format!("{pods}/x"),
                Some(("application/json-patch+json", "[]")),
            )
            .await?,
            415,
            "UnsupportedMediaType",
        )?;
        check(
            raw(
                api.addr(),
                "GET",
                "/api/v1/namespaces/default/endpoints",
                None,
            )
            .await?,
            404,
            "NotFound",
        )?;
        check(
            raw(api.addr(), "GET", &format!("{pods}/missing"), None).await?,
            404,
            "NotFound",
        )?;
        check(
            raw(
                api.addr(),
                "POST",
                "/api/v1/pods",
                Some(("application/json", "{}")),
            )
            .await?,
            405,
            "MethodNotAllowed",
        )?;
        check(
            raw(
                api.addr(),
                "GET",
                &format!("{pods}?watch=1&resourceVersion=99"),
                None,
            )
            .await?,
            504,
            "Timeout",
        )?;
        check(
            raw(api.addr(), "GET", &format!("{pods}?limit=x"), None).await?,
            400,
            "BadRequest",
        )?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn kube_standin_binary_serves_loaded_manifests() -> Result<()> {
    bounded(async {
        let dir: PathBuf = std::env::temp_dir().join(format!("standin-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("pods.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: default}\nspec: {nodeName: n1, containers: []}\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p2}\n  spec: {nodeName: n2, containers: []}\n",
        )?;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kube-standin"))
            .args(["--listen", "127.0.0.1:0", "--threads", "1", "--load"])
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await??;
        let result = async {
            let url = line.trim().strip_prefix("listening on ").with_context(|| line.clone())?;
            let pods: Api<Pod> = Api::all(Client::try_from(kube::Config::new(url.parse()?))?);
            ensure!(names(pods.list(&ListParams::default()).await?) == ["p1", "p2"]);
            Ok(())
        }
        .await;
        child.kill()?;
        child.wait()?;
        std::fs::remove_dir_all(&dir)?;
        result?;

        let help = std::process::Command::new(env!("CARGO_BIN_EXE_kube-standin"))
            .arg("--help")
            .output()?;
        let help = String::from_utf8(help.stdout)?;
        for flag in ["--listen", "--load", "--kubeconfig", "--bookmark-ms", "--no-crds", "KUBE_STANDIN_LISTEN"] {
            ensure!(help.contains(flag), "--help lacks {flag}: {help}");
        }
        Ok(())
    })
    .await
}
