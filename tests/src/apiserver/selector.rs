//! Label and field selectors, parsed as `k8s.io/apimachinery` parses them.
//!
//! Labels: comma-joined requirements `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
//! `k`, `!k`, `k>1`, `k<1`; keys and values are checked against the label syntax. `!=` and
//! `notin` also match objects without the label.
//!
//! Fields: comma-joined `path=v`, `path==v`, `path!=v` with `\,` `\=` `\\` escapes. Which
//! paths a resource supports is the caller's business ([`FieldSelector::fields`]); a missing
//! field compares as the empty string, as for an unset string field in the real server.

use serde_json::{Map, Value};

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    GreaterThan(i64),
    LessThan(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Equals,
    DoubleEquals,
    NotEquals,
    Bang,
    Open,
    Close,
    Comma,
    Greater,
    Less,
}

fn lex(s: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            ',' => Token::Comma,
            '(' => Token::Open,
            ')' => Token::Close,
            '>' => Token::Greater,
            '<' => Token::Less,
            '=' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::DoubleEquals
            }
            '=' => Token::Equals,
            '!' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::NotEquals
            }
            '!' => Token::Bang,
            c => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || ",()<>=!".contains(n) {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                Token::Word(word)
            }
        };
        out.push(token);
    }
    out
}

/// `[a-zA-Z0-9]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?`, at most 63 characters.
fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `[prefix/]name`, the prefix a DNS subdomain.
fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|p| {
                    !p.is_empty()
                        && p.bytes()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                })
                && is_label_name(name)
        }
        None => is_label_name(s),
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn key(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Token::Word(k)) if is_label_key(&k) => Ok(k),
            Some(Token::Word(k)) => Err(format!("invalid label key {k:?}")),
            other => Err(format!("expected a label key, found {other:?}")),
        }
    }

    /// A value after `=`, `==` or `!=`: empty when the requirement ends there.
    fn value(&mut self) -> Result<String, String> {
        match self.peek() {
            None | Some(Token::Comma) => Ok(String::new()),
            Some(Token::Word(_)) => {
                let Some(Token::Word(v)) = self.next() else {
                    unreachable!("peeked a word")
                };
                if is_label_value(&v) {
                    Ok(v)
                } else {
                    Err(format!("invalid label value {v:?}"))
                }
            }
            Some(other) => Err(format!("expected a label value, found {other:?}")),
        }
    }

    fn number(&mut self) -> Result<i64, String> {
        match self.next() {
            Some(Token::Word(v)) => v.parse().map_err(|_| format!("{v:?} is not an integer")),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }

    fn set(&mut self) -> Result<Vec<String>, String> {
        if self.next() != Some(Token::Open) {
            return Err("expected '(' after in/notin".into());
        }
        let mut values = Vec::new();
        loop {
            match self.next() {
                Some(Token::Close) => break,
                Some(Token::Comma) => {}
                Some(Token::Word(v)) if is_label_value(&v) => values.push(v),
                Some(Token::Word(v)) => return Err(format!("invalid label value {v:?}")),
                other => return Err(format!("expected a value or ')', found {other:?}")),
            }
        }
        if values.is_empty() {
            return Err("in/notin needs at least one value".into());
        }
        Ok(values)
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        if self.peek() == Some(&Token::Bang) {
            self.next();
            let key = self.key()?;
            return Ok(Requirement {
                key,
                op: Op::DoesNotExist,
            });
        }
        let key = self.key()?;
        let op = match self.peek() {
            None | Some(Token::Comma) => Op::Exists,
            Some(Token::Equals | Token::DoubleEquals) => {
                self.next();
                Op::Equals(self.value()?)
            }
            Some(Token::NotEquals) => {
                self.next();
                Op::NotEquals(self.value()?)
            }
            Some(Token::Greater) => {
                self.next();
                Op::GreaterThan(self.number()?)
            }
            Some(Token::Less) => {
                self.next();
                Op::LessThan(self.number()?)
            }
            Some(Token::Word(w)) if w == "in" => {
                self.next();
                Op::In(self.set()?)
            }
            Some(Token::Word(w)) if w == "notin" => {
                self.next();
                Op::NotIn(self.set()?)
            }
            Some(other) => return Err(format!("unexpected {other:?} after key {key:?}")),
        };
        Ok(Requirement { key, op })
    }
}

impl LabelSelector {
    /// Parses a `labelSelector` query value; the error is the message of a 400 answer.
    pub(crate) fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut p = Parser {
            tokens: lex(s),
            pos: 0,
        };
        let mut reqs = Vec::new();
        while p.peek().is_some() {
            reqs.push(
                p.requirement()
                    .map_err(|e| format!("unable to parse requirement: {e}"))?,
            );
            match p.next() {
                None | Some(Token::Comma) => {}
                Some(t) => {
                    return Err(format!(
                        "unable to parse requirement: expected ',' found {t:?}"
                    ));
                }
            }
        }
        Ok(LabelSelector(reqs))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether labels (the `metadata.labels` object, None when absent) satisfy every
    /// requirement.
    pub(crate) fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| {
            let v = get(&r.key);
            match &r.op {
                Op::Equals(want) => v == Some(want.as_str()),
                Op::NotEquals(want) => v != Some(want.as_str()),
                Op::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                Op::NotIn(set) => !v.is_some_and(|v| set.iter().any(|s| s == v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::GreaterThan(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::LessThan(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

/// A parsed `fieldSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<FieldTerm>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    value: String,
    equal: bool,
}

/// Splits at unescaped `sep` characters.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(e @ ('\\' | ',' | '=')) => out.push(e),
            Some(e) => return Err(format!("invalid escape sequence \\{e} in {s:?}")),
            None => return Err(format!("trailing backslash in {s:?}")),
        }
    }
    Ok(out)
}

impl FieldSelector {
    /// Parses a `fieldSelector` query value; the error is the message of a 400 answer.
    pub(crate) fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in split_unescaped(s, ',') {
            if term.trim().is_empty() {
                continue;
            }
            let (field, value, equal) = split_term(term)
                .ok_or_else(|| format!("invalid selector: {s:?}; can't understand {term:?}"))?;
            terms.push(FieldTerm {
                field: field.trim().to_string(),
                value: unescape(value).map_err(|e| format!("invalid field selector: {e}"))?,
                equal,
            });
        }
        Ok(FieldSelector(terms))
    }

    /// The field paths named, for the supported-field check.
    pub(crate) fn fields(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|t| t.field.as_str())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0
            .iter()
            .all(|t| (field_value(obj, &t.field) == t.value) == t.equal)
    }
}

/// `field`, `value`, is-equality of `path=value`, `path==value` or `path!=value`: the first
/// unescaped operator wins.
fn split_term(term: &str) -> Option<(&str, &str, bool)> {
    let mut escaped = false;
    for (i, c) in term.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        let rest = &term[i..];
        if c == '\\' {
            escaped = true;
        } else if rest.starts_with("!=") {
            return Some((&term[..i], &term[i + 2..], false));
        } else if rest.starts_with("==") {
            return Some((&term[..i], &term[i + 2..], true));
        } else if c == '=' {
            return Some((&term[..i], &term[i + 1..], true));
        }
    }
    None
}

/// The value of a dotted path as a field selector compares it: strings as they are, numbers
/// and booleans printed, anything missing or null as "".
pub(crate) fn field_value(obj: &Value, path: &str) -> String {
    let mut v = obj;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn equality_requirements_match_like_kubernetes() {
        let l = labels(json!({"app": "web", "tier": "front"}));
        assert!(sel("app=web").matches(Some(&l)));
        assert!(sel("app==web,tier=front").matches(Some(&l)));
        assert!(!sel("app=web,tier=back").matches(Some(&l)));
        assert!(sel("app != db").matches(Some(&l)));
        assert!(!sel("app!=web").matches(Some(&l)));
        // != matches an object without the label.
        assert!(sel("missing!=x").matches(Some(&l)));
        assert!(sel("missing!=x").matches(None));
    }

    #[test]
    fn set_requirements_and_existence() {
        let l = labels(json!({"env": "prod", "team": "a"}));
        assert!(sel("env in (prod, staging)").matches(Some(&l)));
        assert!(!sel("env in (dev)").matches(Some(&l)));
        assert!(sel("env notin (dev,qa)").matches(Some(&l)));
        assert!(sel("other notin (dev)").matches(Some(&l)));
        assert!(!sel("env notin (prod)").matches(Some(&l)));
        assert!(sel("team").matches(Some(&l)));
        assert!(!sel("!team").matches(Some(&l)));
        assert!(sel("!other, env in (prod)").matches(Some(&l)));
        assert!(!sel("other").matches(None));
        assert!(sel("").matches(None));
    }

    #[test]
    fn numeric_comparisons_need_integer_labels() {
        let l = labels(json!({"replicas": "3", "name": "x"}));
        assert!(sel("replicas>2").matches(Some(&l)));
        assert!(!sel("replicas<3").matches(Some(&l)));
        assert!(!sel("name>1").matches(Some(&l)));
    }

    #[test]
    fn prefixed_keys_and_empty_values_parse() {
        let l = labels(json!({"app.kubernetes.io/name": "web", "flag": ""}));
        assert!(sel("app.kubernetes.io/name=web").matches(Some(&l)));
        assert!(sel("flag=").matches(Some(&l)));
        assert!(sel("flag=,app.kubernetes.io/name").matches(Some(&l)));
    }

    #[test]
    fn malformed_label_selectors_are_rejected() {
        for bad in [
            "a=b=c",
            "a in b",
            "a in ()",
            "a in (b",
            "=b",
            "a b",
            "-bad=x",
            "a=b,,",
            "a>x",
            "a=b c",
            "a=-b-",
            "UPPER.Prefix/x=1",
        ] {
            let r = LabelSelector::parse(bad);
            assert!(r.is_err(), "{bad:?} parsed as {r:?}");
            assert!(r.unwrap_err().starts_with("unable to parse requirement"));
        }
    }

    #[test]
    fn field_selectors_compare_paths_as_strings() {
        let pod = json!({
            "metadata": {"name": "p1", "namespace": "default"},
            "spec": {"nodeName": "n1", "hostNetwork": true},
            "status": {"phase": "Running"},
        });
        let ok = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(ok("spec.nodeName=n1"));
        assert!(ok("spec.nodeName==n1,status.phase=Running"));
        assert!(!ok("spec.nodeName!=n1"));
        assert!(ok("metadata.name=p1,metadata.namespace=default"));
        assert!(ok("spec.hostNetwork=true"));
        assert!(ok("spec.schedulerName="));
        assert!(!ok("status.phase=Pending"));
        assert!(ok(""));
    }

    #[test]
    fn field_selector_escapes_and_errors() {
        let obj = json!({"metadata": {"name": "a,b=c"}});
        let s = FieldSelector::parse(r"metadata.name=a\,b\=c").unwrap();
        assert!(s.matches(&obj));
        assert_eq!(s.fields().collect::<Vec<_>>(), ["metadata.name"]);
        assert!(FieldSelector::parse("spec.nodeName").is_err());
        assert!(FieldSelector::parse(r"a=\x").is_err());
        assert!(FieldSelector::parse("a=b,c").is_err());
    }
}
