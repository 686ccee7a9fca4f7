//! Where a chunked HTTP/1.1 body ends (RFC 9112 7.1), found while its bytes pass through
//! unchanged: the router forwards chunk framing as received and only needs to know where one
//! message stops and the next begins. Strict: CRLF line ends only, hexadecimal sizes that fit
//! in 60 bits, bounded extension and trailer lines; anything else is an error, so a body the
//! router and the upstream could frame differently is never forwarded whole.

/// Longest chunk-size line (size and extensions) accepted.
pub const MAX_SIZE_LINE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size {
        digits: u8,
    },
    /// After the size: extensions (skipped) until CR.
    Ext,
    /// CR of the size line seen, LF expected.
    SizeLf,
    /// Data bytes left in the current chunk.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    /// CR of the final empty line seen.
    EndLf,
    Done,
}

/// Why a chunked body cannot be framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk size is not hexadecimal")]
    BadSize,
    #[error("chunk size over 60 bits")]
    SizeTooLarge,
    #[error("chunk size line over {MAX_SIZE_LINE} bytes")]
    LineTooLong,
    #[error("chunk line not ended by CRLF")]
    BadLineEnd,
    #[error("chunk data not followed by CRLF")]
    BadDataEnd,
    #[error("trailer fields over {0} bytes")]
    TrailersTooLong(usize),
}

/// The framing state of one chunked body.
#[derive(Clone, Debug)]
pub struct Chunked {
    state: State,
    size: u64,
    line: usize,
    trailers: usize,
    max_trailers: usize,
}

impl Chunked {
    /// A body whose trailer section may hold at most `max_trailers` bytes.
    pub fn new(max_trailers: usize) -> Self {
        Chunked {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
            trailers: 0,
            max_trailers,
        }
    }

    /// Whether the body has ended.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes the next bytes of the stream: how many of them belong to the body (all of them
    /// unless it ended inside `buf`; what follows is the next message).
    pub fn feed(&mut self, buf: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Done => return Ok(i),
                State::Data(left) => {
                    let n = (buf.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::Size { digits } => {
                    self.size_line()?;
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            if digits >= 15 {
                                return Err(ChunkError::SizeTooLarge);
                            }
                            let d = (b as char).to_digit(16).unwrap_or(0);
                            self.size = self.size * 16 + u64::from(d);
                            self.state = State::Size { digits: digits + 1 };
                        }
                        _ if digits == 0 => return Err(ChunkError::BadSize),
                        b'\r' => self.state = State::SizeLf,
                        // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
                        b';' | b' ' | b'\t' => self.state = State::Ext,
                        _ => return Err(ChunkError::BadSize),
                    }
                }
                State::Ext => {
                    self.size_line()?;
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' => return Err(ChunkError::BadLineEnd),
                        _ => {}
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.line = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data(self.size)
                    };
                    self.size = 0;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadDataEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadDataEnd);
                    }
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    self.state = match b {
                        // The final empty line: not a trailer.
                        b'\r' => State::EndLf,
                        b'\n' => return Err(ChunkError::BadLineEnd),
                        _ => {
                            self.trailer_byte()?;
                            State::TrailerLine
                        }
                    };
                }
                State::TrailerLine => {
                    self.trailer_byte()?;
                    match b {
                        b'\r' => self.state = State::TrailerLf,
                        b'\n' => return Err(ChunkError::BadLineEnd),
                        _ => {}
                    }
                }
                State::TrailerLf => {
                    self.trailer_byte()?;
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
    }

    fn size_line(&mut self) -> Result<(), ChunkError> {
        self.line += 1;
        if self.line > MAX_SIZE_LINE {
            return Err(ChunkError::LineTooLong);
        }
        Ok(())
    }

    fn trailer_byte(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > self.max_trailers {
            return Err(ChunkError::TrailersTooLong(self.max_trailers));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; the body's length and whether it ended.
    fn frame(input: &[u8], step: usize) -> Result<(usize, bool), ChunkError> {
        let mut c = Chunked::new(1024);
        let mut taken = 0;
        for piece in input.chunks(step) {
            let n = c.feed(piece)?;
            taken += n;
            if c.done() {
                break;
            }
            assert_eq!(n, piece.len(), "a body still open takes all it is given");
        }
        Ok((taken, c.done()))
    }

    #[test]
    fn finds_the_end_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n1a;name=v\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        for step in 1..=input.len() {
            assert_eq!(frame(&input, step), Ok((body.len(), true)), "step {step}");
        }
    }

    #[test]
    fn trailers_belong_to_the_body() {
        let body = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n";
        assert_eq!(frame(body, 4), Ok((body.len(), true)));
        let mut c = Chunked::new(10);
        assert_eq!(
            c.feed(b"0\r\nx-long-trailer: 1\r\n\r\n"),
            Err(ChunkError::TrailersTooLong(10))
        );
    }

    #[test]
    fn an_unfinished_body_is_not_done() {
        assert_eq!(frame(b"5\r\nhel", 3), Ok((6, false)));
        assert_eq!(frame(b"0\r\n", 3), Ok((3, false)));
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for (input, want) in [
            (&b"zz\r\nworld\r\n"[..], ChunkError::BadSize),
            (b"\r\n", ChunkError::BadSize),
            (b"-1\r\n", ChunkError::BadSize),
            (b"5\nhello\r\n", ChunkError::BadSize),
            (b"5;x\nhello", ChunkError::BadLineEnd),
            (b"5\rxhello", ChunkError::BadLineEnd),
            (b"5\r\nhelloX\r\n", ChunkError::BadDataEnd),
            (b"5\r\nhello\rX", ChunkError::BadDataEnd),
            (b"1000000000000000\r\n", ChunkError::SizeTooLarge),
            (b"0\r\nx: 1\n\r\n", ChunkError::BadLineEnd),
            (b"0\r\n\n", ChunkError::BadLineEnd),
            (b"0\r\n\rX", ChunkError::BadLineEnd),
        ] {
            assert_eq!(
                frame(input, 1),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(frame(input, input.len()), Err(want));
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_SIZE_LINE));
        assert_eq!(frame(long.as_bytes(), 64), Err(ChunkError::LineTooLong));
    }

    #[test]
    fn a_body_without_trailers_needs_no_trailer_room() {
        let mut c = Chunked::new(0);
        assert_eq!(c.feed(b"1\r\na\r\n0\r\n\r\n"), Ok(11));
        assert!(c.done());
    }

    #[test]
    fn the_largest_size_is_accepted() {
        let mut c = Chunked::new(0);
        assert_eq!(c.feed(b"fffffffffffffff\r\nab"), Ok(19));
        assert!(!c.done());
    }
}
