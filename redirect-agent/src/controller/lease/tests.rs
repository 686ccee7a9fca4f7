use serde_json::json;

use super::*;
use crate::controller::mock::ApiMock;

const LEASE_URI: &str = "/apis/coordination.k8s.io/v1/namespaces/redirect-system/leases";

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: LEASE_NAME.into(),
        namespace: "redirect-system".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
    }
}

fn lease(holder: Option<&str>, renewed: &str, transitions: i32) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": LEASE_NAME, "namespace": "redirect-system", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2025-06-01T11:00:00.000000Z",
            "renewTime": renewed,
            "leaseTransitions": transitions
        }
    }))
    .unwrap()
}

fn spec(l: &Lease) -> &LeaseSpec {
    l.spec.as_ref().unwrap()
}

#[test]
fn a_missing_lease_is_created_held_by_us() {
    let now = at("2025-06-01T12:00:00Z");
    assert_eq!(decide(None, "a", now), Decision::Create);
    let l = next_lease(None, &Decision::Create, &config("a"), now).unwrap();
    let s = spec(&l);
    assert_eq!(s.holder_identity.as_deref(), Some("a"));
    assert_eq!(s.lease_duration_seconds, Some(15));
    assert_eq!(s.lease_transitions, Some(0));
    assert_eq!(s.acquire_time, Some(MicroTime(now)));
    assert_eq!(s.renew_time, Some(MicroTime(now)));
    assert_eq!(l.metadata.namespace.as_deref(), Some("redirect-system"));
}

#[test]
fn a_lease_renewed_in_time_by_another_replica_is_left_alone() {
    let held = lease(Some("b"), "2025-06-01T11:59:50.000000Z", 2);
    let now = at("2025-06-01T12:00:00Z");
    assert_eq!(
        decide(Some(&held), "a", now),
        Decision::Standby {
            holder: "b".into(),
            until: at("2025-06-01T12:00:05Z")
        }
    );
    assert_eq!(
        next_lease(
            Some(&held),
            &decide(Some(&held), "a", now),
            &config("a"),
            now
        ),
        None
    );
}

#[test]
fn an_expired_lease_is_taken_over_and_the_transition_counted() {
    let held = lease(Some("b"), "2025-06-01T11:59:40.000000Z", 2);
    let now = at("2025-06-01T12:00:00Z");
    let d = decide(Some(&held), "a", now);
    assert_eq!(
        d,
        Decision::TakeOver {
            previous: Some("b".into())
        }
    );
    let l = next_lease(Some(&held), &d, &config("a"), now).unwrap();
    assert_eq!(spec(&l).holder_identity.as_deref(), Some("a"));
    assert_eq!(spec(&l).lease_transitions, Some(3));
    assert_eq!(spec(&l).acquire_time, Some(MicroTime(now)));
    assert_eq!(
        l.metadata.resource_version.as_deref(),
        Some("7"),
        "written against the version read"
    );
}

#[test]
fn a_lease_expiring_exactly_now_is_free() {
    let held = lease(Some("b"), "2025-06-01T11:59:45.000000Z", 0);
    assert!(matches!(
        decide(Some(&held), "a", at("2025-06-01T12:00:00Z")),
        Decision::TakeOver { .. }
    ));
}

#[test]
fn a_released_lease_is_free_at_once() {
    let now = at("2025-06-01T12:00:00Z");
    let mine = lease(Some("b"), "2025-06-01T11:59:59.000000Z", 4);
    let given_up = released(&mine, now);
    assert_eq!(spec(&given_up).holder_identity, None);
    assert_eq!(spec(&given_up).lease_duration_seconds, Some(1));
    assert_eq!(
        decide(Some(&given_up), "a", now),
        Decision::TakeOver { previous: None }
    );
    let mut empty = mine.clone();
    empty.spec.as_mut().unwrap().holder_identity = Some(String::new());
    assert_eq!(
        decide(Some(&empty), "a", now),
        Decision::TakeOver { previous: None }
    );
    let taken = next_lease(
        Some(&given_up),
        &Decision::TakeOver { previous: None },
        &config("a"),
        now,
    )
    .unwrap();
    assert_eq!(spec(&taken).lease_transitions, Some(5));
}

#[test]
fn our_own_lease_is_renewed_keeping_acquisition_and_transitions() {
    let mine = lease(Some("a"), "2025-06-01T11:59:55.000000Z", 4);
    let now = at("2025-06-01T12:00:00Z");
    assert_eq!(decide(Some(&mine), "a", now), Decision::Renew);
    let l = next_lease(Some(&mine), &Decision::Renew, &config("a"), now).unwrap();
    assert_eq!(spec(&l).renew_time, Some(MicroTime(now)));
    assert_eq!(spec(&l).acquire_time, spec(&mine).acquire_time);
    assert_eq!(spec(&l).lease_transitions, Some(4));
    // Even an expired lease of ours is renewed: nobody took it.
    assert_eq!(
        decide(Some(&mine), "a", at("2025-06-01T13:00:00Z")),
        Decision::Renew
    );
}

#[test]
fn the_leader_renews_every_third_and_gives_up_after_two_thirds() {
    let c = config("a");
    assert_eq!(c.renew_period(), Duration::from_secs(5));
    assert_eq!(c.renew_deadline(), Duration::from_secs(10));
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_renews_it_with_one_write() {
    let (client, mut api) = ApiMock::new();
    let mut elector = Elector::new(client, config("a"));
    let now = at("2025-06-01T12:00:00Z");
    let script = tokio::spawn(async move {
        api.expect("GET", &format!("{LEASE_URI}/{LEASE_NAME}"))
            .await
            .fail(404, "NotFound");
        let create = api.expect("POST", &format!("{LEASE_URI}?")).await;
        assert_eq!(create.body["metadata"]["name"], LEASE_NAME);
        assert_eq!(
            create.body["spec"],
            json!({"holderIdentity": "a", "leaseDurationSeconds": 15, "leaseTransitions": 0,
                   "acquireTime": "2025-06-01T12:00:00.000000Z",
                   "renewTime": "2025-06-01T12:00:00.000000Z"})
        );
        create.echo("1");
        let renew = api
            .expect("PUT", &format!("{LEASE_URI}/{LEASE_NAME}?"))
            .await;
        assert_eq!(renew.body["metadata"]["resourceVersion"], "1");
        assert_eq!(
            renew.body["spec"]["renewTime"],
            "2025-06-01T12:00:05.000000Z"
        );
        assert_eq!(
            renew.body["spec"]["acquireTime"],
            "2025-06-01T12:00:00.000000Z"
        );
        renew.echo("2");
    });
    assert_eq!(elector.try_lead(now).await.unwrap(), Attempt::Leading);
    assert_eq!(
        elector.try_lead(at("2025-06-01T12:00:05Z")).await.unwrap(),
        Attempt::Leading
    );
    script.await.unwrap();
}

#[tokio::test]
async fn a_conflict_on_renewal_means_someone_else_won_and_the_next_round_reads_again() {
    let (client, mut api) = ApiMock::new();
    let mut elector = Elector::new(client, config("a"));
    let script = tokio::spawn(async move {
        api.expect("GET", &format!("{LEASE_URI}/{LEASE_NAME}"))
            .await
            .ok(serde_json::to_value(lease(Some("a"), "2025-06-01T11:59:55.000000Z", 1)).unwrap());
        api.expect("PUT", &format!("{LEASE_URI}/{LEASE_NAME}?"))
            .await
            .fail(409, "Conflict");
        // Next round: read again, and find b holding it.
        api.expect("GET", &format!("{LEASE_URI}/{LEASE_NAME}"))
            .await
            .ok(serde_json::to_value(lease(Some("b"), "2025-06-01T12:00:01.000000Z", 2)).unwrap());
    });
    assert_eq!(
        elector.try_lead(at("2025-06-01T12:00:00Z")).await.unwrap(),
        Attempt::Standby {
            holder: None,
            until: None
        }
    );
    assert_eq!(
        elector.try_lead(at("2025-06-01T12:00:02Z")).await.unwrap(),
        Attempt::Standby {
            holder: Some("b".into()),
            until: Some(at("2025-06-01T12:00:16Z"))
        }
    );
    script.await.unwrap();
}

#[tokio::test]
async fn a_replica_losing_the_race_to_create_the_lease_stands_by() {
    let (client, mut api) = ApiMock::new();
    let mut elector = Elector::new(client, config("a"));
    let script = tokio::spawn(async move {
        api.expect("GET", &format!("{LEASE_URI}/{LEASE_NAME}"))
            .await
            .fail(404, "NotFound");
        api.expect("POST", &format!("{LEASE_URI}?"))
            .await
            .fail(409, "AlreadyExists");
    });
    assert!(matches!(
        elector.try_lead(at("2025-06-01T12:00:00Z")).await.unwrap(),
        Attempt::Standby { .. }
    ));
    script.await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_the_version_read() {
    let (client, mut api) = ApiMock::new();
    let mut elector = Elector::new(client, config("a"));
    let script = tokio::spawn(async move {
        api.expect("GET", &format!("{LEASE_URI}/{LEASE_NAME}"))
            .await
            .ok(serde_json::to_value(lease(Some("b"), "2025-06-01T11:00:00.000000Z", 2)).unwrap());
        let put = api
            .expect("PUT", &format!("{LEASE_URI}/{LEASE_NAME}?"))
            .await;
        assert_eq!(put.body["metadata"]["resourceVersion"], "7");
        assert_eq!(put.body["spec"]["holderIdentity"], "a");
        assert_eq!(put.body["spec"]["leaseTransitions"], 3);
        put.echo("8");
    });
    assert_eq!(
        elector.try_lead(at("2025-06-01T12:00:00Z")).await.unwrap(),
        Attempt::Leading
    );
    script.await.unwrap();
}

#[tokio::test]
async fn a_server_error_is_an_error_and_is_not_taken_for_a_lost_race() {
    let (client, mut api) = ApiMock::new();
    let mut elector = Elector::new(client, config("a"));
    let script = tokio::spawn(async move {
        api.expect("GET", &format!("{LEASE_URI}/{LEASE_NAME}"))
            .await
            .fail(500, "InternalError");
    });
    let err = elector
        .try_lead(at("2025-06-01T12:00:00Z"))
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "lease_get");
    script.await.unwrap();
}

#[tokio::test]
async fn on_stop_the_leader_stops_leading_before_it_releases_the_lease() {
    let (client, mut api) = ApiMock::new();
    let mut cfg = config("a");
    cfg.duration = Duration::from_secs(30);
    let elector = Elector::new(client, cfg);
    let (tx, leadership) = Leadership::channel();
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(elector, tx, stop, |_| {}));
    api.expect("GET", &format!("{LEASE_URI}/{LEASE_NAME}"))
        .await
        .fail(404, "NotFound");
    api.expect("POST", &format!("{LEASE_URI}?")).await.echo("1");
    let mut watching = leadership.clone();
    while !leadership.is_leader() {
        watching.changed().await;
    }
    stop_tx.send_replace(true);
    let release = api
        .expect("PUT", &format!("{LEASE_URI}/{LEASE_NAME}?"))
        .await;
    assert!(!leadership.is_leader(), "writes stop before the release");
    assert_eq!(release.body["spec"].get("holderIdentity"), None);
    assert_eq!(release.body["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(release.body["metadata"]["resourceVersion"], "1");
    release.echo("2");
    task.await.unwrap();
}
