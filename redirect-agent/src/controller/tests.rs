use clap::{CommandFactory, Parser};
use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{ApiMock, Call};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ControllerArgs,
}

#[test]
fn every_flag_has_an_environment_twin_and_help() {
    let cmd = Cli::command();
    for arg in cmd.get_arguments() {
        if arg.get_id() == "help" {
            continue;
        }
        assert!(
            arg.get_env().is_some(),
            "--{} has no env twin",
            arg.get_id()
        );
        assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
    }
}

#[test]
fn flags_default_to_a_15s_lease_and_the_admin_port_9968() {
    let cli = Cli::try_parse_from(["controller"]).unwrap();
    let args = cli.args;
    assert_eq!(args.lease_duration, Duration::from_secs(15));
    assert_eq!(args.resync_interval, Duration::from_secs(300));
    assert_eq!(args.requeue, Duration::from_secs(1));
    assert_eq!(args.admin_addr, "0.0.0.0:9968".parse().unwrap());
    let cli = Cli::try_parse_from([
        "controller",
        "--lease-duration",
        "1m30s",
        "--identity",
        "controller-1",
        "--namespace",
        "ops",
    ])
    .unwrap();
    assert_eq!(cli.args.lease_duration, Duration::from_secs(90));
    assert_eq!(cli.args.identity(), "controller-1");
    assert_eq!(cli.args.namespace, "ops");
}

#[test]
fn durations_must_be_positive_go_durations_and_a_lease_at_least_3s() {
    for bad in ["0s", "-1s", "5", "soon"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    assert!(Cli::try_parse_from(["controller", "--lease-duration", "2s"]).is_err());
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
}

#[test]
fn without_an_identity_the_hostname_names_the_replica() {
    let args = ControllerArgs {
        identity: Some("  ".into()),
        ..ControllerArgs::default()
    };
    assert!(!args.identity().trim().is_empty());
}

#[test]
fn retries_back_off_doubling_up_to_the_resync_interval() {
    let base = Duration::from_secs(1);
    let cap = Duration::from_secs(60);
    let delays: Vec<u64> = (1..=8).map(|n| backoff(base, n, cap).as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(backoff(base, 1000, cap), cap);
}

#[test]
fn error_labels_are_bounded() {
    let e = ControllerError::NotLeader;
    assert_eq!(e.metric_label(), "not_leader");
    for a in [
        WriteAction::PatchStatus,
        WriteAction::DeleteExpired,
        WriteAction::CreateSlice,
        WriteAction::ReplaceSlice,
        WriteAction::DeleteSlice,
        WriteAction::PublishEvent,
    ] {
        assert!(!a.metric_label().is_empty() && !a.to_string().is_empty());
    }
}

/// A list answer for `kind` holding `items`.
fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"kind": format!("{kind}List"), "apiVersion": "v1",
           "metadata": {"resourceVersion": "1"}, "items": items})
}

/// Answers a running controller: lists (one Sandbox), watches held open, the Lease, status
/// patches and events. Returns the status patches and Lease writes seen, in order.
async fn api_server(mut api: ApiMock, shutdown: tokio::sync::oneshot::Sender<()>) -> Vec<String> {
    let mut held: Vec<Call> = Vec::new();
    let mut seen = Vec::new();
    let mut shutdown = Some(shutdown);
    while let Some(call) = api.try_next(Duration::from_secs(10)).await {
        let path = call.uri.split('?').next().unwrap_or("").to_string();
        if call.uri.contains("watch=true") {
            held.push(call); // an open watch with nothing to say
            continue;
        }
        match (call.method.as_str(), path.as_str()) {
            ("GET", "/apis/redirect.dev/v1alpha1/sandboxes") => call.ok(list(
                "Sandbox",
                vec![
                    json!({"apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
                            "metadata": {"name": "sb", "namespace": "shop", "uid": "u1",
                                         "resourceVersion": "3", "generation": 1},
                            "spec": {"routingKey": "feature-x"}}),
                ],
            )),
            ("GET", "/apis/redirect.dev/v1alpha1/routegroups") => {
                call.ok(list("RouteGroup", vec![]))
            }
            ("GET", "/api/v1/services") => call.ok(list("Service", vec![])),
            ("GET", "/api/v1/pods") => call.ok(list("Pod", vec![])),
            ("GET", "/apis/discovery.k8s.io/v1/endpointslices") => {
                assert!(
                    call.uri.contains("labelSelector=endpointslice.kubernetes.io%2Fmanaged-by%3Dcontroller.redirect.dev"),
                    "{}",
                    call.uri
                );
                call.ok(list("EndpointSlice", vec![]))
            }
            ("GET", "/apis/coordination.k8s.io/v1/namespaces/ops/leases/redirect-controller") => {
                call.fail(404, "NotFound")
            }
            ("POST", "/apis/coordination.k8s.io/v1/namespaces/ops/leases") => {
                seen.push(format!(
                    "lease holder={}",
                    call.body["spec"]["holderIdentity"]
                ));
                call.echo("1")
            }
            ("PUT", "/apis/coordination.k8s.io/v1/namespaces/ops/leases/redirect-controller") => {
                // Renewals (every second) are not recorded: only the release.
                let released = call.body["spec"]["holderIdentity"].is_null();
                if released {
                    seen.push("lease released".to_string());
                }
                call.echo("2");
                if released {
                    break;
                }
            }
            ("PATCH", "/apis/redirect.dev/v1alpha1/namespaces/shop/sandboxes/sb/status") => {
                let ready = call.body["status"]["conditions"][1]["status"].clone();
                seen.push(format!("status ready={ready}"));
                call.ok(json!({}));
            }
            ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events") => {
                seen.push(format!("event {}", call.body["reason"]));
                call.reply(201, json!({}));
                // Everything a first pass does is done: stop the controller.
                if let Some(s) = shutdown.take() {
                    let _ = s.send(());
                }
            }
            _ => panic!("unexpected request {} {}", call.method, call.uri),
        }
    }
    drop(held);
    seen
}

#[tokio::test]
async fn a_controller_elects_itself_reconciles_and_releases_the_lease_on_shutdown() {
    let (client, api) = ApiMock::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(api_server(api, tx));
    let args = ControllerArgs {
        namespace: "ops".into(),
        identity: Some("controller-0".into()),
        lease_duration: Duration::from_secs(3),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        ..ControllerArgs::default()
    };
    tokio::time::timeout(
        Duration::from_secs(20),
        run(args, client, async {
            let _ = rx.await;
        }),
    )
    .await
    .expect("the controller stops on shutdown")
    .unwrap();
    let seen = server.await.unwrap();
    assert_eq!(
        seen,
        [
            "lease holder=\"controller-0\"",
            "status ready=\"True\"",
            "event \"Ready\"",
            "lease released",
        ]
    );
}

#[tokio::test]
async fn an_admin_address_in_use_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, _api) = ApiMock::new();
    let args = ControllerArgs {
        admin_addr: taken.local_addr().unwrap(),
        ..ControllerArgs::default()
    };
    let err = run(args, client, async {}).await.unwrap_err();
    assert_eq!(err.metric_label(), "admin_bind");
}
