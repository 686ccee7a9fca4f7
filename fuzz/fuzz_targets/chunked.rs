//! `Chunked::feed` never panics, and where a body ends does not depend on how its bytes are
//! split across reads.

#![no_main]

use libfuzzer_sys::fuzz_target;
use redirect_l7::chunked::Chunked;

fn frame(data: &[u8], step: usize) -> Result<(usize, bool), redirect_l7::chunked::ChunkError> {
    let mut c = Chunked::new(256);
    let mut taken = 0;
    for piece in data.chunks(step.max(1)) {
        let n = c.feed(piece)?;
        assert!(n <= piece.len());
        taken += n;
        if c.done() {
            break;
        }
        assert_eq!(n, piece.len());
    }
    Ok((taken, c.done()))
}

fuzz_target!(|input: (u8, &[u8])| {
    let (step, data) = input;
    let whole = frame(data, data.len());
    let split = frame(data, usize::from(step));
    assert_eq!(whole, split, "split every {step} bytes");
});
