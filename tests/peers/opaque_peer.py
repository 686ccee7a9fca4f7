#!/usr/bin/env python3
"""Raw TCP peer for the end-to-end tests: a protocol the router cannot parse (stdlib only).

  opaque_peer.py server --name NAME --listen HOST:PORT [--listen HOST:PORT ...] [--banner]
      With --banner the server speaks first, `NAME ready\\n` (like SMTP or MySQL), before
      the client sent anything. Then, in both modes, every line received comes back
      prefixed `NAME:` (a last line without `\\n` at the client's half-close too), and the
      server closes after the client half-closed. Lines up to 64 KiB, 30 s idle. Prints
      "listening" once every address is bound. IPv6 as [addr]:port.

  opaque_peer.py client --target HOST:PORT [--expect-banner] [--send BYTES] [--lines N]
                        [--timeout SECONDS]
      Connects; with --expect-banner first reads one line before sending anything; sends
      BYTES (backslash escapes such as \\n, \\r, \\x00 are decoded); then, with --lines N,
      reads until N lines arrived, else half-closes and reads until the server closes.
      Prints one JSON line {"banner": str|null, "received": str, "eof": bool,
      "timed_out": bool}. Exit 1 when a step did not finish within --timeout (default 5 s,
      for the whole exchange; the JSON is printed anyway) or on a connection error.
"""

import argparse
import asyncio
import json
import signal
import socket
import sys
import time

MAX_LINE = 64 * 1024
IDLE = 30


def split_host_port(addr):
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {addr!r} (want HOST:PORT or [IPv6]:PORT)")
    return host.strip("[]"), int(port)


async def run_server(args):
    prefix = f"{args.name}:".encode()

    async def handle(reader, writer):
        try:
            if args.banner:
                writer.write(f"{args.name} ready\n".encode())
                await writer.drain()
            while True:
                line = await asyncio.wait_for(reader.readline(), IDLE)
                if not line:
                    break
                writer.write(prefix + line)
                await writer.drain()
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    servers = []
    for addr in args.listen:
        try:
            host, port = split_host_port(addr)
            servers.append(await asyncio.start_server(handle, host, port, limit=MAX_LINE))
        except (OSError, ValueError) as e:
            print(f"opaque_peer: bind {addr}: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def run_client(args):
    host, port = split_host_port(args.target)
    data = args.send.encode("utf-8").decode("unicode_escape").encode("latin-1")
    deadline = time.monotonic() + args.timeout
    result = {"banner": None, "received": "", "eof": False, "timed_out": False}
    buf = b""

    def recv_some(sock):
        """More bytes, b"" at EOF, None when the deadline passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            return sock.recv(65536)
        except socket.timeout:
            return None

    def finish(code):
        result["received"] = buf.decode("utf-8", "backslashreplace")
        print(json.dumps(result), flush=True)
        sys.exit(code)

    try:
        sock = socket.create_connection((host, port), timeout=args.timeout)
    except OSError as e:
        print(f"opaque_peer: connect {args.target}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    with sock:
        try:
            if args.expect_banner:
                while b"\n" not in buf:
                    chunk = recv_some(sock)
                    if not chunk:
                        result["eof"] = chunk == b""
                        result["timed_out"] = chunk is None
                        print("opaque_peer: no banner line", file=sys.stderr, flush=True)
                        finish(1)
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                result["banner"] = line.decode("utf-8", "backslashreplace")
            sock.sendall(data)
            if args.lines is None:
                sock.shutdown(socket.SHUT_WR)
            while args.lines is None or buf.count(b"\n") < args.lines:
                chunk = recv_some(sock)
                if chunk is None:
                    result["timed_out"] = True
                    print("opaque_peer: timed out", file=sys.stderr, flush=True)
                    finish(1)
                if not chunk:
                    result["eof"] = True
                    break
                buf += chunk
        except OSError as e:
            print(f"opaque_peer: {e}", file=sys.stderr, flush=True)
            finish(1)
    if args.lines is not None and buf.count(b"\n") < args.lines:
        print(f"opaque_peer: closed before {args.lines} lines", file=sys.stderr, flush=True)
        finish(1)
    finish(0)


def main():
    p = argparse.ArgumentParser(description="raw TCP peer (see the module docstring)")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    s.add_argument("--banner", action="store_true", help="speak first: 'NAME ready\\n'")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True, metavar="HOST:PORT")
    c.add_argument("--expect-banner", action="store_true")
    c.add_argument("--send", default="", metavar="BYTES")
    c.add_argument("--lines", type=int, metavar="N", help="stop after N lines (no half-close)")
    c.add_argument("--timeout", type=float, default=5.0, help="whole exchange, seconds")
    args = p.parse_args()
    if args.mode == "server":
        asyncio.run(run_server(args))
    else:
        run_client(args)


if __name__ == "__main__":
    main()
