//! Protocol detection on the first bytes of a redirected connection.
//!
//! The router reads the client's first bytes and decides how to handle the connection: HTTP/1.x
//! and HTTP/2 (prior knowledge) are routed per request by routing key; everything else (TLS,
//! database handshakes, any binary protocol, and protocols where the server speaks first) is
//! [`Protocol::Opaque`] and passed through to its original destination untouched.
//!
//! This applies to ports that declare no protocol. A port whose Service declares HTTP
//! (`appProtocol`, or an `http`/`grpc` port name) is read with [`detect_declared_http`], which
//! only tells HTTP/1 from HTTP/2 and never falls back to opaque.
//!
//! [`detect`] is pure and decides as early as it can:
//!
//! | first bytes | verdict | decided after |
//! |---|---|---|
//! | the HTTP/2 preface `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` | `Http2` | 24 bytes |
//! | a standard method and SP | `Http1` | the SP |
//! | another method token and SP, then `/` or `*` | `Http1` | the byte after the SP |
//! | `PRI ` then anything but the rest of the preface | `Opaque` | the first differing byte |
//! | anything else | `Opaque` | the first byte that rules out both |
//!
//! The standard methods are `GET`, `HEAD`, `POST`, `PUT`, `DELETE`, `CONNECT`, `OPTIONS`,
//! `TRACE` (RFC 9110 §9) and `PATCH` (RFC 5789). Another method token is shaped like the names
//! in the IANA method registry: an uppercase letter, then up to [`MAX_METHOD_LEN`]` - 1`
//! uppercase letters, `-` or `_` (`PROPFIND`, `MKCALENDAR`, `BASELINE-CONTROL`). Methods are
//! case-sensitive (RFC 9110 §9.1), so `get / HTTP/1.1` is not HTTP. The grammar allows any
//! `tchar` in a method, but a looser rule would take text protocols (`SET key value`,
//! `ehlo host`) for HTTP and break them, while an HTTP request taken for opaque only loses
//! per-request routing: it still reaches its original destination. That is also why an
//! extension method needs one more byte: the start of an origin-form (`/`) or asterisk-form
//! (`*`) target, the only forms a client sends to a service it connects to directly.
//!
//! A connection that starts like the HTTP/2 preface but is not it is opaque: `PRI` is reserved
//! for the preface (RFC 9113 §3.4), so no HTTP/1 server serves it and the router lets the
//! upstream answer it as it would without the router.
//!
//! Two guarantees, checked by unit tests and the `detect` fuzz target:
//! - with [`MAX_SNIFF`] bytes or more, `detect` never returns `None`;
//! - a verdict never changes when more bytes arrive: if `detect(p) == Some(x)`, then
//!   `detect(p + more) == Some(x)`. Bytes past [`MAX_SNIFF`] are never looked at.

/// How the router handles a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1 requests: routed per request.
    Http1,
    /// HTTP/2 with prior knowledge (cleartext, starts with the connection preface): routed per
    /// stream.
    Http2,
    /// Anything else: forwarded byte for byte to the original destination.
    Opaque,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token taken for an HTTP/1 method. The longest registered method,
/// `UPDATEREDIRECTREF`, has 17 characters.
pub const MAX_METHOD_LEN: usize = 20;

/// Bytes after which [`detect`] has always decided: the length of the HTTP/2 preface, which is
/// the longest thing it waits for (a method of [`MAX_METHOD_LEN`], SP and one target byte are
/// fewer). A router that reads this many bytes without a verdict has a bug.
pub const MAX_SNIFF: usize = HTTP2_PREFACE.len();

const _: () = assert!(MAX_METHOD_LEN + 2 <= MAX_SNIFF);

/// Methods taken for HTTP/1 as soon as the SP after them arrives (RFC 9110 §9 and PATCH).
const STANDARD_METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// The protocol of a connection whose first bytes are `prefix`, or `None` when more bytes are
/// needed to tell. Only the first [`MAX_SNIFF`] bytes are looked at.
pub fn detect(prefix: &[u8]) -> Option<Protocol> {
    let prefix = &prefix[..prefix.len().min(MAX_SNIFF)];
    // The preface comes first: its beginning `PRI ` also looks like a method and SP.
    match preface(prefix) {
        Preface::Whole => Some(Protocol::Http2),
        Preface::Undecided => None,
        Preface::Differs { common } if common >= b"PRI ".len() => Some(Protocol::Opaque),
        Preface::Differs { .. } => http1(prefix),
    }
}

/// How a prefix stands against the HTTP/2 connection preface.
enum Preface {
    /// It starts with the whole preface.
    Whole,
    /// It is a beginning of the preface: more bytes decide.
    Undecided,
    /// It departs from the preface after `common` bytes.
    Differs { common: usize },
}

fn preface(prefix: &[u8]) -> Preface {
    let common = prefix
        .iter()
        .zip(HTTP2_PREFACE)
        .take_while(|(a, b)| a == b)
        .count();
    if common == HTTP2_PREFACE.len() {
        Preface::Whole
    } else if common == prefix.len() {
        Preface::Undecided
    } else {
        Preface::Differs { common }
    }
}

/// The protocol of a connection to a port declared HTTP (`appProtocol`, port name), whose
/// first bytes are `prefix`, or `None` when more bytes are needed. `Opaque` here means *not
/// HTTP*: the router answers it with 400 instead of forwarding it.
///
/// The declaration already says HTTP, so only HTTP/1 against HTTP/2 and "cannot be HTTP at all"
/// are left to tell, and the rule is as loose as an HTTP server's own parser:
///
/// | first bytes | verdict |
/// |---|---|
/// | the HTTP/2 preface | `Http2` |
/// | empty lines (CRLF or LF, RFC 9112 §2.2), then a token character | `Http1` (any method case: the upstream judges it, as without the router) |
/// | empty lines, then anything else (a TLS record, binary) | `Opaque` |
/// | [`MAX_SNIFF`] bytes of empty lines | `Http1` (the HTTP/1 server bounds the rest by its head size and header timeout) |
///
/// The same guarantees as [`detect`]: decided within [`MAX_SNIFF`] bytes, and a verdict never
/// changes when more bytes arrive.
pub fn detect_declared_http(prefix: &[u8]) -> Option<Protocol> {
    let prefix = &prefix[..prefix.len().min(MAX_SNIFF)];
    match preface(prefix) {
        Preface::Whole => return Some(Protocol::Http2),
        Preface::Undecided => return None,
        Preface::Differs { .. } => {}
    }
    match prefix.iter().find(|b| !matches!(b, b'\r' | b'\n')) {
        Some(&b) if is_tchar(b) => Some(Protocol::Http1),
        Some(_) => Some(Protocol::Opaque),
        None if prefix.len() >= MAX_SNIFF => Some(Protocol::Http1),
        None => None,
    }
}

/// A token character (RFC 9110 §5.6.2), what a method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The HTTP/1 request-line rule on a prefix that is not (a prefix of) the HTTP/2 preface.
fn http1(prefix: &[u8]) -> Option<Protocol> {
    for (i, &b) in prefix.iter().enumerate() {
        if b == b' ' && i > 0 {
            let method = &prefix[..i];
            if STANDARD_METHODS.contains(&method) {
                return Some(Protocol::Http1);
            }
            return match prefix.get(i + 1)? {
                b'/' | b'*' => Some(Protocol::Http1),
                _ => Some(Protocol::Opaque),
            };
        }
        let method_char = match i {
            0 => b.is_ascii_uppercase(),
            _ => b.is_ascii_uppercase() || b == b'-' || b == b'_',
        };
        if !method_char || i >= MAX_METHOD_LEN {
            return Some(Protocol::Opaque);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use Protocol::*;

    /// `detect` on every prefix of `input`, shortest first.
    fn verdicts(input: &[u8]) -> Vec<Option<Protocol>> {
        (0..=input.len()).map(|n| detect(&input[..n])).collect()
    }

    /// Asserts that feeding `input` byte by byte gives `None` until exactly `decided_at` bytes,
    /// then `expected` for every longer prefix.
    fn assert_decides(input: &[u8], expected: Protocol, decided_at: usize) {
        for (n, v) in verdicts(input).into_iter().enumerate() {
            let want = if n < decided_at { None } else { Some(expected) };
            assert_eq!(
                v,
                want,
                "detect({:?})",
                String::from_utf8_lossy(&input[..n])
            );
        }
    }

    #[test]
    fn empty_input_needs_more_bytes() {
        assert_eq!(detect(b""), None);
    }

    #[test]
    fn http1_is_decided_at_the_space_after_a_standard_method() {
        for method in STANDARD_METHODS {
            let mut req = method.to_vec();
            req.extend_from_slice(b" /path HTTP/1.1\r\nHost: svc\r\n\r\n");
            assert_decides(&req, Http1, method.len() + 1);
        }
    }

    #[test]
    fn http1_with_an_extension_method_is_decided_at_the_first_target_byte() {
        assert_decides(b"PROPFIND /dav HTTP/1.1\r\n\r\n", Http1, 10);
        assert_decides(b"BASELINE-CONTROL /x HTTP/1.1\r\n", Http1, 18);
        assert_decides(b"M-SEARCH * HTTP/1.1\r\n", Http1, 10);
    }

    #[test]
    fn extension_method_followed_by_something_other_than_a_path_is_opaque() {
        assert_decides(b"SET key value\r\n", Opaque, 5);
    }

    #[test]
    fn http2_prior_knowledge_is_decided_at_the_end_of_the_preface() {
        let mut conn = HTTP2_PREFACE.to_vec();
        conn.extend_from_slice(&[0, 0, 18, 4, 0, 0, 0, 0, 0]); // a SETTINGS frame header
        assert_decides(&conn, Http2, HTTP2_PREFACE.len());
    }

    #[test]
    fn tls_client_hello_is_opaque_at_the_first_byte() {
        // Record header (handshake, TLS 1.0 record version, length) and ClientHello type.
        let hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        assert_decides(&hello, Opaque, 1);
    }

    #[test]
    fn database_handshakes_are_opaque_at_the_first_byte() {
        // PostgreSQL StartupMessage (length, protocol 3.0); Redis RESP array; MongoDB OP_MSG.
        assert_decides(&[0, 0, 0, 0x4f, 0, 3, 0, 0], Opaque, 1);
        assert_decides(b"*1\r\n$4\r\nPING\r\n", Opaque, 1);
        assert_decides(&[0x3a, 0x01, 0, 0, 0x01, 0, 0, 0], Opaque, 1);
    }

    #[test]
    fn lowercase_method_is_not_http1() {
        assert_decides(b"get / HTTP/1.1\r\n\r\n", Opaque, 1);
        assert_decides(b"Get / HTTP/1.1\r\n\r\n", Opaque, 2);
    }

    #[test]
    fn method_without_space_is_opaque_at_the_first_other_byte() {
        assert_decides(b"PING\r\n", Opaque, 5);
        assert_decides(b"GET\t/ HTTP/1.1\r\n", Opaque, 4);
    }

    #[test]
    fn leading_space_is_opaque() {
        assert_decides(b" GET / HTTP/1.1\r\n", Opaque, 1);
    }

    #[test]
    fn method_longer_than_the_bound_is_opaque() {
        let long = [b'A'; MAX_METHOD_LEN + 1];
        assert_decides(&long, Opaque, MAX_METHOD_LEN + 1);
        let mut longest = [b'A'; MAX_METHOD_LEN].to_vec();
        longest.extend_from_slice(b" / HTTP/1.1");
        assert_decides(&longest, Http1, MAX_METHOD_LEN + 2);
    }

    #[test]
    fn pri_that_diverges_from_the_preface_is_opaque_at_the_first_differing_byte() {
        assert_decides(b"PRI * HTTP/1.1\r\n\r\n", Opaque, 12);
        assert_decides(b"PRI /index.html HTTP/1.1\r\n", Opaque, 5);
        assert_decides(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", Opaque, 19);
        assert_decides(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r!", Opaque, 24);
    }

    #[test]
    fn methods_sharing_the_preface_start_are_still_http1() {
        assert_decides(b"PUT /x HTTP/1.1\r\n", Http1, 4);
        assert_decides(b"PATCH /x HTTP/1.1\r\n", Http1, 6);
        assert_decides(b"PRINT /x HTTP/1.1\r\n", Http1, 7);
    }

    #[test]
    fn max_sniff_bytes_always_decide() {
        // Every way to wait: inside a method, after an extension method's SP, inside the preface.
        let waiting: [&[u8]; 4] = [
            b"ABCDEFGHIJKLMNOPQRST",
            b"ABCDEFGHIJKLMNOPQRST ",
            b"PRI",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r",
        ];
        for start in waiting {
            assert_eq!(detect(start), None);
            for next in 0..=u8::MAX {
                let mut p = start.to_vec();
                p.resize(MAX_SNIFF, next);
                assert!(detect(&p).is_some(), "detect({p:?}) is None");
            }
        }
    }

    /// `detect_declared_http` on every prefix of `input`: `None` until `decided_at` bytes, then
    /// `expected`.
    fn assert_declared_decides(input: &[u8], expected: Protocol, decided_at: usize) {
        for n in 0..=input.len() {
            let want = if n < decided_at { None } else { Some(expected) };
            assert_eq!(
                detect_declared_http(&input[..n]),
                want,
                "detect_declared_http({:?})",
                String::from_utf8_lossy(&input[..n])
            );
        }
    }

    #[test]
    fn a_declared_port_takes_unusual_but_legal_requests_for_http1() {
        assert_declared_decides(b"GET / HTTP/1.1\r\n\r\n", Http1, 1);
        assert_declared_decides(b"get / HTTP/1.1\r\n\r\n", Http1, 1);
        assert_declared_decides(b"\r\nGET / HTTP/1.1\r\n\r\n", Http1, 3);
        assert_declared_decides(b"\n\r\n\r\nPOST / HTTP/1.1\r\n", Http1, 6);
        // Undeclared, the same bytes are opaque.
        assert_eq!(detect(b"get / HTTP/1.1\r\n"), Some(Opaque));
        assert_eq!(detect(b"\r\nGET / HTTP/1.1\r\n"), Some(Opaque));
    }

    #[test]
    fn a_declared_port_still_tells_http2_by_its_preface() {
        let mut conn = HTTP2_PREFACE.to_vec();
        conn.extend_from_slice(&[0, 0, 18, 4, 0, 0, 0, 0, 0]);
        assert_declared_decides(&conn, Http2, HTTP2_PREFACE.len());
        assert_declared_decides(b"PRINT /x HTTP/1.1\r\n", Http1, 4);
        assert_declared_decides(b"PRI * HTTP/1.1\r\n", Http1, 12);
    }

    #[test]
    fn on_a_declared_port_bytes_that_cannot_start_a_request_are_not_http() {
        assert_declared_decides(&[0x16, 0x03, 0x01, 0x02, 0x00], Opaque, 1);
        assert_declared_decides(&[0, 0, 0, 0x4f], Opaque, 1);
        assert_declared_decides(b"\r\n\x16\x03", Opaque, 3);
        assert_declared_decides(b" GET / HTTP/1.1\r\n", Opaque, 1);
    }

    #[test]
    fn on_a_declared_port_max_sniff_bytes_always_decide() {
        let blank = [b'\n'; MAX_SNIFF];
        assert_eq!(detect_declared_http(&blank[..MAX_SNIFF - 1]), None);
        assert_eq!(detect_declared_http(&blank), Some(Http1));
        let mut almost = HTTP2_PREFACE[..MAX_SNIFF - 1].to_vec();
        for next in 0..=u8::MAX {
            almost.truncate(MAX_SNIFF - 1);
            almost.push(next);
            assert!(detect_declared_http(&almost).is_some(), "{almost:?}");
        }
    }

    #[test]
    fn bytes_past_max_sniff_are_not_looked_at() {
        let mut p = HTTP2_PREFACE.to_vec();
        assert_eq!(detect(&p), Some(Http2));
        p.extend_from_slice(b"GET / HTTP/1.1");
        assert_eq!(detect(&p), Some(Http2));
    }
}
