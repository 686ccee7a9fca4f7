//! `detect` and `detect_declared_http` never panic, always decide within `MAX_SNIFF` bytes, and
//! never change their verdict when more bytes arrive.

#![no_main]

use libfuzzer_sys::fuzz_target;
use redirect_l7::detect::{MAX_SNIFF, Protocol, detect, detect_declared_http};

fn check(data: &[u8], f: fn(&[u8]) -> Option<Protocol>) {
    let full = f(data);
    if data.len() >= MAX_SNIFF {
        assert!(full.is_some(), "undecided after {} bytes", data.len());
    }
    // Feed the input byte by byte: the first verdict is the one every longer prefix gets.
    let mut first = None;
    for n in 0..=data.len() {
        let v = f(&data[..n]);
        match first {
            None => first = v,
            Some(p) => assert_eq!(v, Some(p), "verdict changed at {n} bytes"),
        }
        if n > MAX_SNIFF {
            break;
        }
    }
    assert_eq!(full, first);
}

fuzz_target!(|data: &[u8]| {
    check(data, detect);
    check(data, detect_declared_http);
});
