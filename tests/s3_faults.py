"""A fault-injecting reverse proxy for S3 on loopback, in front of a real S3 server (moto's).

Every request (any method, path, headers and body) is forwarded to the upstream server and its answer streamed
back, unless the test has told the proxy to fail it. A test can, at run time:

    proxy.inject("slowdown", n=3, method="PUT", key="shards/")   # the next 3 PUTs whose path holds "shards/"
    proxy.inject("drop")                                         # the next request: connection closed, no answer
    proxy.down("internal")                                       # every request answers 500 InternalError ...
    proxy.up()                                                   # ... until switched back

Fault kinds: "internal" (500 InternalError), "slowdown" (503 SlowDown), both with a proper S3 XML error body;
"drop" (the connection is closed without an answer, the request never reaching the store); "lost_reply" (the
request reaches the store, then the connection is closed before its answer: the client cannot know it worked).

The proxy counts what it saw: `requests` (every request), `forwarded` (reached the store), `faults[kind]`, and
keeps a log of (method, path, fault or None) so that tests can assert where faults landed.
"""

from __future__ import annotations

import http.client
import socket
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

FAULT_KINDS = ("internal", "slowdown", "drop", "lost_reply")
_ERRORS = {
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_CHUNK = 1 << 16


@dataclass
class _Rule:
    kind: str
    remaining: float  # requests still to fail; inf for a store that is down
    method: str | None = None
    key: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.key is None or self.key in path)


class FaultProxy:
    """A ThreadingHTTPServer on 127.0.0.1 forwarding to `upstream` (http://host:port); see the module docstring."""

    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self.reset()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    # --- what the test controls

    def inject(self, kind: str, n: float = 1, method: str | None = None, key: str | None = None) -> None:
        """Fail the next `n` requests that match `method` (e.g. "PUT") and whose path contains `key`; n may be inf."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; choose one of {FAULT_KINDS}")
        with self._lock:
            self._rules.append(_Rule(kind, float(n), method, key))

    def down(self, kind: str = "drop", method: str | None = None, key: str | None = None) -> None:
        """Fail every matching request (all of them by default) until `up()`."""
        self.inject(kind, float("inf"), method, key)

    def up(self) -> None:
        """Forget every fault still pending: the store answers normally again."""
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """No faults pending, counters at zero."""
        with self._lock:
            self._rules.clear()
            self.requests = 0
            self.forwarded = 0
            self.faults: Counter[str] = Counter()
            self.log: list[tuple[str, str, str | None]] = []

    @property
    def pending(self) -> float:
        """Faults injected but not yet spent (inf while down)."""
        with self._lock:
            return sum(r.remaining for r in self._rules)

    def figures(self) -> str:
        """One line for a test to print: requests proxied, and faults per kind."""
        kinds = ", ".join(f"{k} {self.faults[k]}" for k in FAULT_KINDS if self.faults[k]) or "none"
        return f"{self.requests} requests proxied, {self.forwarded} reached the store, {sum(self.faults.values())} faults ({kinds})"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- used by the handler

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            fault = None
            for rule in self._rules:
                if rule.remaining > 0 and rule.matches(method, path):
                    rule.remaining -= 1
                    fault = rule.kind
                    break
            self._rules = [r for r in self._rules if r.remaining > 0]
            if fault is None or fault == "lost_reply":
                self.forwarded += 1
            if fault is not None:
                self.faults[fault] += 1
            self.log.append((method, path, fault))
            return fault


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, kind: str, path: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        rid = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
            f"<RequestId>{rid}</RequestId></Error>"
        ).encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", rid)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        path = unquote(urlparse(self.path).path)
        fault = self.owner._decide(self.command, path)
        if fault == "drop":
            return self._drop()
        if fault in _ERRORS:
            return self._error(fault, path)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            if fault == "lost_reply":
                resp.read()
                return self._drop()
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200:
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                resp.read()
                return
            if length is None:  # a chunked answer: forwarded whole
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_header("Content-Length", length)
            self.end_headers()
            while chunk := resp.read(_CHUNK):
                self.wfile.write(chunk)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle
