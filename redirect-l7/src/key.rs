//! Routing key extraction from request headers.
//!
//! A request's routing key names the sandbox it should reach. [`extract_key`] looks for it in
//! three places, configured by [`KeyConfig`]; the first match wins, in this order:
//!
//! 1. **plain headers** (`x-routing-key: feat-x`), names in the order configured; header names
//!    are case-insensitive;
//! 2. **baggage** list-members (`baggage: routing-key=feat-x`, W3C Baggage), member keys in the
//!    order configured; the value is percent-decoded;
//! 3. **tracestate** list-members (`tracestate: routing-key=feat-x`, W3C Trace Context), member
//!    keys in the order configured.
//!
//! Plain headers come first because they are the most deliberate way to set a key: a person
//! with curl, or a test. Baggage comes before tracestate because baggage is the standard carrier
//! for application context, tracestate one for vendor tracing data. A later source is only read
//! (and parsed) when no earlier one matched, and no conflict between sources is reported: the
//! first match is the key.
//!
//! The key found must itself be a valid routing key (1 to 128 characters of `A-Z a-z 0-9 . _ ~ -`,
//! [`crate::validate_routing_key`]). Anything wrong is a [`KeyError`]: an invalid key, a
//! plain header repeated with different values, a baggage or tracestate header that does not
//! parse, or one over its W3C limits ([`MAX_BAGGAGE_MEMBERS`] list-members or
//! [`MAX_BAGGAGE_BYTES`] bytes for baggage, [`MAX_TRACESTATE_MEMBERS`] for tracestate). In
//! baggage, a malformed list-member is skipped (as W3C Baggage allows) unless it is the member
//! that carries the key: another application's bad member neither hides the key nor keeps
//! tracestate from being read. tracestate is parsed strictly: one malformed list-member fails
//! the header. The router then treats the request as having no key (it goes to
//! baseline), counts it (`bad_key`) and logs the error at debug level; [`KeyError::metric_label`]
//! is a bounded label for finer counts.
//!
//! Several header lines with the same name are combined as HTTP says (RFC 9110 §5.3): baggage
//! and tracestate lines are one comma-separated list, and the baggage limits apply to that list.
//! A member key present more than once in the list: the first occurrence counts.
//!
//! # Accepting keys your applications already propagate
//!
//! Applications that already carry a branch or session identifier through their calls need no
//! change: add its name to the matching list (agent flags `--key-header`, `--baggage-key`,
//! `--tracestate-key`, or their environment twins). For example, Signadot's `sd-routing-key`
//! baggage member, and a `mirrord-session`-style header:
//!
//! ```
//! use redirect_l7::key::KeyConfig;
//!
//! let cfg = KeyConfig {
//!     headers: vec!["x-routing-key".into(), "mirrord-session".into()],
//!     baggage: vec!["routing-key".into(), "sd-routing-key".into()],
//!     tracestate: vec!["routing-key".into()],
//! };
//! # let _ = cfg;
//! ```
//!
//! The values must still be valid routing keys, equal to a sandbox's `routingKey`.

use http::HeaderMap;
use percent_encoding::percent_decode;

use crate::{InvalidRoutingKey, validate_routing_key};

/// A request's header lines, looked up by name: an `http::HeaderMap`, or the lines of a head
/// parsed in place (the router's HTTP/1.1 path never builds a map).
pub trait HeaderLines {
    /// The value of every line named `name` (case-insensitive), in the order received.
    fn lines<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl HeaderLines for HeaderMap {
    fn lines<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

/// Most baggage list-members accepted (W3C Baggage limit).
pub const MAX_BAGGAGE_MEMBERS: usize = 180;
/// Longest baggage accepted, all `baggage` header lines combined (W3C Baggage limit).
pub const MAX_BAGGAGE_BYTES: usize = 8192;
/// Most tracestate list-members accepted (W3C Trace Context limit).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

const BAGGAGE: &str = "baggage";
const TRACESTATE: &str = "tracestate";

/// Where routing keys are read from. See the module documentation for the precedence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyConfig {
    /// Baggage member keys (case-sensitive).
    pub baggage: Vec<String>,
    /// tracestate member keys (lowercase, as tracestate keys are).
    pub tracestate: Vec<String>,
    /// Plain request header names (case-insensitive).
    pub headers: Vec<String>,
}

impl Default for KeyConfig {
    fn default() -> Self {
        KeyConfig {
            baggage: vec!["routing-key".into()],
            tracestate: vec!["routing-key".into()],
            headers: vec!["x-routing-key".into()],
        }
    }
}

/// Why a request's headers give no usable routing key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("header {name}: value is not UTF-8")]
    HeaderNotUtf8 { name: String },
    #[error("header {name} is repeated with different values")]
    ConflictingHeaders { name: String },
    #[error("baggage header: {0}")]
    Baggage(#[from] BaggageError),
    #[error("tracestate header: {0}")]
    TraceState(#[from] TraceStateError),
    #[error("routing key from {from}: {source}")]
    InvalidKey {
        from: String,
        source: InvalidRoutingKey,
    },
}

impl KeyError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            KeyError::HeaderNotUtf8 { .. } => "key_header_not_utf8",
            KeyError::ConflictingHeaders { .. } => "key_header_conflict",
            KeyError::Baggage(e) => e.metric_label(),
            KeyError::TraceState(e) => e.metric_label(),
            KeyError::InvalidKey { .. } => "invalid_key",
        }
    }
}

/// A baggage header that does not parse or is over a limit. `member` counts the comma-separated
/// list-members from 1, empty ones included.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BaggageError {
    #[error("{len} bytes, over the limit of {MAX_BAGGAGE_BYTES}")]
    TooLong { len: usize },
    #[error("more than {MAX_BAGGAGE_MEMBERS} list-members")]
    TooManyMembers,
    #[error("list-member {member}: {reason}")]
    Malformed { member: usize, reason: &'static str },
}

impl BaggageError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BaggageError::TooLong { .. } => "baggage_too_long",
            BaggageError::TooManyMembers => "baggage_too_many_members",
            BaggageError::Malformed { .. } => "baggage_malformed",
        }
    }
}

/// A tracestate header that does not parse or is over the limit. `member` counts the
/// comma-separated list-members from 1, empty ones included.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceStateError {
    #[error("more than {MAX_TRACESTATE_MEMBERS} list-members")]
    TooManyMembers,
    #[error("list-member {member}: {reason}")]
    Malformed { member: usize, reason: &'static str },
}

impl TraceStateError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TraceStateError::TooManyMembers => "tracestate_too_many_members",
            TraceStateError::Malformed { .. } => "tracestate_malformed",
        }
    }
}

/// One baggage list-member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaggageMember {
    pub key: String,
    /// Percent-decoded.
    pub value: String,
    /// Properties after the value, in order: key and percent-decoded value, if any.
    pub properties: Vec<(String, Option<String>)>,
}

/// The routing key of a request, `None` when no configured place carries one.
pub fn extract_key(
    cfg: &KeyConfig,
    headers: &impl HeaderLines,
) -> Result<Option<String>, KeyError> {
    for name in &cfg.headers {
        if let Some(value) = plain_header(headers, name)? {
            return valid(value, || format!("header {}", name.to_ascii_lowercase()));
        }
    }
    if !cfg.baggage.is_empty()
        && let Some(list) = combined(headers, BAGGAGE)
    {
        let members = baggage_members_lenient(&list)?;
        for wanted in &cfg.baggage {
            match members.iter().find(|m| m.key() == Some(wanted.as_str())) {
                Some(Lenient::Valid(m)) => {
                    return valid(m.value.clone(), || format!("baggage member {wanted}"));
                }
                Some(Lenient::Malformed { error, .. }) => return Err(error.clone().into()),
                None => {}
            }
        }
    }
    if !cfg.tracestate.is_empty()
        && let Some(list) = combined(headers, TRACESTATE)
    {
        let members = parse_tracestate_bytes(&list)?;
        for wanted in &cfg.tracestate {
            if let Some((_, v)) = members.iter().find(|(k, _)| k == wanted) {
                return valid(v.clone(), || format!("tracestate member {wanted}"));
            }
        }
    }
    Ok(None)
}

fn valid(key: String, from: impl FnOnce() -> String) -> Result<Option<String>, KeyError> {
    match validate_routing_key(&key) {
        Ok(()) => Ok(Some(key)),
        Err(source) => Err(KeyError::InvalidKey {
            from: from(),
            source,
        }),
    }
}

/// The trimmed value of a plain header; `None` when absent or empty. Lines repeating one value
/// count once.
fn plain_header(headers: &impl HeaderLines, name: &str) -> Result<Option<String>, KeyError> {
    let mut found: Option<&str> = None;
    for value in headers.lines(name) {
        let value = std::str::from_utf8(trim_ows(value)).map_err(|_| KeyError::HeaderNotUtf8 {
            name: name.to_ascii_lowercase(),
        })?;
        match found {
            _ if value.is_empty() => {}
            None => found = Some(value),
            Some(f) if f == value => {}
            Some(_) => {
                return Err(KeyError::ConflictingHeaders {
                    name: name.to_ascii_lowercase(),
                });
            }
        }
    }
    Ok(found.map(str::to_owned))
}

/// All lines of a list-valued header joined with commas; `None` when absent.
fn combined(headers: &impl HeaderLines, name: &str) -> Option<Vec<u8>> {
    let mut lines = headers.lines(name);
    let mut list = lines.next()?.to_vec();
    for line in lines {
        list.push(b',');
        list.extend_from_slice(line);
    }
    Some(list)
}

/// Parses a W3C Baggage header value:
///
/// ```text
/// baggage-string = list-member 0*179( OWS "," OWS list-member )
/// list-member    = key OWS "=" OWS value *( OWS ";" OWS property )
/// property       = key OWS "=" OWS value / key OWS
/// key            = token                        ; RFC 7230
/// value          = *baggage-octet               ; percent-encoded UTF-8
/// baggage-octet  = %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E
/// OWS            = *( SP / HTAB )
/// ```
///
/// Empty list-members (`a=1,,b=2`) are skipped. Values (of members and properties) are
/// percent-decoded; an invalid escape or a result that is not UTF-8 is an error. At most
/// [`MAX_BAGGAGE_MEMBERS`] list-members and [`MAX_BAGGAGE_BYTES`] bytes.
pub fn parse_baggage(value: &str) -> Result<Vec<BaggageMember>, BaggageError> {
    parse_baggage_bytes(value.as_bytes())
}

fn parse_baggage_bytes(value: &[u8]) -> Result<Vec<BaggageMember>, BaggageError> {
    baggage_members_lenient(value)?
        .into_iter()
        .map(|m| match m {
            Lenient::Valid(m) => Ok(m),
            Lenient::Malformed { error, .. } => Err(error),
        })
        .collect()
}

/// A baggage list-member as the key search sees it: parsed, or malformed with the key it
/// seems to have (the text before `=`, when that is a token).
enum Lenient {
    Valid(BaggageMember),
    Malformed {
        key: Option<String>,
        error: BaggageError,
    },
}

impl Lenient {
    fn key(&self) -> Option<&str> {
        match self {
            Lenient::Valid(m) => Some(&m.key),
            Lenient::Malformed { key, .. } => key.as_deref(),
        }
    }
}

/// The list-members of a baggage header, each parsed on its own: W3C Baggage lets a receiver
/// skip a member it cannot parse and keep the rest, so another application's malformed member
/// cannot hide a routing key. The limits still apply to the whole header.
fn baggage_members_lenient(value: &[u8]) -> Result<Vec<Lenient>, BaggageError> {
    if value.len() > MAX_BAGGAGE_BYTES {
        return Err(BaggageError::TooLong { len: value.len() });
    }
    let mut members = Vec::new();
    for (index, raw) in value.split(|&b| b == b',').enumerate() {
        let raw = trim_ows(raw);
        if raw.is_empty() {
            continue;
        }
        if members.len() == MAX_BAGGAGE_MEMBERS {
            return Err(BaggageError::TooManyMembers);
        }
        members.push(match baggage_member(raw) {
            Ok(m) => Lenient::Valid(m),
            Err(reason) => Lenient::Malformed {
                key: split_at_equals(raw.split(|&b| b == b';').next().unwrap_or_default())
                    .and_then(|(k, _)| token(k)),
                error: BaggageError::Malformed {
                    member: index + 1,
                    reason,
                },
            },
        });
    }
    Ok(members)
}

fn baggage_member(raw: &[u8]) -> Result<BaggageMember, &'static str> {
    let mut parts = raw.split(|&b| b == b';');
    let first = parts.next().unwrap_or_default();
    let (key, value) = split_at_equals(first).ok_or("no '=' after the key")?;
    let key = token(key).ok_or("the key is not a token")?;
    let value = baggage_value(value)?;
    let properties = parts
        .map(|p| {
            let p = trim_ows(p);
            match split_at_equals(p) {
                Some((k, v)) => Ok((
                    token(k).ok_or("a property key is not a token")?,
                    Some(baggage_value(v)?),
                )),
                None => Ok((token(p).ok_or("a property key is not a token")?, None)),
            }
        })
        .collect::<Result<_, &'static str>>()?;
    Ok(BaggageMember {
        key,
        value,
        properties,
    })
}

/// Splits at the first `=`, trimming OWS around both sides.
fn split_at_equals(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = raw.iter().position(|&b| b == b'=')?;
    Some((trim_ows(&raw[..i]), trim_ows(&raw[i + 1..])))
}

/// An RFC 7230 token.
fn token(raw: &[u8]) -> Option<String> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if raw.is_empty() || !raw.iter().all(|&b| is_tchar(b)) {
        return None;
    }
    std::str::from_utf8(raw).ok().map(str::to_owned)
}

/// A baggage value, percent-decoded.
fn baggage_value(raw: &[u8]) -> Result<String, &'static str> {
    let is_octet =
        |b: u8| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E);
    if !raw.iter().all(|&b| is_octet(b)) {
        return Err("a value has a character outside baggage-octet");
    }
    let mut rest = raw;
    while let Some(i) = rest.iter().position(|&b| b == b'%') {
        match rest.get(i + 1..i + 3) {
            Some([h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => rest = &rest[i + 3..],
            _ => return Err("a value has an invalid percent-escape"),
        }
    }
    percent_decode(raw)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| "a value is not UTF-8 once percent-decoded")
}

/// Parses a W3C Trace Context `tracestate` header value:
///
/// ```text
/// list        = list-member 0*31( OWS "," OWS list-member )
/// list-member = ( key "=" value ) / OWS
/// key         = simple-key / tenant-id "@" system-id
/// simple-key  = ( lcalpha / DIGIT ) 0*255( lcalpha / DIGIT / "_" / "-" / "*" / "/" )
/// tenant-id   = ( lcalpha / DIGIT ) 0*240( lcalpha / DIGIT / "_" / "-" / "*" / "/" )
/// system-id   = lcalpha 0*13( lcalpha / DIGIT / "_" / "-" / "*" / "/" )
/// value       = 0*255( %x20-2B / %x2D-3C / %x3E-7E ) ( %x21-2B / %x2D-3C / %x3E-7E )
/// ```
///
/// Returns the members as (key, value) in order; empty list-members are skipped. At most
/// [`MAX_TRACESTATE_MEMBERS`] list-members.
pub fn parse_tracestate(value: &str) -> Result<Vec<(String, String)>, TraceStateError> {
    parse_tracestate_bytes(value.as_bytes())
}

fn parse_tracestate_bytes(value: &[u8]) -> Result<Vec<(String, String)>, TraceStateError> {
    let mut members = Vec::new();
    for (index, raw) in value.split(|&b| b == b',').enumerate() {
        let raw = trim_ows(raw);
        if raw.is_empty() {
            continue;
        }
        if members.len() == MAX_TRACESTATE_MEMBERS {
            return Err(TraceStateError::TooManyMembers);
        }
        let malformed = |reason| TraceStateError::Malformed {
            member: index + 1,
            reason,
        };
        let eq = raw
            .iter()
            .position(|&b| b == b'=')
            .ok_or(malformed("no '=' after the key"))?;
        let (key, value) = (&raw[..eq], &raw[eq + 1..]);
        if !tracestate_key(key) {
            return Err(malformed("invalid key"));
        }
        if !tracestate_value(value) {
            return Err(malformed("invalid value"));
        }
        // Both checks admit ASCII only.
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        members.push((text(key), text(value)));
    }
    Ok(members)
}

fn tracestate_key(key: &[u8]) -> bool {
    let rest_char = |b: &u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/');
    let part = |p: &[u8], first: fn(&u8) -> bool, max: usize| {
        !p.is_empty() && p.len() <= max && first(&p[0]) && p[1..].iter().all(rest_char)
    };
    let lower_or_digit: fn(&u8) -> bool = |b| b.is_ascii_lowercase() || b.is_ascii_digit();
    match key.iter().position(|&b| b == b'@') {
        None => part(key, lower_or_digit, 256),
        Some(at) => {
            part(&key[..at], lower_or_digit, 241)
                && part(&key[at + 1..], u8::is_ascii_lowercase, 14)
        }
    }
}

fn tracestate_value(value: &[u8]) -> bool {
    (1..=256).contains(&value.len())
        && value
            .iter()
            .all(|&b| matches!(b, 0x20..=0x7E) && b != b',' && b != b'=')
        && value.last() != Some(&b' ')
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::*;

    /// Request headers from (name, value) lines, in order.
    fn headers(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in lines {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn key(lines: &[(&str, &str)]) -> Result<Option<String>, KeyError> {
        extract_key(&KeyConfig::default(), &headers(lines))
    }

    fn some(k: &str) -> Result<Option<String>, KeyError> {
        Ok(Some(k.to_string()))
    }

    fn member(key: &str, value: &str) -> BaggageMember {
        BaggageMember {
            key: key.into(),
            value: value.into(),
            properties: vec![],
        }
    }

    fn malformed(member: usize, reason: &'static str) -> BaggageError {
        BaggageError::Malformed { member, reason }
    }

    // --- extract_key: where the key comes from -------------------------------------------

    #[test]
    fn no_headers_no_key() {
        assert_eq!(key(&[]), Ok(None));
    }

    #[test]
    fn key_from_the_plain_header() {
        assert_eq!(key(&[("x-routing-key", "feat-x")]), some("feat-x"));
    }

    #[test]
    fn key_from_baggage() {
        assert_eq!(
            key(&[("baggage", "userId=alice,routing-key=feat-x")]),
            some("feat-x")
        );
    }

    #[test]
    fn key_from_tracestate() {
        assert_eq!(
            key(&[("tracestate", "rojo=00f067aa0ba902b7,routing-key=feat-x")]),
            some("feat-x")
        );
    }

    #[test]
    fn unrelated_headers_give_no_key() {
        assert_eq!(
            key(&[
                ("baggage", "userId=alice"),
                ("tracestate", "congo=t61rcWkgMzE"),
                ("x-other", "feat-x"),
            ]),
            Ok(None)
        );
    }

    #[test]
    fn plain_header_wins_over_baggage_and_tracestate() {
        let lines = [
            ("tracestate", "routing-key=from-tracestate"),
            ("baggage", "routing-key=from-baggage"),
            ("x-routing-key", "from-header"),
        ];
        assert_eq!(key(&lines), some("from-header"));
    }

    #[test]
    fn baggage_wins_over_tracestate() {
        let lines = [
            ("tracestate", "routing-key=from-tracestate"),
            ("baggage", "routing-key=from-baggage"),
        ];
        assert_eq!(key(&lines), some("from-baggage"));
    }

    #[test]
    fn within_a_source_the_configured_order_wins() {
        let cfg = KeyConfig {
            headers: vec!["x-routing-key".into(), "mirrord-session".into()],
            baggage: vec!["routing-key".into(), "sd-routing-key".into()],
            tracestate: vec![],
        };
        let both = headers(&[("mirrord-session", "second"), ("x-routing-key", "first")]);
        assert_eq!(extract_key(&cfg, &both), some("first"));
        let baggage = headers(&[("baggage", "sd-routing-key=second,routing-key=first")]);
        assert_eq!(extract_key(&cfg, &baggage), some("first"));
        let only_sd = headers(&[("baggage", "sd-routing-key=signadot-key")]);
        assert_eq!(extract_key(&cfg, &only_sd), some("signadot-key"));
    }

    #[test]
    fn an_empty_list_turns_a_source_off() {
        let cfg = KeyConfig {
            headers: vec![],
            baggage: vec![],
            tracestate: vec!["routing-key".into()],
        };
        let h = headers(&[
            ("x-routing-key", "ignored"),
            ("baggage", "not a valid baggage"),
            ("tracestate", "routing-key=feat-x"),
        ]);
        assert_eq!(extract_key(&cfg, &h), some("feat-x"));
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let cfg = KeyConfig {
            headers: vec!["X-Routing-Key".into()],
            ..KeyConfig::default()
        };
        let h = headers(&[("X-ROUTING-KEY", "feat-x")]);
        assert_eq!(extract_key(&cfg, &h), some("feat-x"));
    }

    #[test]
    fn baggage_member_keys_are_case_sensitive() {
        assert_eq!(key(&[("baggage", "Routing-Key=feat-x")]), Ok(None));
    }

    #[test]
    fn a_configured_name_that_is_no_header_name_matches_nothing() {
        let cfg = KeyConfig {
            headers: vec!["bad name".into(), String::new()],
            ..KeyConfig::default()
        };
        assert_eq!(
            extract_key(&cfg, &headers(&[("x-routing-key", "k")])),
            Ok(None)
        );
    }

    // --- extract_key: plain headers --------------------------------------------------------

    #[test]
    fn plain_header_value_is_trimmed() {
        assert_eq!(key(&[("x-routing-key", " \tfeat-x\t ")]), some("feat-x"));
    }

    #[test]
    fn empty_plain_header_is_no_key_and_falls_through() {
        assert_eq!(key(&[("x-routing-key", "")]), Ok(None));
        assert_eq!(
            key(&[("x-routing-key", "  "), ("baggage", "routing-key=feat-x")]),
            some("feat-x")
        );
    }

    #[test]
    fn non_utf8_plain_header_is_an_error() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-routing-key",
            HeaderValue::from_bytes(b"feat-\xff").unwrap(),
        );
        let err = extract_key(&KeyConfig::default(), &h).unwrap_err();
        assert_eq!(
            err,
            KeyError::HeaderNotUtf8 {
                name: "x-routing-key".into()
            }
        );
        assert_eq!(err.metric_label(), "key_header_not_utf8");
    }

    #[test]
    fn plain_header_repeated_with_one_value_counts_once() {
        assert_eq!(
            key(&[("x-routing-key", "feat-x"), ("x-routing-key", " feat-x")]),
            some("feat-x")
        );
    }

    #[test]
    fn plain_header_repeated_with_different_values_is_an_error() {
        let err = key(&[("x-routing-key", "feat-x"), ("x-routing-key", "feat-y")]).unwrap_err();
        assert_eq!(err.metric_label(), "key_header_conflict");
    }

    // --- extract_key: the key itself -------------------------------------------------------

    #[test]
    fn invalid_key_is_an_error_naming_its_source() {
        let err = key(&[("x-routing-key", "feat x")]).unwrap_err();
        assert_eq!(err.metric_label(), "invalid_key");
        assert!(
            err.to_string()
                .starts_with("routing key from header x-routing-key: ")
        );

        let err = key(&[("baggage", "routing-key=feat%20x")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("routing key from baggage member routing-key: ")
        );
    }

    #[test]
    fn an_invalid_key_does_not_fall_through_to_the_next_source() {
        let lines = [("x-routing-key", "no/slash"), ("baggage", "routing-key=ok")];
        assert_eq!(key(&lines).unwrap_err().metric_label(), "invalid_key");
    }

    #[test]
    fn key_length_is_1_to_128() {
        let longest = "k".repeat(128);
        assert_eq!(key(&[("x-routing-key", &longest)]), some(&longest));
        let too_long = "k".repeat(129);
        assert_eq!(
            key(&[("x-routing-key", &too_long)])
                .unwrap_err()
                .metric_label(),
            "invalid_key"
        );
        assert_eq!(
            key(&[("baggage", "routing-key=")])
                .unwrap_err()
                .metric_label(),
            "invalid_key"
        );
    }

    #[test]
    fn key_allows_unreserved_characters() {
        assert_eq!(
            key(&[("x-routing-key", "Feat_1.2~x-y")]),
            some("Feat_1.2~x-y")
        );
    }

    #[test]
    fn percent_decoded_baggage_value_must_be_a_valid_key() {
        assert_eq!(key(&[("baggage", "routing-key=feat%2Dx")]), some("feat-x"));
        let err = key(&[("baggage", "routing-key=feat%2Fx")]).unwrap_err();
        assert!(matches!(err, KeyError::InvalidKey { .. }), "{err}");
    }

    // --- extract_key: baggage and tracestate headers ---------------------------------------

    #[test]
    fn several_baggage_headers_are_one_list() {
        let lines = [
            ("baggage", "userId=alice"),
            ("baggage", "routing-key=feat-x"),
        ];
        assert_eq!(key(&lines), some("feat-x"));
    }

    #[test]
    fn a_malformed_unrelated_baggage_member_is_skipped_and_the_key_kept() {
        for list in [
            "routing-key=feat-x,bad member",
            "bad member,routing-key=feat-x",
            "a=%zz, routing-key=feat-x ;p, b=\"q\"",
            "=1,routing-key=feat-x",
        ] {
            assert_eq!(key(&[("baggage", list)]), some("feat-x"), "{list}");
        }
    }

    #[test]
    fn a_malformed_unrelated_baggage_member_does_not_block_the_tracestate_key() {
        let lines = [
            ("baggage", "userId=alice,bad member"),
            ("tracestate", "routing-key=feat-x"),
        ];
        assert_eq!(key(&lines), some("feat-x"));
    }

    #[test]
    fn a_malformed_routing_key_member_is_an_error() {
        let err = key(&[("baggage", "a=1,routing-key=bad value")]).unwrap_err();
        assert_eq!(
            err,
            KeyError::Baggage(malformed(
                2,
                "a value has a character outside baggage-octet"
            ))
        );
        assert_eq!(err.metric_label(), "baggage_malformed");
        // It names the key's own member, so tracestate is not consulted.
        let lines = [
            ("baggage", "routing-key=%zz"),
            ("tracestate", "routing-key=feat-x"),
        ];
        assert!(key(&lines).is_err());
    }

    #[test]
    fn malformed_baggage_is_ignored_when_a_plain_header_has_the_key() {
        let lines = [("baggage", ";;;"), ("x-routing-key", "feat-x")];
        assert_eq!(key(&lines), some("feat-x"));
    }

    #[test]
    fn baggage_over_the_byte_limit_across_headers_is_an_error() {
        let half = format!("a={}", "v".repeat(MAX_BAGGAGE_BYTES / 2));
        let err = key(&[("baggage", &half), ("baggage", &half)]).unwrap_err();
        assert_eq!(err.metric_label(), "baggage_too_long");
    }

    #[test]
    fn first_occurrence_of_a_repeated_member_counts() {
        let lines = [
            ("baggage", "routing-key=first"),
            ("baggage", "routing-key=second"),
        ];
        assert_eq!(key(&lines), some("first"));
    }

    #[test]
    fn several_tracestate_headers_are_one_list() {
        let lines = [
            ("tracestate", "rojo=00f067aa"),
            ("tracestate", " routing-key=feat-x"),
        ];
        assert_eq!(key(&lines), some("feat-x"));
    }

    #[test]
    fn malformed_tracestate_is_an_error() {
        let err = key(&[("tracestate", "Upper=1")]).unwrap_err();
        assert_eq!(
            err,
            KeyError::TraceState(TraceStateError::Malformed {
                member: 1,
                reason: "invalid key"
            })
        );
        assert_eq!(err.metric_label(), "tracestate_malformed");
    }

    #[test]
    fn tracestate_vendor_key_can_carry_the_routing_key() {
        let cfg = KeyConfig {
            tracestate: vec!["redirect@acme".into()],
            ..KeyConfig::default()
        };
        let h = headers(&[("tracestate", "congo=t61rcWkgMzE,redirect@acme=feat-x")]);
        assert_eq!(extract_key(&cfg, &h), some("feat-x"));
    }

    // --- parse_baggage ---------------------------------------------------------------------

    #[test]
    fn baggage_members_in_order() {
        assert_eq!(
            parse_baggage("userId=alice,serverNode=DF%2028,isProduction=false"),
            Ok(vec![
                member("userId", "alice"),
                member("serverNode", "DF 28"),
                member("isProduction", "false"),
            ])
        );
    }

    #[test]
    fn baggage_properties_with_and_without_values() {
        let parsed = parse_baggage("routing-key=feat-x;ttl=60;sticky, other=1").unwrap();
        assert_eq!(
            parsed[0].properties,
            vec![("ttl".into(), Some("60".into())), ("sticky".into(), None)]
        );
        assert_eq!(parsed[1], member("other", "1"));
    }

    #[test]
    fn baggage_whitespace_is_allowed_around_every_separator() {
        let parsed = parse_baggage(" \tk1 = v1 ; p1 = x ; p2 \t,\t k2=v2 ").unwrap();
        assert_eq!(
            parsed,
            vec![
                BaggageMember {
                    key: "k1".into(),
                    value: "v1".into(),
                    properties: vec![("p1".into(), Some("x".into())), ("p2".into(), None)],
                },
                member("k2", "v2"),
            ]
        );
    }

    #[test]
    fn baggage_empty_list_members_are_skipped() {
        assert_eq!(parse_baggage(""), Ok(vec![]));
        assert_eq!(
            parse_baggage(",a=1,, ,b=2,"),
            Ok(vec![member("a", "1"), member("b", "2")])
        );
    }

    #[test]
    fn baggage_value_may_be_empty_or_contain_equals() {
        assert_eq!(
            parse_baggage("a=,b=YWJj=="),
            Ok(vec![member("a", ""), member("b", "YWJj==")])
        );
    }

    #[test]
    fn baggage_values_are_percent_decoded_as_utf8() {
        assert_eq!(
            parse_baggage("k=caf%C3%A9%3B%2c"),
            Ok(vec![member("k", "café;,")])
        );
        let parsed = parse_baggage("k=v;p=a%20b").unwrap();
        assert_eq!(parsed[0].properties, vec![("p".into(), Some("a b".into()))]);
    }

    #[test]
    fn baggage_keys_are_not_decoded() {
        assert_eq!(parse_baggage("a%20b=1"), Ok(vec![member("a%20b", "1")]));
    }

    #[test]
    fn baggage_invalid_percent_escapes_are_errors() {
        for bad in ["k=%", "k=%2", "k=%zz", "k=ok%g0", "k=v;p=%"] {
            assert_eq!(
                parse_baggage(bad),
                Err(malformed(1, "a value has an invalid percent-escape")),
                "{bad}"
            );
        }
        assert_eq!(
            parse_baggage("k=%FF"),
            Err(malformed(1, "a value is not UTF-8 once percent-decoded"))
        );
    }

    #[test]
    fn baggage_grammar_errors_name_the_member() {
        let cases = [
            ("a=1,=2", malformed(2, "the key is not a token")),
            ("a=1,b", malformed(2, "no '=' after the key")),
            ("a b=1", malformed(1, "the key is not a token")),
            (
                "k=v w",
                malformed(1, "a value has a character outside baggage-octet"),
            ),
            (
                "k=\"q\"",
                malformed(1, "a value has a character outside baggage-octet"),
            ),
            (
                "k=a\\b",
                malformed(1, "a value has a character outside baggage-octet"),
            ),
            (
                "k=café",
                malformed(1, "a value has a character outside baggage-octet"),
            ),
            ("k=v;", malformed(1, "a property key is not a token")),
            ("k=v;=x", malformed(1, "a property key is not a token")),
            ("k=v;p q", malformed(1, "a property key is not a token")),
            (
                ",,k=v;p=x y",
                malformed(3, "a value has a character outside baggage-octet"),
            ),
        ];
        for (input, err) in cases {
            assert_eq!(parse_baggage(input), Err(err), "{input:?}");
        }
    }

    #[test]
    fn baggage_allows_180_members_and_no_more() {
        let list = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(parse_baggage(&list(180)).unwrap().len(), 180);
        assert_eq!(parse_baggage(&list(181)), Err(BaggageError::TooManyMembers));
        // Empty list-members do not count.
        assert_eq!(
            parse_baggage(&format!("{},,,", list(180))).unwrap().len(),
            180
        );
    }

    #[test]
    fn baggage_allows_8192_bytes_and_no_more() {
        let exact = format!("k={}", "v".repeat(MAX_BAGGAGE_BYTES - 2));
        assert_eq!(parse_baggage(&exact).unwrap().len(), 1);
        let over = format!("{exact}v");
        assert_eq!(
            parse_baggage(&over),
            Err(BaggageError::TooLong {
                len: MAX_BAGGAGE_BYTES + 1
            })
        );
    }

    // --- parse_tracestate ------------------------------------------------------------------

    fn ts(pairs: &[(&str, &str)]) -> Result<Vec<(String, String)>, TraceStateError> {
        Ok(pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    fn ts_err(
        member: usize,
        reason: &'static str,
    ) -> Result<Vec<(String, String)>, TraceStateError> {
        Err(TraceStateError::Malformed { member, reason })
    }

    #[test]
    fn tracestate_members_in_order() {
        assert_eq!(
            parse_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ts(&[("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")])
        );
    }

    #[test]
    fn tracestate_vendor_keys() {
        assert_eq!(
            parse_tracestate("fw529a3039@dt=Zm9v,1tenant@sys-1=x,a_-*/z=y,0start=z"),
            ts(&[
                ("fw529a3039@dt", "Zm9v"),
                ("1tenant@sys-1", "x"),
                ("a_-*/z", "y"),
                ("0start", "z"),
            ])
        );
    }

    #[test]
    fn tracestate_key_rules() {
        let simple_max = "a".repeat(256);
        assert!(parse_tracestate(&format!("{simple_max}=v")).is_ok());
        let bad_keys = [
            "Upper".to_string(),
            "-lead".into(),
            "a b".into(),
            "a".repeat(257),
            "t@".into(),
            "@s".into(),
            "t@1sys".into(),
            "t@s@x".into(),
            format!("t@{}", "s".repeat(15)),
            format!("{}@s", "t".repeat(242)),
        ];
        for k in bad_keys {
            assert_eq!(
                parse_tracestate(&format!("{k}=v")),
                ts_err(1, "invalid key"),
                "{k}"
            );
        }
    }

    #[test]
    fn tracestate_value_rules() {
        assert_eq!(parse_tracestate("k= lead ~!"), ts(&[("k", " lead ~!")]));
        assert!(parse_tracestate(&format!("k={}", "v".repeat(256))).is_ok());
        for bad in ["k=", "k=a=b", "k=caf\u{e9}", "k=\x7f"] {
            assert_eq!(parse_tracestate(bad), ts_err(1, "invalid value"), "{bad:?}");
        }
        let too_long = format!("k={}", "v".repeat(257));
        assert_eq!(parse_tracestate(&too_long), ts_err(1, "invalid value"));
    }

    #[test]
    fn tracestate_whitespace_around_commas_and_empty_members() {
        assert_eq!(
            parse_tracestate(" a=1 ,\t, b=2\t,"),
            ts(&[("a", "1"), ("b", "2")])
        );
        assert_eq!(parse_tracestate("a =1"), ts_err(1, "invalid key"));
        assert_eq!(parse_tracestate("a,b=1"), ts_err(1, "no '=' after the key"));
    }

    #[test]
    fn tracestate_allows_32_members_and_no_more() {
        let list = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(parse_tracestate(&list(32)).unwrap().len(), 32);
        assert_eq!(
            parse_tracestate(&list(33)),
            Err(TraceStateError::TooManyMembers)
        );
    }
}
