#!/usr/bin/env python3
"""WebSocket peer for the end-to-end tests (the `websockets` asyncio implementation).

  ws_peer.py server --name NAME --listen HOST:PORT [--listen HOST:PORT ...]
      Echo server on any path: every message comes back prefixed `NAME:` (text stays text,
      binary stays binary). The message `__request__` is answered with `NAME:` and a JSON
      object {"path": ..., "headers": [[name, value], ...]} of the upgrade request as the
      server saw it. The handshake response carries `X-Served-By: NAME`. Prints "listening"
      once every address is bound. IPv6 as [addr]:port.

  ws_peer.py client --url ws://HOST:PORT/path [--header 'Name: value' ...]
                    [--messages a,b,c] [--timeout SECONDS]
      Connects (no proxy), sends each message and waits for its reply, closes, and prints one
      JSON line {"replies": [...], "status": "ok", "served_by": <X-Served-By or null>,
      "http_status": 101}. Any failure (refused, bad handshake status, timeout): exit 1
      with the error on stderr. Each step is bounded by --timeout (default 5 s).
"""

import argparse
import asyncio
import json
import signal
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

MAX_MESSAGE = 16 * 1024 * 1024


def split_host_port(addr):
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {addr!r} (want HOST:PORT or [IPv6]:PORT)")
    return host.strip("[]"), int(port)


async def run_server(args):
    name = args.name

    async def handler(ws):
        try:
            async for msg in ws:
                if msg == "__request__":
                    info = {
                        "path": ws.request.path,
                        "headers": [[k, v] for k, v in ws.request.headers.raw_items()],
                    }
                    await ws.send(f"{name}:{json.dumps(info)}")
                elif isinstance(msg, bytes):
                    await ws.send(name.encode() + b":" + msg)
                else:
                    await ws.send(f"{name}:{msg}")
        except ConnectionClosed:
            pass

    def process_response(_connection, _request, response):
        response.headers["X-Served-By"] = name

    servers = []
    for addr in args.listen:
        try:
            host, port = split_host_port(addr)
            servers.append(
                await serve(
                    handler,
                    host,
                    port,
                    process_response=process_response,
                    open_timeout=10,
                    close_timeout=2,
                    max_size=MAX_MESSAGE,
                )
            )
        except (OSError, ValueError) as e:
            print(f"ws_peer: bind {addr}: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()
    await asyncio.wait_for(
        asyncio.gather(*(s.wait_closed() for s in servers)), timeout=3
    )


async def run_client(args):
    headers = []
    for h in args.header:
        key, sep, value = h.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"bad --header {h!r} (want 'Name: value')")
        headers.append((key.strip(), value.strip()))
    messages = args.messages.split(",") if args.messages else []
    t = args.timeout
    replies = []
    async with connect(
        args.url,
        additional_headers=headers,
        proxy=None,
        open_timeout=t,
        close_timeout=2,
        ping_interval=None,
        max_size=MAX_MESSAGE,
    ) as ws:
        for m in messages:
            await asyncio.wait_for(ws.send(m), t)
            reply = await asyncio.wait_for(ws.recv(), t)
            if isinstance(reply, bytes):
                reply = reply.decode("utf-8", "backslashreplace")
            replies.append(reply)
        response = ws.response
    return {
        "replies": replies,
        "status": "ok",
        "served_by": response.headers.get("X-Served-By"),
        "http_status": response.status_code,
    }


def main():
    p = argparse.ArgumentParser(description="WebSocket echo peer (see the module docstring)")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    c = sub.add_parser("client")
    c.add_argument("--url", required=True, metavar="ws://HOST:PORT/path")
    c.add_argument("--header", action="append", default=[], metavar="'Name: value'")
    c.add_argument("--messages", default="", metavar="a,b,c")
    c.add_argument("--timeout", type=float, default=5.0, help="per step, seconds")
    args = p.parse_args()
    if args.mode == "server":
        asyncio.run(run_server(args))
        return
    # Whole run bounded: open, each send and reply, close.
    budget = args.timeout * (len(args.messages.split(",")) * 2 + 2) + 5
    try:
        result = asyncio.run(asyncio.wait_for(run_client(args), budget))
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"ws_peer: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
