//! What a routing key may look like: one rule for sandboxes, route groups and requests.

/// Longest routing key.
pub const MAX_ROUTING_KEY_LEN: usize = 128;

/// A routing key that breaks the rule, and which part of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid routing key {key:?}: {reason}")]
pub struct InvalidRoutingKey {
    pub key: String,
    pub reason: &'static str,
}

/// Checks a routing key: 1..=128 characters of `[A-Za-z0-9._~-]`.
pub fn validate_routing_key(key: &str) -> Result<(), InvalidRoutingKey> {
    let reason = if key.is_empty() {
        "it is empty"
    } else if key.len() > MAX_ROUTING_KEY_LEN {
        "it is longer than 128 characters"
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
    {
        "only A-Z a-z 0-9 . _ ~ - are allowed"
    } else {
        return Ok(());
    };
    Err(InvalidRoutingKey {
        key: key.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_and_url_safe() {
        assert!(validate_routing_key("feature-x.v2_~").is_ok());
        assert_eq!(validate_routing_key("").unwrap_err().reason, "it is empty");
        assert!(validate_routing_key(&"a".repeat(129)).is_err());
        assert!(validate_routing_key(&"a".repeat(128)).is_ok());
        assert!(validate_routing_key("feat/x").is_err());
    }
}
