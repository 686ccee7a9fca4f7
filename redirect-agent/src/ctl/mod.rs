//! `redirectctl`: the node's debugging commands, one module per noun. Every command reads the
//! pinned maps directly (so it works while the agent is down) and adds names from the agent's
//! admin API when it answers. Output is a table by default and JSON with `-o json`; the JSON
//! documents carry a `schema` field and are described in `docs/debugging.md`.

pub mod client;
pub mod conns;
pub mod counters;
pub mod endpoints;
pub mod explain;
pub mod names;
pub mod routes;
pub mod sandboxes;
pub mod services;
pub mod status;
pub mod table;
pub mod trace;
pub mod workloads;

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::sync::MapError;

pub use client::AdminClient;
pub use names::Names;

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// What every command needs.
pub struct Ctx {
    pub pin_dir: PathBuf,
    pub admin: AdminClient,
    pub format: Format,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Map(#[from] MapError),
    #[error(transparent)]
    Trace(#[from] crate::loader::inspect::TraceError),
    #[error("{0}")]
    Input(String),
    #[error(
        "nothing pinned at {0}: the agent never ran here, or `redirect-agent cleanup` removed everything (pass --pin-dir if the agent uses another directory)"
    )]
    NotPinned(PathBuf),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CtlError {
    /// Bounded label for the `kind` of an [`ErrorDoc`].
    pub fn kind(&self) -> &'static str {
        match self {
            CtlError::Map(_) => "map",
            CtlError::Trace(_) => "trace",
            CtlError::Input(_) => "input",
            CtlError::NotPinned(_) => "not_pinned",
            CtlError::Io(_) => "io",
        }
    }
}

/// `schema` of [`ErrorDoc`].
pub const ERROR_SCHEMA: &str = "redirectctl.error/v1";

/// What a command that fails prints with `-o json`: one document on stdout, where its result
/// would have gone, so a script reading stdout always gets JSON (the exit status still says it
/// failed).
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ErrorDoc {
    pub schema: String,
    /// `usage` (bad arguments), `not_root`, `admin_address`, `admin_token`, or a
    /// [`CtlError::kind`].
    pub kind: String,
    pub error: String,
}

impl ErrorDoc {
    pub fn new(kind: &str, error: impl std::fmt::Display) -> Self {
        ErrorDoc {
            schema: ERROR_SCHEMA.into(),
            kind: kind.into(),
            error: error.to_string(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| {
            // Only strings inside: serialising cannot fail; keep stdout JSON regardless.
            format!(
                "{{\"schema\":\"{ERROR_SCHEMA}\",\"kind\":\"{}\"}}",
                self.kind
            )
        })
    }
}

/// Whether the command line (or `REDIRECTCTL_OUTPUT`) asks for JSON, read without the argument
/// parser: an argument error must be reported in the format asked for, before the arguments
/// parse. The last `-o`/`--output` wins, as it does in the parser.
pub fn json_requested(args: &[String], env: Option<&str>) -> bool {
    let mut json = env.is_some_and(|v| v.eq_ignore_ascii_case("json"));
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        let value = match a.as_str() {
            "-o" | "--output" => it.next().map(String::as_str),
            _ => a
                .strip_prefix("--output=")
                .or_else(|| a.strip_prefix("-o="))
                .or_else(|| a.strip_prefix("-o").filter(|v| !v.is_empty())),
        };
        if let Some(v) = value {
            json = v.eq_ignore_ascii_case("json");
        }
    }
    json
}

impl Ctx {
    /// Fails with a clear message when the pin directory is missing.
    pub fn require_pins(&self) -> Result<(), CtlError> {
        if self.pin_dir.is_dir() {
            Ok(())
        } else {
            Err(CtlError::NotPinned(self.pin_dir.clone()))
        }
    }

    /// Prints `doc` as JSON, or `table()` as text.
    pub fn print<T: serde::Serialize>(&self, doc: &T, table: impl FnOnce() -> String) {
        match self.format {
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(doc).unwrap_or_else(|e| format!("\"{e}\""))
            ),
            Format::Table => print!("{}", table()),
        }
    }
}

/// The line every table output starts with when names are missing.
pub fn agent_note(names: &Names) -> String {
    match &names.error {
        None => String::new(),
        Some(e) => format!("(names unavailable: agent admin API {e})\n"),
    }
}

/// `2025-01-31T12:00:00Z` (UTC, whole seconds; times before 1970 print as 1970-01-01).
pub fn fmt_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // Beyond jiff's range (year 9999) only on a broken clock.
    let ts = jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::MAX);
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `3s`, `4m12s`, `2h3m`, `5d2h`.
pub fn fmt_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    crate::admin::unix_ms(t)
}

/// A `SystemTime` for a CLOCK_MONOTONIC timestamp in ns (as the kernel's `bpf_ktime_get_ns`).
pub fn mono_to_system(ns: u64) -> SystemTime {
    let now_mono = crate::loader::monotonic_ns();
    let now = SystemTime::now();
    if ns <= now_mono {
        now - Duration::from_nanos(now_mono - ns)
    } else {
        now + Duration::from_nanos(ns - now_mono)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("redirectctl")
            .chain(a.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn json_is_requested_by_any_spelling_of_the_output_flag_or_its_env_twin() {
        for a in [
            &["-o", "json", "status"][..],
            &["-ojson", "status"],
            &["-o=json", "status"],
            &["status", "--output", "json"],
            &["--output=json", "explain", "--to", "x"],
            &["-o", "table", "-o", "json"],
        ] {
            assert!(json_requested(&args(a), None), "{a:?}");
        }
        assert!(json_requested(&args(&["status"]), Some("json")));
        for a in [
            &["status"][..],
            &["-o", "table"],
            &["-o", "json", "-o", "table"],
            &["--", "-o", "json"],
            &["-o"],
        ] {
            assert!(!json_requested(&args(a), None), "{a:?}");
        }
        assert!(!json_requested(&args(&["-o", "table"]), Some("json")));
    }

    #[test]
    fn an_error_document_names_schema_kind_and_error() {
        let e = CtlError::NotPinned(PathBuf::from("/sys/fs/bpf/x"));
        let doc = ErrorDoc::new(e.kind(), &e);
        let back: ErrorDoc = serde_json::from_str(&doc.to_json()).unwrap();
        assert_eq!(back.schema, "redirectctl.error/v1");
        assert_eq!(back.kind, "not_pinned");
        assert!(back.error.starts_with("nothing pinned at /sys/fs/bpf/x"));
    }

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(fmt_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // leap year, after Feb 29
        assert_eq!(fmt_time(t), "2024-02-29T12:34:56Z");
        for (secs, want) in [
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_767_225_599, "2025-12-31T23:59:59Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
        ] {
            assert_eq!(fmt_time(UNIX_EPOCH + Duration::from_secs(secs)), want);
        }
        // Whole seconds; before 1970 prints as the epoch.
        assert_eq!(
            fmt_time(UNIX_EPOCH + Duration::from_millis(1_999)),
            "1970-01-01T00:00:01Z"
        );
        assert_eq!(
            fmt_time(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(fmt_age(Duration::from_secs(252)), "4m12s");
    }
}
