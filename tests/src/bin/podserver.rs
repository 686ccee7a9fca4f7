//! Tiny HTTP/1.1 test server for mini-cluster pods (std and clap only).
//!
//! `podserver --name NAME --listen ADDR:PORT [--listen ADDR:PORT ...]`
//!
//! Every response is `200 OK` with header `x-served-by: NAME` and, unless a path below says
//! otherwise, body `NAME\n`:
//! - `GET /peer`: the client address the server saw (`ip:port\n`, IPv6 in brackets).
//! - `/headers` (any method): the request head exactly as received: request line, header
//!   lines in their original case, order and line endings, and the empty line ending the
//!   head (at most 16 KiB), so a test can prove a proxy keeps, and adds, nothing.
//! - `/echo` (any method): streams the request body back as it arrives (a 64 KiB buffer, never
//!   the whole body): `content-length` for a Content-Length request, `transfer-encoding:
//!   chunked` for a chunked one (request trailers are read and dropped), `content-length: 0`
//!   without a body. At most 1 GiB. The client must read while it sends.
//! - `/sleep/<ms>` (any method): waits `ms` (at most 60 s), then answers `NAME\n`.
//! - `/bytes/<n>` (any method): `n` bytes (at most 1 GiB), streamed: byte `i` is
//!   [`PATTERN`]`[i % 63]` (62 letters and digits, then `\n`).
//! - `HEAD` on any path: the headers a `GET` gets (`content-length` included), no body.
//!
//! Keep-alive per HTTP/1.1 (`Connection: close` and HTTP/1.0 honoured); other request bodies
//! (Content-Length or chunked, trailers included) are read and discarded; `Expect:
//! 100-continue` gets `100 Continue`. Prints `listening` once every address is bound.
//! Bounded: at most 512 connections at once, 16 KiB of request head, 8 MiB of body (1 GiB
//! for `/echo`), 30 s idle and 100,000 requests per connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use redirect_tests::server_args::ServerArgs;

const MAX_CONNECTIONS: usize = 512;
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: u64 = 8 * 1024 * 1024;
/// Body limit of `/echo`, and most bytes `/bytes/<n>` sends.
const MAX_STREAM: u64 = 1024 * 1024 * 1024;
const MAX_SLEEP: Duration = Duration::from_secs(60);
const MAX_TRAILERS: usize = 64;
const CHUNK_LINE_LIMIT: usize = 1024;
const BUFFER: usize = 64 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REQUESTS_PER_CONNECTION: u32 = 100_000;
/// One period of the `/bytes/<n>` body.
const PATTERN: &[u8; 63] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n";
/// Tiny HTTP/1.1 test server for mini-cluster pods.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

fn main() {
    let Args {
        server: ServerArgs { name, listen },
    } = Args::parse();
    let listeners: Vec<TcpListener> = listen
        .iter()
        .map(|a| TcpListener::bind(a).unwrap_or_else(|e| fail(&format!("bind {a}: {e}"))))
        .collect();
    println!("listening");
    let _ = io::stdout().flush();
    let name: Arc<str> = name.into();
    let active = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let (name, active) = (name.clone(), active.clone());
            std::thread::spawn(move || accept_loop(l, name, active))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("podserver: {msg}");
    std::process::exit(2)
}

fn accept_loop(listener: TcpListener, name: Arc<str>, active: Arc<AtomicUsize>) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    continue; // dropping the stream closes it
                }
                let (name, active) = (name.clone(), active.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, peer, &name);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            // e.g. EMFILE: back off instead of spinning.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

struct Request {
    method: String,
    target: String,
    http10: bool,
    keep_alive: bool,
    expect_continue: bool,
    framing: Framing,
    /// The head as received, from the request line to the empty line, inclusive.
    head: Vec<u8>,
}

/// What a request gets back.
enum Reply {
    /// A fixed body.
    Body(Vec<u8>),
    /// `n` bytes of [`PATTERN`].
    Pattern(u64),
    /// The request body, streamed back.
    Echo,
}

fn serve(stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let mut req = match read_head(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(bad_request(&mut writer, e)),
        };
        let path = req.target.split('?').next().unwrap_or("").to_string();
        let head_only = req.method == "HEAD";
        let echo = path == "/echo";
        let limit = if echo { MAX_STREAM } else { MAX_BODY };
        if matches!(req.framing, Framing::Length(n) if n > limit) {
            let _ = writer.write_all(
                b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
            return Err(bad("body too large"));
        }
        if req.expect_continue {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut body = Body::new(&mut reader, req.framing, limit);
        let reply = if echo && !head_only {
            Reply::Echo
        } else {
            // Read (and drop) the whole body before answering.
            let received = match io::copy(&mut body, &mut io::sink()) {
                Ok(n) => n,
                Err(e) => return Err(bad_request(&mut writer, e)),
            };
            if echo {
                // `HEAD /echo`: the length a `GET` with this body gets, no body.
                Reply::Pattern(received)
            } else if let Some(ms) = path.strip_prefix("/sleep/") {
                let Ok(ms) = ms.parse::<u64>() else {
                    return Err(bad_request(&mut writer, bad("bad /sleep/<ms>")));
                };
                std::thread::sleep(Duration::from_millis(ms).min(MAX_SLEEP));
                Reply::Body(format!("{name}\n").into_bytes())
            } else if let Some(n) = path.strip_prefix("/bytes/") {
                let Ok(n) = n.parse::<u64>() else {
                    return Err(bad_request(&mut writer, bad("bad /bytes/<n>")));
                };
                Reply::Pattern(n.min(MAX_STREAM))
            } else if path == "/headers" {
                Reply::Body(std::mem::take(&mut req.head))
            } else if path == "/peer" && (req.method == "GET" || head_only) {
                Reply::Body(format!("{peer}\n").into_bytes())
            } else {
                Reply::Body(format!("{name}\n").into_bytes())
            }
        };
        let keep_alive = respond(&mut writer, &req, name, reply, head_only, body)?;
        if !keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// Writes the response; `Ok(false)` when the connection must close.
fn respond(
    writer: &mut TcpStream,
    req: &Request,
    name: &str,
    reply: Reply,
    head_only: bool,
    mut body: Body<'_>,
) -> io::Result<bool> {
    let mut keep_alive = req.keep_alive;
    let content_type = match reply {
        Reply::Body(_) => "text/plain",
        Reply::Pattern(_) | Reply::Echo => "application/octet-stream",
    };
    let mut head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n");
    let mut chunked = false;
    match (&reply, req.framing) {
        (Reply::Body(b), _) => head.push_str(&format!("content-length: {}\r\n", b.len())),
        (Reply::Pattern(n), _) => head.push_str(&format!("content-length: {n}\r\n")),
        (Reply::Echo, Framing::Length(n)) => head.push_str(&format!("content-length: {n}\r\n")),
        // HTTP/1.0 has no chunked responses: the end of the body is the end of the connection.
        (Reply::Echo, Framing::Chunked) if req.http10 => keep_alive = false,
        (Reply::Echo, Framing::Chunked) => {
            head.push_str("transfer-encoding: chunked\r\n");
            chunked = true;
        }
    }
    head.push_str(&format!("x-served-by: {name}\r\n"));
    if !keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    if head_only {
        writer.write_all(head.as_bytes())?;
        return Ok(keep_alive);
    }
    match reply {
        Reply::Body(b) => {
            let mut all = head.into_bytes();
            all.extend_from_slice(&b);
            writer.write_all(&all)?;
        }
        Reply::Pattern(n) => {
            writer.write_all(head.as_bytes())?;
            write_pattern(writer, n)?;
        }
        Reply::Echo => {
            writer.write_all(head.as_bytes())?;
            let mut buf = vec![0u8; BUFFER];
            loop {
                let n = body.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if chunked {
                    writer.write_all(format!("{n:x}\r\n").as_bytes())?;
                    writer.write_all(&buf[..n])?;
                    writer.write_all(b"\r\n")?;
                } else {
                    writer.write_all(&buf[..n])?;
                }
            }
            if chunked {
                writer.write_all(b"0\r\n\r\n")?;
            }
        }
    }
    Ok(keep_alive)
}

fn write_pattern(writer: &mut TcpStream, n: u64) -> io::Result<()> {
    // A whole number of periods, so consecutive writes continue the pattern.
    let block: Vec<u8> = PATTERN
        .iter()
        .copied()
        .cycle()
        .take(PATTERN.len() * 1024)
        .collect();
    let mut left = n;
    while left > 0 {
        let len = left.min(block.len() as u64) as usize;
        writer.write_all(&block[..len])?;
        left -= len as u64;
    }
    Ok(())
}

/// Answers 400 (the connection then closes) and gives back `e`.
fn bad_request(writer: &mut TcpStream, e: io::Error) -> io::Error {
    let _ = writer
        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    e
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// One line (with its `\n`) of at most `limit` bytes appended to `buf`; its length, 0 at EOF.
fn read_line_into(reader: &mut impl BufRead, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    let n = reader.take(limit as u64).read_until(b'\n', buf)?;
    if n > 0 && buf.last() != Some(&b'\n') {
        return Err(bad("line too long or truncated"));
    }
    Ok(n)
}

fn trim_line(line: &[u8]) -> &[u8] {
    line.trim_ascii_end()
}

/// One request head; `None` on a clean close between requests.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut head = Vec::new();
    let mut skipped = 0;
    // Tolerate empty lines before a request line (RFC 9112 2.2).
    loop {
        head.clear();
        let n = read_line_into(reader, &mut head, MAX_HEAD)?;
        if n == 0 {
            return Ok(None);
        }
        skipped += n;
        if skipped > MAX_HEAD {
            return Err(bad("head too large"));
        }
        if !head.trim_ascii().is_empty() {
            break;
        }
    }
    let request_line =
        String::from_utf8(trim_line(&head).to_vec()).map_err(|_| bad("non-UTF-8 request line"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("bad request line"));
    };
    let http10 = version == "HTTP/1.0";
    if !http10 && version != "HTTP/1.1" {
        return Err(bad("unsupported version"));
    }
    let mut keep_alive = !http10;
    let mut content_length = None;
    let mut chunked = false;
    let mut expect_continue = false;
    loop {
        let start = head.len();
        let room = MAX_HEAD + 1 - head.len().min(MAX_HEAD);
        let n = read_line_into(reader, &mut head, room)?;
        if n == 0 || head.len() > MAX_HEAD {
            return Err(bad("truncated or oversized head"));
        }
        let l = trim_line(&head[start..]);
        if l.is_empty() {
            break;
        }
        let l = String::from_utf8_lossy(l);
        let (key, value) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
        let value = value.trim();
        match key.trim().to_ascii_lowercase().as_str() {
            "connection" => {
                for token in value.split(',').map(|t| t.trim().to_ascii_lowercase()) {
                    if token == "close" {
                        keep_alive = false;
                    } else if token == "keep-alive" {
                        keep_alive = true;
                    }
                }
            }
            "content-length" => {
                content_length = Some(value.parse().map_err(|_| bad("bad content-length"))?);
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    // Transfer-Encoding overrides Content-Length (RFC 9112 6.3).
    let framing = if chunked {
        Framing::Chunked
    } else {
        Framing::Length(content_length.unwrap_or(0))
    };
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        http10,
        keep_alive,
        expect_continue,
        framing,
        head,
    }))
}

/// The request body as a reader: decodes chunked framing, drops trailers, and fails past
/// `limit` bytes or on a truncated body.
struct Body<'a> {
    reader: &'a mut BufReader<TcpStream>,
    chunked: bool,
    /// Bytes left in the body (Content-Length) or in the current chunk.
    left: u64,
    /// A chunk's data ended and its CRLF is still to read.
    need_crlf: bool,
    done: bool,
    total: u64,
    limit: u64,
}

impl<'a> Body<'a> {
    fn new(reader: &'a mut BufReader<TcpStream>, framing: Framing, limit: u64) -> Body<'a> {
        let (chunked, left) = match framing {
            Framing::Length(n) => (false, n),
            Framing::Chunked => (true, 0),
        };
        Body {
            reader,
            chunked,
            left,
            need_crlf: false,
            done: !chunked && left == 0,
            total: 0,
            limit,
        }
    }

    /// Reads the next chunk-size line (and the CRLF ending the previous chunk); at the last
    /// chunk reads the trailers and marks the body done.
    fn next_chunk(&mut self) -> io::Result<()> {
        let mut line = Vec::new();
        if self.need_crlf {
            read_line_into(self.reader, &mut line, 2)?;
            if trim_line(&line) != b"" || line.is_empty() {
                return Err(bad("chunk not followed by CRLF"));
            }
            self.need_crlf = false;
        }
        line.clear();
        if read_line_into(self.reader, &mut line, CHUNK_LINE_LIMIT)? == 0 {
            return Err(bad("truncated chunked body"));
        }
        let text = std::str::from_utf8(&line).map_err(|_| bad("bad chunk size"))?;
        let size_text = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            for _ in 0..MAX_TRAILERS {
                line.clear();
                let n = read_line_into(self.reader, &mut line, MAX_HEAD)?;
                if n == 0 {
                    return Err(bad("truncated trailers"));
                }
                if trim_line(&line).is_empty() {
                    self.done = true;
                    return Ok(());
                }
            }
            return Err(bad("too many trailers"));
        }
        self.left = size;
        self.need_crlf = true;
        Ok(())
    }
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.chunked && self.left == 0 {
            self.next_chunk()?;
            if self.done {
                return Ok(0);
            }
        }
        // Enforce the limit before reading, so an endless body is cut early.
        if self.total + self.left.min(buf.len() as u64) > self.limit {
            return Err(bad("body too large"));
        }
        let want = self.left.min(buf.len() as u64) as usize;
        let n = self.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(bad("truncated body"));
        }
        self.left -= n as u64;
        self.total += n as u64;
        if !self.chunked && self.left == 0 {
            self.done = true;
        }
        Ok(n)
    }
}
