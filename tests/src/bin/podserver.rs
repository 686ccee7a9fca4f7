//! Tiny HTTP/1.1 test server for mini-cluster pods (std only).
//!
//! `podserver --name NAME --listen ADDR:PORT [--listen ADDR:PORT ...]`
//!
//! Every response is `200 OK` with body `NAME\n` and header `x-served-by: NAME`, except
//! `GET /peer`, whose body is the client address the server saw (`ip:port\n`, IPv6 in
//! brackets). Keep-alive per HTTP/1.1 (`Connection: close` and HTTP/1.0 honoured); request
//! bodies (Content-Length or chunked) are read and discarded. Prints `listening` once every
//! address is bound. Bounded: at most 512 connections at once, 16 KiB of request head,
//! 8 MiB of body, 30 s idle and 100,000 requests per connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const MAX_CONNECTIONS: usize = 512;
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: u64 = 8 * 1024 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REQUESTS_PER_CONNECTION: u32 = 100_000;
const USAGE: &str = "usage: podserver --name NAME --listen ADDR:PORT [--listen ADDR:PORT ...]";

fn main() {
    let mut name = None;
    let mut listen = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--name", Some(v)) => name = Some(v),
            ("--listen", Some(v)) => match v.parse::<SocketAddr>() {
                Ok(a) => listen.push(a),
                Err(e) => fail(&format!("bad --listen {v:?}: {e}")),
            },
            _ => fail(USAGE),
        }
    }
    let (Some(name), false) = (name, listen.is_empty()) else {
        fail(USAGE)
    };
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

struct Request {
    method: String,
    target: String,
    keep_alive: bool,
}

fn serve(stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let req = match read_request(&mut reader, &mut writer) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = writer.write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                return Err(e);
            }
        };
        let path = req.target.split('?').next().unwrap_or("");
        let body = if req.method == "GET" && path == "/peer" {
            format!("{peer}\n")
        } else {
            format!("{name}\n")
        };
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-served-by: {name}\r\n",
            body.len()
        );
        if !req.keep_alive {
            resp.push_str("connection: close\r\n");
        }
        resp.push_str("\r\n");
        if req.method != "HEAD" {
            resp.push_str(&body);
        }
        writer.write_all(resp.as_bytes())?;
        if !req.keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// One request head and its body (discarded); `None` on a clean close between requests.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> io::Result<Option<Request>> {
    let mut head_len = 0;
    let mut line = String::new();
    // Tolerate empty lines before a request line (RFC 9112 2.2).
    let request_line = loop {
        line.clear();
        let n = reader.by_ref().take(MAX_HEAD as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        head_len += n;
        if head_len > MAX_HEAD {
            return Err(bad("head too large"));
        }
        if !line.trim().is_empty() {
            break line.trim_end().to_string();
        }
    };
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
    let mut content_length = 0u64;
    let mut chunked = false;
    let mut expect_continue = false;
    loop {
        line.clear();
        let n = reader.by_ref().take(MAX_HEAD as u64).read_line(&mut line)?;
        head_len += n;
        if n == 0 || head_len > MAX_HEAD {
            return Err(bad("truncated or oversized head"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
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
                content_length = value.parse().map_err(|_| bad("bad content-length"))?;
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if expect_continue {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    if chunked {
        discard_chunked(reader)?;
    } else {
        if content_length > MAX_BODY {
            return Err(bad("body too large"));
        }
        let copied = io::copy(&mut reader.by_ref().take(content_length), &mut io::sink())?;
        if copied != content_length {
            return Err(bad("truncated body"));
        }
    }
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        keep_alive,
    }))
}

fn discard_chunked(reader: &mut BufReader<TcpStream>) -> io::Result<()> {
    let mut total = 0u64;
    let mut line = String::new();
    // Every chunk is at least one byte, so the body limit bounds the chunk count too.
    loop {
        line.clear();
        reader.by_ref().take(1024).read_line(&mut line)?;
        let size_text = line.trim().split(';').next().unwrap_or("");
        let size = u64::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
        total += size;
        if total > MAX_BODY {
            return Err(bad("body too large"));
        }
        if size == 0 {
            // Trailers, up to the empty line.
            for _ in 0..64 {
                line.clear();
                let n = reader.by_ref().take(MAX_HEAD as u64).read_line(&mut line)?;
                if n == 0 || line.trim().is_empty() {
                    return Ok(());
                }
            }
            return Err(bad("too many trailers"));
        }
        let copied = io::copy(&mut reader.by_ref().take(size), &mut io::sink())?;
        if copied != size {
            return Err(bad("truncated chunk"));
        }
        line.clear();
        reader.by_ref().take(2).read_line(&mut line)?;
    }
}
