"""The gRPC server: endpoints, the health service, the interceptor, graceful shutdown.

Why the synchronous server with a thread pool and not grpc.aio: everything below the edge blocks
(LMDB transactions, subprocesses with deadlines, kernel ioctls). Under asyncio each call would be
pushed into an executor anyway, adding a second concurrency model for nothing. With threads, two
calls on the same volume genuinely run at once, and the engine's per-name lock turns the loser into
ABORTED at once instead of queueing it behind the winner.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from csi_thin import errors
from csi_thin import metrics as metrics_mod
from csi_thin.csi import interceptor
from csi_thin.csi.pb import csi_pb2_grpc

log = logging.getLogger(__name__)

#: in-flight RPCs get this long to finish after SIGTERM before they are cancelled
DEFAULT_GRACE_SECONDS = 30.0


def wait_for_signal(done: threading.Event) -> None:
    """Block the main thread until a signal handler sets `done`, waking twice a second.

    CPython runs signal handlers only in the main thread, when it next runs Python code. A signal the
    kernel hands to another thread (gRPC's, a worker's) does not interrupt the main thread's lock
    wait, so an unbounded `done.wait()` can sleep through SIGTERM for good: 2 of 60 SIGTERMs were
    slept through with a gRPC server and two busy threads, 0 of 60 with this loop (and a containerd
    suite case once waited 30 s for a snapshotter that never stopped)."""
    while not done.wait(0.5):
        pass


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """`unix:///abs/path.sock` or `tcp://host:port`."""

    scheme: str
    address: str  # the socket path or host:port

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        if text.startswith("unix://"):
            path = text[len("unix://") :]
            if not path.startswith("/") or os.path.normpath(path) != path:
                raise errors.InvalidArgument(f"endpoint {text!r}: unix sockets need an absolute path")
            return cls("unix", path)
        if text.startswith("tcp://"):
            host, sep, port = text[len("tcp://") :].rpartition(":")
            if not sep or not host or not port.isdigit():
                raise errors.InvalidArgument(f"endpoint {text!r}: expected tcp://host:port")
            return cls("tcp", f"{host}:{port}")
        raise errors.InvalidArgument(f"endpoint {text!r}: expected unix:///path or tcp://host:port")

    @property
    def target(self) -> str:
        """What grpc's add_insecure_port and insecure_channel take."""
        return f"unix://{self.address}" if self.scheme == "unix" else self.address


def remove_stale_socket(path: str) -> None:
    """Remove a socket left by a dead server; refuse to steal one that a live server answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise errors.FailedPrecondition(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            log.info("msg=%s path=%s", "removed stale socket", path)
            return
        except OSError:
            pass
    raise errors.FailedPrecondition(f"{path}: another server is listening on it")


#: sun_path holds 108 bytes with its terminating NUL
_SUN_PATH_MAX = 107


def listen_private(server: grpc.Server, path: str) -> None:
    """Listen on the unix socket `path` with mode 0600: whoever can connect can delete volumes.

    The umask is process-wide (other threads create files too), so the socket is bound in a fresh
    0700 directory beside `path`, made 0600 there and only then linked into place (a link never
    replaces anything): at no moment is it reachable with a looser mode.
    """
    private = tempfile.mkdtemp(prefix=".sock-", dir=os.path.dirname(path))
    bound = os.path.join(private, "s")
    try:
        if len(os.fsencode(bound)) > _SUN_PATH_MAX:  # too long a directory: bind, then chmod at once
            bound = path
        if server.add_insecure_port(f"unix://{bound}") == 0:
            raise errors.Unavailable(f"cannot listen on unix://{path}")
        os.chmod(bound, 0o600)
        if bound != path:
            try:
                os.link(bound, path)
            except FileExistsError as exc:
                raise errors.FailedPrecondition(f"{path}: another server is listening on it") from exc
    finally:
        if bound != path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bound)
        os.rmdir(private)


class Companion(Protocol):
    """Something served beside the CSI socket for as long as it serves (kubelet registration)."""

    def start(self) -> None: ...

    def stop(self, grace: float) -> None: ...


@dataclasses.dataclass
class Services:
    identity: csi_pb2_grpc.IdentityServicer
    controller: csi_pb2_grpc.ControllerServicer | None = None
    node: csi_pb2_grpc.NodeServicer | None = None
    snapshot_metadata: csi_pb2_grpc.SnapshotMetadataServicer | None = None
    group_controller: csi_pb2_grpc.GroupControllerServicer | None = None


class Server:
    def __init__(
        self,
        endpoint: Endpoint,
        services: Services,
        *,
        max_workers: int = 16,
        metrics: metrics_mod.Metrics | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._health = health.HealthServicer()
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
            interceptors=[interceptor.EdgeInterceptor(metrics)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(services.identity, self._server)
        if services.controller is not None:
            csi_pb2_grpc.add_ControllerServicer_to_server(services.controller, self._server)
        if services.node is not None:
            csi_pb2_grpc.add_NodeServicer_to_server(services.node, self._server)
        if services.group_controller is not None:
            csi_pb2_grpc.add_GroupControllerServicer_to_server(services.group_controller, self._server)
        if services.snapshot_metadata is not None:
            csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(services.snapshot_metadata, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._started = threading.Event()
        self._stopped = threading.Event()

    def problem(self) -> str | None:
        """None while serving; else why not (a /healthz check)."""
        if self._stopped.is_set():
            return f"CSI server on {self.endpoint.target} stopped"
        if not self._started.is_set():
            return f"CSI server on {self.endpoint.target} not started yet"
        return None

    def start(self) -> None:
        if self.endpoint.scheme == "unix":
            os.makedirs(os.path.dirname(self.endpoint.address), exist_ok=True)
            remove_stale_socket(self.endpoint.address)
            listen_private(self._server, self.endpoint.address)
        elif self._server.add_insecure_port(self.endpoint.target) == 0:
            raise errors.Unavailable(f"cannot listen on {self.endpoint.target}")
        self._server.start()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._started.set()
        log.info("msg=%s endpoint=%s", "serving", self.endpoint.target)

    def stop(self, grace: float = DEFAULT_GRACE_SECONDS) -> None:
        """Stop accepting RPCs, let in-flight ones finish within `grace`, then cancel the rest."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait(grace + 1.0)
        if self.endpoint.scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint.address)
        log.info("msg=%s endpoint=%s", "stopped", self.endpoint.target)

    def serve_until_signalled(
        self, grace: float = DEFAULT_GRACE_SECONDS, *, companions: Sequence[Companion] = ()
    ) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully (main thread only).

        `companions` start after the CSI socket serves (kubelet must find it answering once told where
        it is) and stop, in reverse order, before it stops.
        """
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("msg=%s signal=%s", "shutting down", signal.Signals(signum).name)
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with contextlib.ExitStack() as stack:
                self.start()
                stack.callback(self.stop, grace)
                for companion in companions:
                    companion.start()
                    stack.callback(companion.stop, grace)
                wait_for_signal(done)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
