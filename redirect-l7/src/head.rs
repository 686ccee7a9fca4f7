//! HTTP/1.1 message heads read in place, for a proxy that forwards them as received: only what
//! routing and framing need is taken out (the routing key, the body's length, whether the
//! connection stays open), and the hop-by-hop lines to leave out are given as byte ranges, so a
//! head is forwarded with one copy at most, names' case and lines' order intact.
//!
//! Framing is strict where a lenient reading would let two parties disagree on where a message
//! ends (request smuggling): a request with both `Transfer-Encoding` and `Content-Length`,
//! differing `Content-Length` values, or a transfer coding other than a final `chunked` is
//! refused; a `Connection` header can never remove the framing fields.

use std::ops::Range;

use crate::key::{HeaderLines, KeyConfig, KeyError, extract_key};

/// Limits on one head.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest head, request line (or status line) and fields included.
    pub max_bytes: usize,
    /// Most header fields.
    pub max_headers: usize,
}

/// Why a head is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("head over {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("malformed head: {0}")]
    Malformed(httparse::Error),
    #[error("{0}")]
    Framing(&'static str),
}

impl HeadError {
    /// The status a server answers a request with this head.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => 431,
            HeadError::Malformed(_) | HeadError::Framing(_) => 400,
        }
    }
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// A request the general HTTP path must serve (this connection leaves the in-place path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    /// `Connection: upgrade` with `Upgrade` (WebSocket and the like).
    Upgrade,
    Connect,
    /// HTTP/1.0: its own keep-alive rules.
    Http10,
}

/// A complete request head at the start of a buffer.
#[derive(Debug)]
pub struct Request {
    /// Bytes of the head, final empty line included.
    pub len: usize,
    /// `HEAD`: the response has no body whatever its fields say.
    pub head_method: bool,
    pub body: Body,
    /// The client asked to close after this request.
    pub close: bool,
    pub special: Option<Special>,
    /// Hop-by-hop lines to leave out when forwarding (ascending, disjoint).
    pub drop: Vec<Range<usize>>,
    /// The routing key (not looked for in a special request).
    pub key: Result<Option<String>, KeyError>,
}

/// A complete response head at the start of a buffer.
#[derive(Debug)]
pub struct Response {
    pub len: usize,
    pub status: u16,
    pub body: Body,
    /// The connection cannot carry another exchange after this response.
    pub close: bool,
    pub drop: Vec<Range<usize>>,
    /// Where the final empty line starts: fields added by the proxy go before it.
    pub end_of_fields: usize,
}

impl Response {
    /// An interim response (`100 Continue`, `103 Early Hints`): a final one follows.
    pub fn interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Reads a request head; `Ok(None)` while incomplete (within the limits).
pub fn parse_request(
    buf: &[u8],
    limits: Limits,
    keys: &KeyConfig,
) -> Result<Option<Request>, HeadError> {
    with_headers(limits.max_headers, |headers| {
        let mut req = httparse::Request::new(headers);
        let Some(len) = head_len(req.parse(buf), buf, limits)? else {
            return Ok(None);
        };
        let fields = Fields::new(buf, req.headers);
        let hop = fields.hop_by_hop();
        let method = req.method.unwrap_or_default();
        let special = if req.version == Some(0) {
            Some(Special::Http10)
        } else if method == "CONNECT" {
            Some(Special::Connect)
        } else if hop.upgrade && fields.has("upgrade") {
            Some(Special::Upgrade)
        } else {
            None
        };
        let body = fields.request_body()?;
        let key = match special {
            Some(_) => Ok(None),
            None => extract_key(keys, &fields),
        };
        Ok(Some(Request {
            len,
            head_method: method == "HEAD",
            body,
            close: hop.close,
            special,
            drop: hop.drop,
            key,
        }))
    })
}

/// Reads a response head to a request (`head_method`: to a `HEAD` request).
pub fn parse_response(
    buf: &[u8],
    limits: Limits,
    head_method: bool,
) -> Result<Option<Response>, HeadError> {
    with_headers(limits.max_headers, |headers| {
        let mut resp = httparse::Response::new(headers);
        let Some(len) = head_len(resp.parse(buf), buf, limits)? else {
            return Ok(None);
        };
        let status = resp.code.unwrap_or_default();
        let fields = Fields::new(buf, resp.headers);
        let hop = fields.hop_by_hop();
        let (body, framing_close) =
            if head_method || (100..200).contains(&status) || status == 204 || status == 304 {
                (Body::None, false)
            } else {
                fields.response_body()?
            };
        let end_of_fields = if buf[..len].ends_with(b"\r\n") {
            len - 2
        } else {
            len - 1
        };
        Ok(Some(Response {
            len,
            status,
            body,
            close: hop.close
                || framing_close
                || resp.version == Some(0)
                || body == Body::UntilClose,
            drop: hop.drop,
            end_of_fields,
        }))
    })
}

/// Appends `buf[..len]` without the `drop` ranges to `out`.
pub fn copy_without(buf: &[u8], len: usize, drop: &[Range<usize>], out: &mut Vec<u8>) {
    let mut at = 0;
    for r in drop {
        out.extend_from_slice(&buf[at..r.start]);
        at = r.end;
    }
    out.extend_from_slice(&buf[at..len]);
}

/// Header slots on the stack for the usual limits, on the heap beyond.
fn with_headers<'b, T>(
    max: usize,
    f: impl FnOnce(&mut [httparse::Header<'b>]) -> Result<T, HeadError>,
) -> Result<T, HeadError> {
    const STACK: usize = 128;
    if max <= STACK {
        let mut headers = [httparse::EMPTY_HEADER; STACK];
        f(&mut headers[..max])
    } else {
        let mut headers = vec![httparse::EMPTY_HEADER; max];
        f(&mut headers)
    }
}

/// The length of a complete head within the limits; `None` while incomplete.
fn head_len(
    parsed: httparse::Result<usize>,
    buf: &[u8],
    limits: Limits,
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > limits.max_bytes => {
            Err(HeadError::TooLarge(limits.max_bytes))
        }
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_bytes => {
            Err(HeadError::TooLarge(limits.max_bytes))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders(limits.max_headers)),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// What the hop-by-hop fields say.
struct Hop {
    close: bool,
    /// `Connection` names `upgrade`.
    upgrade: bool,
    drop: Vec<Range<usize>>,
}

/// The fields of a parsed head, with their lines' places in the buffer.
struct Fields<'h, 'b> {
    buf: &'b [u8],
    headers: &'h [httparse::Header<'b>],
}

/// Fields that frame the message: never removed, whatever `Connection` names.
const FRAMING: [&str; 3] = ["content-length", "transfer-encoding", "host"];

impl<'h, 'b> Fields<'h, 'b> {
    fn new(buf: &'b [u8], headers: &'h [httparse::Header<'b>]) -> Self {
        Fields { buf, headers }
    }

    fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// The value of every line named `name`, in order.
    fn values<'n>(&self, name: &'n str) -> impl Iterator<Item = &'b [u8]> + use<'_, 'b, 'n> {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// The comma-separated elements of every `name` line, trimmed, empty ones skipped.
    fn elements(&self, name: &'static str) -> impl Iterator<Item = &'b [u8]> + '_ {
        self.values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .map(trim)
            .filter(|e| !e.is_empty())
    }

    /// The byte range of header `i`'s line, line end included.
    fn line(&self, i: usize) -> Range<usize> {
        let name = self.headers[i].name.as_bytes();
        let start = name.as_ptr() as usize - self.buf.as_ptr() as usize;
        let from = start + name.len();
        // A field value holds no LF (no obs-fold): the first one ends the line.
        let end = self.buf[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.buf.len(), |p| from + p + 1);
        start..end
    }

    fn hop_by_hop(&self) -> Hop {
        let mut close = false;
        let mut upgrade = false;
        let mut named: Vec<&[u8]> = Vec::new();
        for e in self.elements("connection") {
            if e.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if e.eq_ignore_ascii_case(b"upgrade") {
                upgrade = true;
            } else if !e.eq_ignore_ascii_case(b"keep-alive") {
                named.push(e);
            }
        }
        let te_trailers_only = self
            .values("te")
            .all(|v| trim(v).eq_ignore_ascii_case(b"trailers"));
        let mut drop = Vec::new();
        for (i, h) in self.headers.iter().enumerate() {
            let n = h.name;
            let gone = ["connection", "keep-alive", "proxy-connection", "upgrade"]
                .iter()
                .any(|d| n.eq_ignore_ascii_case(d))
                || (n.eq_ignore_ascii_case("te") && !te_trailers_only)
                || (!n.eq_ignore_ascii_case("te")
                    && !FRAMING.iter().any(|f| n.eq_ignore_ascii_case(f))
                    && named.iter().any(|d| d.eq_ignore_ascii_case(n.as_bytes())));
            if gone {
                drop.push(self.line(i));
            }
        }
        Hop {
            close,
            upgrade,
            drop,
        }
    }

    /// `Some(true)`: `Transfer-Encoding` ends in a single `chunked`; `Some(false)`: it is there
    /// but does not; `None`: absent.
    fn chunked(&self) -> Option<bool> {
        let codings: Vec<&[u8]> = self.elements("transfer-encoding").collect();
        if codings.is_empty() && !self.has("transfer-encoding") {
            return None;
        }
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        Some(
            codings.last().is_some_and(|c| chunked(c))
                && codings.iter().filter(|c| chunked(c)).count() == 1,
        )
    }

    /// `Content-Length`, when present: every value the same number.
    fn content_length(&self) -> Result<Option<u64>, HeadError> {
        let mut found = None;
        for v in self.elements("content-length") {
            if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::Framing("content-length is not a number"));
            }
            let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(f) if f != n => {
                    return Err(HeadError::Framing("content-length values differ"));
                }
                _ => found = Some(n),
            }
        }
        if found.is_none() && self.has("content-length") {
            return Err(HeadError::Framing("content-length is empty"));
        }
        Ok(found)
    }

    fn request_body(&self) -> Result<Body, HeadError> {
        match (self.chunked(), self.content_length()?) {
            (Some(_), Some(_)) => Err(HeadError::Framing(
                "both transfer-encoding and content-length",
            )),
            (Some(true), None) => Ok(Body::Chunked),
            (Some(false), None) => Err(HeadError::Framing(
                "transfer-encoding does not end in chunked",
            )),
            (None, Some(0) | None) => Ok(Body::None),
            (None, Some(n)) => Ok(Body::Length(n)),
        }
    }

    /// The body's delimitation, and whether it forces the connection closed after it.
    fn response_body(&self) -> Result<(Body, bool), HeadError> {
        match self.chunked() {
            // With both, the coding wins and the connection does not carry another message
            // (RFC 9112 6.3).
            Some(true) => Ok((Body::Chunked, self.has("content-length"))),
            Some(false) => Ok((Body::UntilClose, true)),
            None => Ok(match self.content_length()? {
                Some(0) => (Body::None, false),
                Some(n) => (Body::Length(n), false),
                None => (Body::UntilClose, true),
            }),
        }
    }
}

impl HeaderLines for Fields<'_, '_> {
    fn lines<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.values(name)
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b" \t".contains(b))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b" \t".contains(b))
        .map_or(start, |p| p + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1024,
        max_headers: 8,
    };

    fn request(head: &str) -> Result<Option<Request>, HeadError> {
        parse_request(head.as_bytes(), LIMITS, &KeyConfig::default())
    }

    fn forwarded(head: &str) -> String {
        let r = request(head).unwrap().unwrap();
        let mut out = Vec::new();
        copy_without(head.as_bytes(), r.len, &r.drop, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_plain_request_is_forwarded_byte_for_byte_with_its_key() {
        let head = "GET /a HTTP/1.1\r\nHost: x\r\nX-Case: 1\r\nbaggage: routing-key=feat\r\nx-dup: 1\r\nx-dup: 2\r\n\r\nrest";
        let r = request(head).unwrap().unwrap();
        assert_eq!(r.len, head.len() - 4);
        assert_eq!(r.body, Body::None);
        assert!(!r.close && r.special.is_none() && r.drop.is_empty());
        assert_eq!(r.key, Ok(Some("feat".into())));
        assert_eq!(forwarded(head), &head[..head.len() - 4]);
    }

    #[test]
    fn hop_by_hop_lines_go_and_te_trailers_stays() {
        let head = "GET / HTTP/1.1\r\nHost: x\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nTE: trailers\r\nX-End: 2\r\nConnection: X-Hop, close\r\n\r\n";
        let r = request(head).unwrap().unwrap();
        assert!(r.close);
        assert_eq!(
            forwarded(head),
            "GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nX-End: 2\r\n\r\n"
        );
        let head = "GET / HTTP/1.1\r\nTE: gzip\r\nProxy-Connection: x\r\nUpgrade: h2c\r\n\r\n";
        assert_eq!(forwarded(head), "GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn connection_cannot_remove_the_framing_fields() {
        let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding, host, content-length\r\n\r\n";
        let r = request(head).unwrap().unwrap();
        assert_eq!(r.body, Body::Chunked);
        assert_eq!(
            forwarded(head),
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn request_framing_is_strict() {
        let body =
            |h: &str| request(&format!("POST / HTTP/1.1\r\n{h}\r\n")).map(|r| r.unwrap().body);
        assert_eq!(body("Content-Length: 5\r\n"), Ok(Body::Length(5)));
        assert_eq!(
            body("Content-Length: 5\r\nContent-Length: 5\r\n"),
            Ok(Body::Length(5))
        );
        assert_eq!(body("Content-Length: 5, 5\r\n"), Ok(Body::Length(5)));
        assert_eq!(body("Content-Length: 0\r\n"), Ok(Body::None));
        assert_eq!(
            body("Transfer-Encoding: gzip, chunked\r\n"),
            Ok(Body::Chunked)
        );
        assert_eq!(
            body("Transfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n"),
            Ok(Body::Chunked)
        );
        for bad in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length:\r\n",
            "Content-Length: 99999999999999999999\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding:\r\n",
        ] {
            let e = body(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}: {e}");
        }
    }

    #[test]
    fn upgrades_connect_and_http10_leave_the_path() {
        let special = |h: &str| request(h).unwrap().unwrap().special;
        assert_eq!(
            special("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            Some(Special::Upgrade)
        );
        assert_eq!(
            special("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n"),
            None
        );
        assert_eq!(
            special("CONNECT a:443 HTTP/1.1\r\n\r\n"),
            Some(Special::Connect)
        );
        assert_eq!(special("GET / HTTP/1.0\r\n\r\n"), Some(Special::Http10));
        assert!(
            request("HEAD / HTTP/1.1\r\n\r\n")
                .unwrap()
                .unwrap()
                .head_method
        );
    }

    #[test]
    fn limits_and_malformed_heads() {
        assert!(request("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(1100));
        assert_eq!(request(&big).unwrap_err(), HeadError::TooLarge(1024));
        let complete_but_big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(1010));
        assert_eq!(request(&complete_but_big).unwrap_err().status(), 431);
        let many: String = (0..9).map(|i| format!("x-{i}: v\r\n")).collect();
        let e = request(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err();
        assert_eq!(e, HeadError::TooManyHeaders(8));
        assert_eq!(e.status(), 431);
        let e = request("GET / HTTP/1.1\r\nthis is not a header\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 400);
        let e = request("GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 400, "obs-fold");
    }

    #[test]
    fn a_bad_key_is_reported_not_fatal() {
        let r = request("GET / HTTP/1.1\r\nx-routing-key: a\r\nx-routing-key: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(r.key, Err(KeyError::ConflictingHeaders { .. })));
    }

    fn response(head: &str, head_method: bool) -> Response {
        parse_response(head.as_bytes(), LIMITS, head_method)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn response_framing() {
        let r = response("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", false);
        assert_eq!((r.body, r.close), (Body::Length(12), false));
        assert_eq!(r.end_of_fields, r.len - 2);
        let r = response("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", true);
        assert_eq!(r.body, Body::None);
        let r = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!((r.body, r.close), (Body::Chunked, false));
        let r = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!((r.body, r.close), (Body::Chunked, true));
        let r = response("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.body, r.close), (Body::UntilClose, true));
        let r = response("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!((r.body, r.close), (Body::None, false));
        let r = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(r.close);
        let r = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(r.close);
        assert_eq!(r.drop.len(), 1);
        let r = response("HTTP/1.1 100 Continue\r\n\r\n", false);
        assert!(r.interim());
        assert!(!response("HTTP/1.1 101 Switching\r\n\r\n", false).interim());
        let e = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            LIMITS,
            false,
        );
        assert!(e.is_err());
    }

    #[test]
    fn a_lf_only_head_keeps_its_line_ranges() {
        let head = "HTTP/1.1 200 OK\nConnection: close\nX: 1\n\n";
        let r = response(head, false);
        assert_eq!(r.end_of_fields, head.len() - 1);
        let mut out = Vec::new();
        copy_without(head.as_bytes(), r.len, &r.drop, &mut out);
        assert_eq!(out, b"HTTP/1.1 200 OK\nX: 1\n\n");
    }
}
