//! `extract_key` never panics on any request headers, and a key it returns is a valid routing
//! key. The input is a header block, one `name: value` a line, so seeds stay readable.

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use redirect_l7::{
    key::{KeyConfig, extract_key},
    validate_routing_key,
};

fn header_map(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    headers
}

fuzz_target!(|data: &[u8]| {
    let headers = header_map(data);
    let configs = [
        KeyConfig::default(),
        KeyConfig {
            headers: vec!["x-routing-key".into(), "Mirrord-Session".into()],
            baggage: vec!["routing-key".into(), "sd-routing-key".into()],
            tracestate: vec!["routing-key".into(), "redirect@acme".into()],
        },
    ];
    for cfg in &configs {
        match extract_key(cfg, &headers) {
            Ok(Some(key)) => assert!(validate_routing_key(&key).is_ok(), "{key:?}"),
            Ok(None) => {}
            Err(e) => {
                assert!(!e.metric_label().is_empty());
                let _ = e.to_string();
            }
        }
    }
});
