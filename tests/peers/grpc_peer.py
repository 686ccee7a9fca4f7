#!/usr/bin/env python3
"""gRPC peer for the end-to-end tests: a server and a client of the `Echo` service in
echo.proto, compiled at start with grpc_tools.protoc into a temporary directory (removed as
soon as the generated modules are imported). Plaintext HTTP/2 (h2c with prior knowledge),
proxies off.

  grpc_peer.py server --name NAME --listen HOST:PORT [--listen HOST:PORT ...]
      Every reply carries served_by=NAME and the request metadata the server saw; every
      call ends with trailing metadata `x-served-by: NAME`. A call with metadata `fail: 1`
      ends with FAILED_PRECONDITION, details "asked to fail" (and the same trailer).
      Prints "listening" once every address is bound. IPv6 as [addr]:port.

  grpc_peer.py client --target HOST:PORT --calls JSON [--timeout SECONDS] [--authority A]
      Runs the calls in order over ONE channel (one HTTP/2 connection) and prints one JSON
      line: a list with, per call,
        {"method", "served_by": [per reply], "texts": [per reply], "seen_metadata": {..},
         "peer": "ipv4:ip:port" (the client address the server saw), "initial": {..}, "trailing": {..}, "code": "OK"|"FAILED_PRECONDITION"|...,
         "details": str|null}
      A call: {"method": "unary"|"server_stream"|"client_stream"|"bidi",
               "metadata": {"baggage": "routing-key=feature-x"},   (optional)
               "text": "hi", "n": 3, "texts": ["a", "b"],          (optional)
               "delay_ms": 0, "timeout": 10, "pingpong": true}      (optional)
      server_stream asks for n replies (delay_ms apart); client_stream and bidi send `texts`
      (default n messages m0..). bidi is ping-pong by default: each message is sent only
      after the reply to the previous one arrived, which proves full-duplex streaming.
      Exit status 0 once every call finished (whatever its gRPC status), 2 on bad usage.
"""

import argparse
import base64
import importlib
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent import futures

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
sys.dont_write_bytecode = True

import grpc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STREAM_ITEMS = 10000
MAX_DELAY_MS = 10000


def die(msg, code=2):
    print(f"grpc_peer: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def load_stubs():
    """Compiles echo.proto into a temp dir, imports the modules and removes the dir."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="grpc-peer-")
    try:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{HERE}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                os.path.join(HERE, "echo.proto"),
            ]
        )
        if rc != 0:
            die(f"protoc failed on echo.proto (exit {rc})")
        sys.path.insert(0, out)
        try:
            pb2 = importlib.import_module("echo_pb2")
            pb2_grpc = importlib.import_module("echo_pb2_grpc")
        finally:
            sys.path.remove(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return pb2, pb2_grpc


def text_metadata(pairs):
    """Metadata pairs as a dict (last value wins); binary values base64."""
    out = {}
    for key, value in pairs or ():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        out[key] = value
    return out


# --- server -----------------------------------------------------------------------------


def run_server(args):
    pb2, pb2_grpc = load_stubs()
    name = args.name

    class Echo(pb2_grpc.EchoServicer):
        def _start(self, context):
            metadata = {
                k: v
                for k, v in text_metadata(context.invocation_metadata()).items()
                if not k.endswith("-bin")
            }
            context.set_trailing_metadata((("x-served-by", name),))
            if metadata.get("fail") == "1":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
            return metadata, urllib.parse.unquote(context.peer())

        def _reply(self, text, seen):
            metadata, peer = seen
            return pb2.Msg(
                text=text, served_by=name, seen_metadata=metadata, peer=peer
            )

        def Unary(self, request, context):
            seen = self._start(context)
            return self._reply(request.text, seen)

        def ServerStream(self, request, context):
            seen = self._start(context)
            delay = min(max(request.delay_ms, 0), MAX_DELAY_MS) / 1000
            for i in range(min(max(request.n, 0), MAX_STREAM_ITEMS)):
                if i and delay:
                    time.sleep(delay)
                yield self._reply(f"{request.text}#{i}", seen)

        def ClientStream(self, request_iterator, context):
            seen = self._start(context)
            texts = [m.text for m in request_iterator]
            return self._reply(",".join(texts), seen)

        def BidiStream(self, request_iterator, context):
            seen = self._start(context)
            for m in request_iterator:
                yield self._reply(m.text, seen)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=256,
    )
    pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    for addr in args.listen:
        try:
            port = server.add_insecure_port(addr)
        except RuntimeError as e:
            die(f"bind {addr}: {e}", 1)
        if port == 0:
            die(f"bind {addr} failed", 1)
    server.start()
    print("listening", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    server.stop(grace=1).wait(2)


# --- client -----------------------------------------------------------------------------


def stream_messages(pb2, call):
    texts = call.get("texts")
    if texts is None:
        texts = [f"m{i}" for i in range(int(call.get("n", 3)))]
    return [pb2.Msg(text=str(t)) for t in texts]


def pingpong_requests(messages, replied, deadline):
    """Yields each message only after the reply to the previous one arrived."""
    for i, m in enumerate(messages):
        if i:
            try:
                replied.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return
        yield m


def one_call(pb2, stub, call, default_timeout):
    method = call.get("method", "unary")
    metadata = tuple(
        (str(k).lower(), str(v)) for k, v in (call.get("metadata") or {}).items()
    )
    timeout = float(call.get("timeout", default_timeout))
    text = str(call.get("text", "hi"))
    result = {
        "method": method,
        "served_by": [],
        "texts": [],
        "seen_metadata": {},
        "peer": None,
        "initial": {},
        "trailing": {},
        "code": None,
        "details": None,
    }

    def take(reply):
        if not result["served_by"]:
            result["seen_metadata"] = dict(reply.seen_metadata)
            result["peer"] = reply.peer
        result["served_by"].append(reply.served_by)
        result["texts"].append(reply.text)

    def finish(c):
        # `c` is a call object or an RpcError (which is one too).
        result["code"] = c.code().name
        result["details"] = c.details() or None
        result["initial"] = text_metadata(c.initial_metadata())
        result["trailing"] = text_metadata(c.trailing_metadata())

    it = None
    try:
        if method == "unary":
            reply, c = stub.Unary.with_call(
                pb2.Msg(text=text), metadata=metadata, timeout=timeout
            )
            take(reply)
            finish(c)
        elif method == "client_stream":
            reply, c = stub.ClientStream.with_call(
                iter(stream_messages(pb2, call)), metadata=metadata, timeout=timeout
            )
            take(reply)
            finish(c)
        elif method == "server_stream":
            request = pb2.Msg(
                text=text, n=int(call.get("n", 3)), delay_ms=int(call.get("delay_ms", 0))
            )
            it = stub.ServerStream(request, metadata=metadata, timeout=timeout)
            for reply in it:
                take(reply)
            finish(it)
        elif method in ("bidi", "bidi_stream"):
            messages = stream_messages(pb2, call)
            if call.get("pingpong", True):
                replied = queue.Queue()
                requests = pingpong_requests(
                    messages, replied, time.monotonic() + timeout
                )
            else:
                replied, requests = None, iter(messages)
            it = stub.BidiStream(requests, metadata=metadata, timeout=timeout)
            for reply in it:
                take(reply)
                if replied is not None:
                    replied.put(None)
            finish(it)
        else:
            die(f"unknown method {method!r}")
    except grpc.RpcError as e:
        finish(e)
    return result


def run_client(args):
    try:
        calls = json.loads(args.calls)
    except json.JSONDecodeError as e:
        die(f"--calls is not JSON: {e}")
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        die("--calls must be a JSON list of objects")
    pb2, pb2_grpc = load_stubs()
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = pb2_grpc.EchoStub(channel)
        results = [one_call(pb2, stub, c, args.timeout) for c in calls]
    print(json.dumps(results), flush=True)


def main():
    p = argparse.ArgumentParser(description="gRPC Echo peer (see the module docstring)")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True, metavar="HOST:PORT")
    c.add_argument("--calls", required=True, metavar="JSON")
    c.add_argument("--timeout", type=float, default=10.0, help="per call, seconds")
    c.add_argument("--authority", help=":authority (default: the target)")
    args = p.parse_args()
    if args.mode == "server":
        run_server(args)
    else:
        run_client(args)


if __name__ == "__main__":
    main()
