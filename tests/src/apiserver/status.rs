//! Failures as `meta/v1` `Status` objects, with the reasons and codes of the real server.

use serde_json::{Value, json};

use super::resources::Resource;

/// A failed request: becomes `{"kind":"Status","status":"Failure",..}` with HTTP `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, `Expired`...
    pub reason: &'static str,
    pub message: String,
    /// `details` (name, group, kind) when the failure is about one object.
    details: Option<(String, &'static str, &'static str)>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} {})", self.message, self.code, self.reason)
    }
}

impl std::error::Error for ApiError {}

/// The reason the real server gives with a bare HTTP status.
pub(crate) fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, r: &Resource, name: &str) -> ApiError {
        self.details = Some((name.to_string(), r.group, r.plural));
        self
    }

    /// `code` with its usual reason (for injected failures).
    pub(crate) fn with_code(code: u16) -> ApiError {
        ApiError::new(code, reason_for(code), format!("injected failure {code}"))
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub(crate) fn invalid(r: &Resource, name: &str, message: impl Into<String>) -> ApiError {
        let message = format!("{} {name:?} is invalid: {}", r.kind, message.into());
        ApiError::new(422, "Invalid", message).about(r, name)
    }

    /// Unknown path, or a resource that is not served (a CRD not installed).
    pub(crate) fn no_route() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub(crate) fn not_found(r: &Resource, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", qualified(r)),
        )
        .about(r, name)
    }

    pub(crate) fn already_exists(r: &Resource, name: &str) -> ApiError {
        let message = format!("{} {name:?} already exists", qualified(r));
        ApiError::new(409, "AlreadyExists", message).about(r, name)
    }

    /// A stale `resourceVersion` on a write.
    pub(crate) fn conflict(r: &Resource, name: &str) -> ApiError {
        let message = format!(
            "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
            qualified(r)
        );
        ApiError::new(409, "Conflict", message).about(r, name)
    }

    /// A failed delete precondition.
    pub(crate) fn precondition(r: &Resource, name: &str, message: String) -> ApiError {
        let message = format!(
            "Operation cannot be fulfilled on {} {name:?}: {message}",
            qualified(r)
        );
        ApiError::new(409, "Conflict", message).about(r, name)
    }

    /// A watch or list from a version older than the history kept.
    pub(crate) fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub(crate) fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// The `Status` object.
    pub(crate) fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, group, kind)) = &self.details {
            status["details"] = json!({"name": name, "group": group, "kind": kind});
        }
        status
    }
}

/// `pods` or `sandboxes.redirect.dev`, as the real server names a resource in messages.
fn qualified(r: &Resource) -> String {
    if r.group.is_empty() {
        r.plural.to_string()
    } else {
        format!("{}.{}", r.plural, r.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::{RESOURCES, by_plural};

    #[test]
    fn conflict_status_names_the_object_like_the_real_server() {
        let r = &RESOURCES[by_plural("redirect.dev", "v1alpha1", "sandboxes").unwrap()];
        let s = ApiError::conflict(r, "a").to_status();
        assert_eq!(s["code"], 409);
        assert_eq!(s["reason"], "Conflict");
        assert_eq!(s["status"], "Failure");
        assert_eq!(s["details"]["kind"], "sandboxes");
        assert!(
            s["message"]
                .as_str()
                .unwrap()
                .starts_with("Operation cannot be fulfilled on sandboxes.redirect.dev \"a\"")
        );
    }
}
