"""The process's HTTP side: `/healthz` for kubelet's liveness probe and `/metrics` for Prometheus.

/healthz answers 200 while the process can serve CSI calls (every registered check passes: the CSI
server is serving, the pool engine is open, kubelet did not refuse the registration) and 503 with the
failing checks' reasons otherwise. It is deliberately NOT tied to pool fullness or pool mode: a full
or read-only pool is when users most need deletes to work, and a liveness failure would make kubelet
restart the plugin for nothing. Pool health is in the metrics, Probe, GetCapacity and `pool status`.

A threading stdlib server: a scrape and a probe must not wait for each other, and neither needs more.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import logging
import socket
import threading
from collections.abc import Callable

from csi_thin import errors
from csi_thin import metrics as metrics_mod

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808  # the port the CSI livenessprobe sidecar uses by convention
#: a check returns None when fine, else why the process cannot serve
Check = Callable[[], str | None]


class Health:
    """Named checks, evaluated at each /healthz request (each must be cheap and never block)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checks: collections.OrderedDict[str, Check] = collections.OrderedDict()

    def set(self, name: str, check: Check) -> None:
        with self._lock:
            self._checks[name] = check

    def problems(self) -> list[str]:
        with self._lock:
            checks = list(self._checks.items())
        out = []
        for name, check in checks:
            reason = check()
            if reason is not None:
                out.append(f"{name}: {reason}")
        return out


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (port 0: any free port, as in tests) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise errors.InvalidArgument(
            f"HTTP endpoint {text!r}: expected host:port, e.g. 127.0.0.1:{DEFAULT_PORT}"
        )
    return host, int(port)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            problems = self.server.health.problems()
            body = ("\n".join(problems) if problems else "ok").encode() + b"\n"
            self._reply(503 if problems else 200, body, "text/plain; charset=utf-8")
        elif path == "/metrics":
            body, content_type = self.server.metrics.exposition(self.headers.get("Accept", ""))
            self._reply(200, body, content_type)
        else:
            self._reply(404, b"not found: try /healthz or /metrics\n", "text/plain; charset=utf-8")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("msg=http client=%s %s", self.address_string(), format % args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, health: Health, metrics: metrics_mod.Metrics) -> None:
        self.health = health
        self.metrics = metrics
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpServer:
    """Serves /healthz and /metrics on `address` from `start()` until `stop()`."""

    def __init__(self, address: str, *, health: Health, metrics: metrics_mod.Metrics) -> None:
        host, port = parse_address(address)
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), health=health, metrics=metrics)
        except OSError as exc:
            raise errors.Unavailable(f"cannot listen for HTTP on {address}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> str:
        """host:port actually bound (the port is chosen by the kernel when 0 was asked for)."""
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("msg=%s address=%s", "serving http (/healthz, /metrics)", self.address)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        log.info("msg=%s address=%s", "stopped http", self.address)


def add_flag(parser: argparse.ArgumentParser, *, default: str) -> None:
    """`--http-endpoint HOST:PORT` ("" turns the HTTP server off)."""
    parser.add_argument(
        "--http-endpoint",
        default=default,
        help=f"serve /healthz and /metrics on HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} "
        f"(default: {default or 'off'})",
    )
