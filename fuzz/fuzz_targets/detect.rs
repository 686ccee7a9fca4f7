//! `detect` never panics, always decides within `MAX_SNIFF` bytes, and never changes its verdict
//! when more bytes arrive.

#![no_main]

use libfuzzer_sys::fuzz_target;
use redirect_l7::detect::{MAX_SNIFF, detect};

fuzz_target!(|data: &[u8]| {
    let full = detect(data);
    if data.len() >= MAX_SNIFF {
        assert!(full.is_some(), "undecided after {} bytes", data.len());
    }
    // Feed the input byte by byte: the first verdict is the one every longer prefix gets.
    let mut first = None;
    for n in 0..=data.len() {
        let v = detect(&data[..n]);
        match first {
            None => first = v,
            Some(f) => assert_eq!(v, Some(f), "verdict changed at {n} bytes"),
        }
        if n > MAX_SNIFF {
            break;
        }
    }
    assert_eq!(full, first);
});
