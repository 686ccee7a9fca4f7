//! How the router chooses the protocol of a connection: from what the Service port declares,
//! and from the first bytes only when it declares nothing the router can use.
//!
//! Detection alone misreads HTTP clients that are legal but unusual (a pre-warmed connection
//! whose first request comes after the detection timeout, a leading CRLF, a lowercase method)
//! and sends them down the opaque path, where their routing key is ignored. A port that says it
//! speaks HTTP is served as HTTP whatever its first bytes look like.

use serde::{Deserialize, Serialize};

/// What a forked service port declares about its protocol, as far as the router cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortProtocol {
    /// Nothing usable is declared: the first bytes decide (HTTP/1, HTTP/2 or opaque).
    #[default]
    Detect,
    /// HTTP/1.1, h2c, gRPC or WebSocket: every connection is served as HTTP and never as
    /// opaque; the router waits for the first request up to the header timeout.
    Http,
}

/// `appProtocol` values that mean HTTP on the wire (cleartext): the Kubernetes standard names
/// and the IANA/Istio names. Compared without case.
const HTTP_APP_PROTOCOLS: [&str; 7] = [
    "http",
    "http2",
    "h2c",
    "grpc",
    "grpc-web",
    "kubernetes.io/h2c",
    "kubernetes.io/ws",
];

/// `appProtocol` values that name a protocol that is not cleartext HTTP (TLS carries its own
/// protocol inside, which the router cannot see): they decide the port, the name is not looked
/// at. Any other value is unknown and leaves the decision to the port name.
const OTHER_APP_PROTOCOLS: [&str; 11] = [
    "https",
    "tls",
    "kubernetes.io/tls",
    "kubernetes.io/wss",
    "tcp",
    "udp",
    "mongo",
    "mysql",
    "redis",
    "postgres",
    "postgresql",
];

/// Port-name prefixes that declare HTTP, Istio's convention: `<protocol>` or
/// `<protocol>-<suffix>` (`http`, `http-api`, `grpc-web`, `h2c-internal`).
const HTTP_NAME_PROTOCOLS: [&str; 4] = ["http", "http2", "grpc", "h2c"];

impl PortProtocol {
    /// The protocol a Service port declares: its `appProtocol` when it names a known
    /// protocol, else its name's convention, else nothing (detection).
    pub fn declared(app_protocol: Option<&str>, port_name: Option<&str>) -> PortProtocol {
        if let Some(p) = app_protocol.map(str::trim).filter(|p| !p.is_empty()) {
            if HTTP_APP_PROTOCOLS.iter().any(|h| h.eq_ignore_ascii_case(p)) {
                return PortProtocol::Http;
            }
            if OTHER_APP_PROTOCOLS
                .iter()
                .any(|o| o.eq_ignore_ascii_case(p))
            {
                return PortProtocol::Detect;
            }
        }
        let Some(name) = port_name else {
            return PortProtocol::Detect;
        };
        let protocol = name.split_once('-').map_or(name, |(p, _)| p);
        if HTTP_NAME_PROTOCOLS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(protocol))
        {
            PortProtocol::Http
        } else {
            PortProtocol::Detect
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            PortProtocol::Detect => "detect",
            PortProtocol::Http => "http",
        }
    }
}

impl std::fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PortProtocol::*;

    fn by_app(app: &str) -> PortProtocol {
        PortProtocol::declared(Some(app), None)
    }

    fn by_name(name: &str) -> PortProtocol {
        PortProtocol::declared(None, Some(name))
    }

    #[test]
    fn http_app_protocols_declare_http() {
        for app in [
            "http",
            "HTTP",
            "kubernetes.io/h2c",
            "grpc",
            "kubernetes.io/ws",
            "http2",
            "h2c",
        ] {
            assert_eq!(by_app(app), Http, "{app}");
        }
    }

    #[test]
    fn tls_and_unknown_app_protocols_do_not_declare_http() {
        for app in [
            "https",
            "kubernetes.io/tls",
            "kubernetes.io/wss",
            "tcp",
            "mysql",
            "example.com/custom",
            "",
        ] {
            assert_eq!(by_app(app), Detect, "{app}");
        }
    }

    #[test]
    fn http_port_names_declare_http() {
        for name in [
            "http", "http-api", "grpc", "grpc-web", "h2c", "http2", "http2-x",
        ] {
            assert_eq!(by_name(name), Http, "{name}");
        }
    }

    #[test]
    fn other_port_names_do_not_declare_http() {
        for name in [
            "https",
            "https-api",
            "httpx",
            "web",
            "tcp-http",
            "grpcs",
            "tls",
            "8080",
            "",
        ] {
            assert_eq!(by_name(name), Detect, "{name}");
        }
        assert_eq!(PortProtocol::declared(None, None), Detect);
    }

    #[test]
    fn a_known_app_protocol_wins_over_the_port_name() {
        assert_eq!(PortProtocol::declared(Some("https"), Some("http")), Detect);
        assert_eq!(PortProtocol::declared(Some("tcp"), Some("grpc")), Detect);
        assert_eq!(PortProtocol::declared(Some("http"), Some("db")), Http);
    }

    #[test]
    fn an_unknown_app_protocol_leaves_the_port_name_to_decide() {
        assert_eq!(
            PortProtocol::declared(Some("example.com/rpc"), Some("http-api")),
            Http
        );
        assert_eq!(
            PortProtocol::declared(Some("example.com/rpc"), Some("db")),
            Detect
        );
    }
}
