//! `parse_baggage` never panics, and what it accepts is sane: keys are tokens found in the input,
//! and serializing the members again (values percent-encoded) parses back to the same members.

#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use redirect_l7::key::{
    BaggageError, BaggageMember, MAX_BAGGAGE_BYTES, MAX_BAGGAGE_MEMBERS, parse_baggage,
};

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn serialize(members: &[BaggageMember]) -> String {
    let enc = |v: &str| utf8_percent_encode(v, NON_ALPHANUMERIC).to_string();
    members
        .iter()
        .map(|m| {
            let mut s = format!("{}={}", m.key, enc(&m.value));
            for (k, v) in &m.properties {
                s.push(';');
                s.push_str(k);
                if let Some(v) = v {
                    s.push('=');
                    s.push_str(&enc(v));
                }
            }
            s
        })
        .collect::<Vec<_>>()
        .join(",")
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(members) = parse_baggage(input) else {
        return;
    };
    assert!(input.len() <= MAX_BAGGAGE_BYTES);
    assert!(members.len() <= MAX_BAGGAGE_MEMBERS);
    for m in &members {
        for key in std::iter::once(&m.key).chain(m.properties.iter().map(|(k, _)| k)) {
            assert!(!key.is_empty() && key.chars().all(is_tchar), "key {key:?}");
            assert!(input.contains(key.as_str()), "key {key:?} not in the input");
        }
    }
    let again = serialize(&members);
    match parse_baggage(&again) {
        Ok(reparsed) => assert_eq!(reparsed, members, "{again:?}"),
        Err(BaggageError::TooLong { .. }) => assert!(again.len() > MAX_BAGGAGE_BYTES),
        Err(e) => panic!("{again:?} does not parse again: {e}"),
    }
});
