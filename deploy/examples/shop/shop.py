"""The sample shop: frontend -> orders (HTTP) -> payments (gRPC), and a client.

One script, one role per pod (SERVICE):
  frontend  HTTP :8080; GET / calls orders over HTTP
  orders    HTTP :8080; GET / calls payments over gRPC (/shop.Payments/Pay)
  payments  gRPC :9090; answers who it is
Every answer names the service, its VERSION (baseline, or the sandbox a fork belongs to) and
its pod, with its upstream's answer nested, so one request shows where each hop landed. Each
hop copies the routing-key headers (PROPAGATE) to the next, as an app with tracing does: the
agent routes by them, the app does not know about sandboxes.

The client (`python3 shop.py get|load ...`) is what `cargo xtask kind-test` and the docs run
with `kubectl exec`. Standard library only, except payments and orders, which need grpcio
(installed by an init container, see shop.yaml).
"""

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = os.environ.get("SERVICE", "")
VERSION = os.environ.get("VERSION", "baseline")
POD = os.environ.get("POD_NAME", socket.gethostname())
UPSTREAM = os.environ.get("UPSTREAM", "")
PROPAGATE = [
    h.strip().lower()
    for h in os.environ.get("PROPAGATE", "x-routing-key,baggage,tracestate").split(",")
    if h.strip()
]
PAY_METHOD = "/shop.Payments/Pay"


def me(upstream=None):
    out = {"service": SERVICE, "version": VERSION, "pod": POD}
    if upstream is not None:
        out["upstream"] = upstream
    return out


def call_http(url, headers, timeout=10):
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def call_grpc(target, headers, timeout=10):
    import grpc  # only orders needs it

    with grpc.insecure_channel(target) as channel:
        pay = channel.unary_unary(PAY_METHOD)  # raw bytes both ways: no generated stubs
        return json.loads(pay(b"{}", metadata=list(headers.items()), timeout=timeout))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, {"ok": True})
        headers = {h: self.headers[h] for h in PROPAGATE if self.headers.get(h)}
        try:
            if UPSTREAM.startswith("grpc://"):
                upstream = call_grpc(UPSTREAM[len("grpc://") :], headers)
            elif UPSTREAM:
                upstream = call_http(UPSTREAM, headers)
            else:
                upstream = None
        except Exception as e:  # the caller sees which hop failed
            return self.reply(502, me({"error": f"{UPSTREAM}: {e}"}))
        self.reply(200, me(upstream))

    def reply(self, code, body):
        data = (json.dumps(body) + "\n").encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        if self.path != "/healthz":
            print(f"{SERVICE} {VERSION}: " + fmt % args, flush=True)


def serve_http(port):
    print(f"{SERVICE} {VERSION} on :{port}, upstream {UPSTREAM or '-'}", flush=True)
    ThreadingHTTPServer(("", port), Handler).serve_forever()


def serve_grpc(port):
    from concurrent import futures

    import grpc

    def pay(_request, context):
        print(f"{SERVICE} {VERSION}: {PAY_METHOD} {dict(context.invocation_metadata())}", flush=True)
        return json.dumps(me()).encode()

    handler = grpc.method_handlers_generic_handler(
        "shop.Payments", {"Pay": grpc.unary_unary_rpc_method_handler(pay)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print(f"{SERVICE} {VERSION} on :{port} (gRPC)", flush=True)
    server.wait_for_termination()


def key_headers(key):
    return {"x-routing-key": key} if key else {}


def versions(answer):
    """service -> version along the call chain."""
    out = {}
    while answer:
        out[answer.get("service", "?")] = answer.get("version", "?")
        answer = answer.get("upstream")
    return out


def client(argv):
    p = argparse.ArgumentParser(prog="shop.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get", help="one request; prints the answer")
    g.add_argument("url")
    g.add_argument("--key", default="")
    load = sub.add_parser("load", help="requests for a while; prints counts as JSON")
    load.add_argument("url")
    load.add_argument("--key", default="")
    load.add_argument("--seconds", type=float, default=30)
    load.add_argument("--interval", type=float, default=0.05)
    load.add_argument("--expect", action="append", default=[], help="service=version")
    a = p.parse_args(argv)
    if a.cmd == "get":
        answer = call_http(a.url, key_headers(a.key))
        print(json.dumps({"versions": versions(answer), "answer": answer}))
        return 0
    expect = dict(e.split("=", 1) for e in a.expect)
    counts = {"ok": 0, "failed": 0, "misrouted": 0, "errors": []}
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        try:
            got = versions(call_http(a.url, key_headers(a.key), timeout=5))
            if all(got.get(s) == v for s, v in expect.items()):
                counts["ok"] += 1
            else:
                counts["misrouted"] += 1
                counts["errors"].append(f"misrouted: {got}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            counts["failed"] += 1
            counts["errors"].append(str(e))
        time.sleep(a.interval)
    counts["errors"] = counts["errors"][:20]
    print(json.dumps(counts))
    return 0


def main():
    if len(sys.argv) > 1:
        return client(sys.argv[1:])
    if SERVICE == "payments":
        serve_grpc(int(os.environ.get("LISTEN_PORT", "9090")))
    else:
        serve_http(int(os.environ.get("LISTEN_PORT", "8080")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
