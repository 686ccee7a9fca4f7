//! A scripted Kubernetes API for unit tests (tower-test): the code under test talks to a real
//! `kube::Client`; the test takes each request in turn, checks it and answers it.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

/// The API side of a mocked client.
pub struct ApiMock {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request, waiting for its answer.
pub struct Call {
    pub method: String,
    /// Path and query, e.g. `/apis/redirect.dev/v1alpha1/namespaces/shop/sandboxes/sb/status`.
    pub uri: String,
    pub content_type: Option<String>,
    /// The JSON body (Null when empty).
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl ApiMock {
    /// A client whose requests this mock answers.
    pub fn new() -> (kube::Client, ApiMock) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (kube::Client::new(service, "default"), ApiMock { handle })
    }

    /// The next request (panics when none arrives within 5 s).
    pub async fn next(&mut self) -> Call {
        self.try_next(Duration::from_secs(5))
            .await
            .expect("no request within 5 s")
    }

    /// The next request, if one arrives within `wait` (None as well when the client is gone).
    pub async fn try_next(&mut self, wait: Duration) -> Option<Call> {
        let (request, send) = tokio::time::timeout(wait, self.handle.next_request())
            .await
            .ok()??;
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Some(Call {
            method,
            uri,
            content_type,
            body,
            send,
        })
    }

    /// The next request, which must be `method` on `uri` (path and query).
    pub async fn expect(&mut self, method: &str, uri: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (call.method.as_str(), call.uri.as_str()),
            (method, uri),
            "unexpected request; body: {}",
            call.body
        );
        call
    }

    /// No request arrives within `wait`.
    pub async fn expect_none(&mut self, wait: Duration) {
        if let Ok(Some((request, _))) = tokio::time::timeout(wait, self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

impl Call {
    /// Answers with `status` and `body`.
    pub fn reply(self, status: u16, body: Value) {
        let mut response = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        self.send.send_response(response);
    }

    /// Answers 200 with `body`.
    pub fn ok(self, body: Value) {
        self.reply(200, body);
    }

    /// Answers 200 with the request's own body (what a create or replace returns), with
    /// `metadata.resourceVersion` set to `resource_version`.
    pub fn echo(self, resource_version: &str) {
        let mut body = self.body.clone();
        body["metadata"]["resourceVersion"] = json!(resource_version);
        self.reply(200, body);
    }

    /// Answers with a `Status` failure.
    pub fn fail(self, code: u16, reason: &str) {
        self.reply(
            code,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("{reason} (mock)"), "reason": reason, "code": code}),
        );
    }
}
