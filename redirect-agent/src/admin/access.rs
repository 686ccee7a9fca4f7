//! Who may use the agent's admin endpoint. It listens on loopback unless the operator allows a
//! remote address (`--admin-allow-remote`), and then needs a bearer token
//! (`--admin-token-file`): any pod that reaches the node could otherwise change the log level
//! and read every routing key. The probes and the metrics stay open, so the kubelet and a
//! Prometheus scrape need no secret.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use http::{HeaderValue, Method};

/// Longest token file read.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Endpoints that answer without a token: probes and metrics (read-only, no routing keys).
pub const PUBLIC_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "--admin-addr {addr} is not a loopback address: the admin endpoint (PUT /loglevel, \
         /tables with every routing key) would be reachable from other hosts and pods. Keep it \
         on 127.0.0.1 or [::1], or pass --admin-allow-remote with --admin-token-file"
    )]
    NotLoopback { addr: SocketAddr },
    #[error(
        "--admin-allow-remote with --admin-addr {addr} needs --admin-token-file: every endpoint \
         but /healthz, /readyz and /metrics then requires that bearer token"
    )]
    RemoteWithoutToken { addr: SocketAddr },
    #[error("--admin-token-file {}: {source}", path.display())]
    TokenUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--admin-token-file {}: {reason}", path.display())]
    TokenInvalid { path: PathBuf, reason: &'static str },
}

/// A bearer token. Its `Debug` never shows it, so it cannot reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Reads a token file (a Kubernetes Secret mounted as a file): surrounding whitespace,
    /// the trailing newline included, is not part of the token.
    pub fn from_file(path: &Path) -> Result<Token, AccessError> {
        let invalid = |reason| AccessError::TokenInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let raw = std::fs::read(path).map_err(|source| AccessError::TokenUnreadable {
            path: path.to_path_buf(),
            source,
        })?;
        if raw.len() > MAX_TOKEN_BYTES {
            return Err(invalid("larger than 4096 bytes: not a token file"));
        }
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(invalid("empty: it holds no token"));
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "holds whitespace or non-ASCII characters, which an Authorization header cannot carry",
            ));
        }
        // All ASCII, checked above.
        Ok(Token(String::from_utf8_lossy(token).into_owned()))
    }

    /// The header value a client sends.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `presented` (an `Authorization` value) carries this token. Compares in time
    /// independent of where the first difference is.
    fn accepts(&self, presented: &[u8]) -> bool {
        let Some(given) = presented
            .strip_prefix(b"Bearer ")
            .or_else(|| presented.strip_prefix(b"bearer "))
        else {
            return false;
        };
        let given = given.trim_ascii();
        let want = self.0.as_bytes();
        given.len() == want.len()
            && given
                .iter()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// The admin endpoint's access rule.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// When set, every endpoint but [`PUBLIC_PATHS`] needs it.
    token: Option<Token>,
}

impl Access {
    /// The rule for listening on `addr`: loopback needs nothing; any other address needs
    /// `allow_remote` and a token. A token given with a loopback address is required too.
    pub fn for_addr(
        addr: SocketAddr,
        allow_remote: bool,
        token: Option<Token>,
    ) -> Result<Access, AccessError> {
        if !addr.ip().to_canonical().is_loopback() {
            if !allow_remote {
                return Err(AccessError::NotLoopback { addr });
            }
            if token.is_none() {
                return Err(AccessError::RemoteWithoutToken { addr });
            }
        }
        Ok(Access { token })
    }

    /// Whether the token is required (for the startup log line).
    pub fn needs_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether a request may be served.
    pub fn allows(&self, method: &Method, path: &str, authorization: Option<&HeaderValue>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let public =
            (method == Method::GET || method == Method::HEAD) && PUBLIC_PATHS.contains(&path);
        public || authorization.is_some_and(|v| token.accepts(v.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn token(t: &str) -> Token {
        Token(t.into())
    }

    fn bearer(t: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {t}")).unwrap()
    }

    #[test]
    fn loopback_addresses_need_nothing() {
        for a in [
            "127.0.0.1:9967",
            "127.0.0.2:1",
            "[::1]:9967",
            "[::ffff:127.0.0.1]:9967",
        ] {
            let access = Access::for_addr(addr(a), false, None).unwrap();
            assert!(!access.needs_token(), "{a}");
            assert!(access.allows(&Method::PUT, "/loglevel", None), "{a}");
        }
    }

    #[test]
    fn any_other_address_is_refused_naming_it_and_the_flag_that_allows_it() {
        for a in [
            "0.0.0.0:9967",
            "10.0.0.5:9967",
            "[::]:9967",
            "[fd00::1]:9967",
        ] {
            let e = Access::for_addr(addr(a), false, Some(token("t"))).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("--admin-addr {a} is not a loopback")),
                "{text}"
            );
            assert!(text.contains("--admin-allow-remote"), "{text}");
        }
    }

    #[test]
    fn a_remote_address_needs_a_token_even_when_allowed() {
        let e = Access::for_addr(addr("0.0.0.0:9967"), true, None).unwrap_err();
        assert!(e.to_string().contains("needs --admin-token-file"), "{e}");
        let access = Access::for_addr(addr("0.0.0.0:9967"), true, Some(token("s3cret"))).unwrap();
        assert!(access.needs_token());
    }

    #[test]
    fn with_a_token_only_probes_and_metrics_are_open() {
        let access = Access::for_addr(addr("0.0.0.0:1"), true, Some(token("s3cret"))).unwrap();
        for path in PUBLIC_PATHS {
            assert!(access.allows(&Method::GET, path, None), "{path}");
            assert!(access.allows(&Method::HEAD, path, None), "{path}");
        }
        for (method, path) in [
            (Method::PUT, "/loglevel"),
            (Method::GET, "/loglevel"),
            (Method::GET, "/tables"),
            (Method::GET, "/status"),
            (Method::POST, "/metrics"),
            (Method::GET, "/nowhere"),
        ] {
            assert!(!access.allows(&method, path, None), "{method} {path}");
            assert!(
                !access.allows(&method, path, Some(&bearer("wrong"))),
                "{method} {path}"
            );
            assert!(
                !access.allows(&method, path, Some(&bearer("s3cre"))),
                "{method} {path}"
            );
            assert!(
                !access.allows(&method, path, Some(&HeaderValue::from_static("s3cret"))),
                "{method} {path}"
            );
            assert!(
                access.allows(&method, path, Some(&bearer("s3cret"))),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn a_token_file_is_trimmed_and_checked_and_its_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("redirect-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = file("good", b"  s3cret\n");
        assert_eq!(Token::from_file(&good).unwrap(), token("s3cret"));
        for (name, text, says) in [
            ("empty", &b" \n"[..], "empty"),
            ("spaced", b"two words", "whitespace"),
            ("utf8", "caf\u{e9}".as_bytes(), "non-ASCII"),
        ] {
            let p = file(name, text);
            let e = Token::from_file(&p).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--admin-token-file {}", p.display())),
                "{e}"
            );
            assert!(e.contains(says), "{e}");
        }
        let big = file("big", &[b'a'; MAX_TOKEN_BYTES + 1]);
        assert!(Token::from_file(&big).is_err());
        let missing = dir.join("missing");
        let e = Token::from_file(&missing).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let access = Access::for_addr(addr("0.0.0.0:1"), true, Some(token("s3cret"))).unwrap();
        assert!(!format!("{access:?}").contains("s3cret"));
    }
}
