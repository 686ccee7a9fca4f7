//! `parse_request` and `parse_response` never panic; a head they accept keeps its framing when
//! forwarded (the hop-by-hop lines left out by range parse again to the same body and key), and
//! an incomplete head stays incomplete or becomes a verdict as bytes arrive, never a different one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use redirect_l7::{
    head::{Limits, copy_without, parse_request, parse_response},
    key::KeyConfig,
};

const LIMITS: Limits = Limits {
    max_bytes: 4096,
    max_headers: 32,
};

fuzz_target!(|data: &[u8]| {
    let keys = KeyConfig::default();
    if let Ok(Some(r)) = parse_request(data, LIMITS, &keys) {
        assert!(r.len <= data.len());
        let mut at = 0;
        for d in &r.drop {
            assert!(at <= d.start && d.start < d.end && d.end <= r.len, "{:?}", r.drop);
            at = d.end;
        }
        let mut out = Vec::new();
        copy_without(data, r.len, &r.drop, &mut out);
        let again = parse_request(&out, LIMITS, &keys)
            .expect("a forwarded head parses")
            .expect("a forwarded head is complete");
        assert_eq!(again.len, out.len());
        assert_eq!(again.body, r.body);
        assert_eq!(again.head_method, r.head_method);
        assert!(again.drop.is_empty(), "hop-by-hop lines left: {:?}", again.drop);
        if r.special.is_none() {
            assert_eq!(again.key.is_ok(), r.key.is_ok());
        }
        // A prefix of a complete head is never refused for something else than its size.
        for n in [r.len / 2, r.len.saturating_sub(1)] {
            if let Err(e) = parse_request(&data[..n], LIMITS, &keys) {
                panic!("a prefix of an accepted head refused: {e}");
            }
        }
    }
    for head_method in [false, true] {
        if let Ok(Some(r)) = parse_response(data, LIMITS, head_method) {
            assert!(r.end_of_fields < r.len && r.len <= data.len());
            for d in &r.drop {
                assert!(d.end <= r.end_of_fields + 2);
            }
        }
    }
});
