"""Kubelet plugin registration, served by the node process itself (no node-driver-registrar sidecar).

Kubelet's plugin watcher finds `<kubelet-dir>/plugins_registry/<driver>-reg.sock`, calls GetInfo
(type CSIPlugin, the driver's name, the CSI socket's path as kubelet on the host sees it, supported
CSI versions), registers the driver, and reports the outcome with NotifyRegistrationStatus. Kubelet
deregisters the driver when the socket goes away, so the socket lives exactly as long as the CSI
socket serves: it starts after it (as a csi_thin.csi.server.Companion) and is removed before it stops.

The socket is root's only (0600): kubelet runs as root, nobody else has anything to say to it.
A refusal by kubelet fails /healthz (the liveness probe restarts the plugin, which registers again,
as the registrar sidecar does by exiting); so does the socket being deleted under us.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import enum
import logging
import os
import re
import threading
import time

import grpc

from csi_thin import errors
from csi_thin import metrics as metrics_mod
from csi_thin.csi import interceptor, server
from csi_thin.csi.pb import pluginregistration_pb2, pluginregistration_pb2_grpc

log = logging.getLogger(__name__)

PLUGIN_TYPE = "CSIPlugin"  # k8s.io/kubelet/pkg/apis/pluginregistration/v1 CSIPlugin
#: the CSI versions kubelet may speak to this plugin
SUPPORTED_VERSIONS = ("1.0.0",)
REGISTRY_DIR = "plugins_registry"
#: sun_path holds 108 bytes with its terminating NUL
MAX_SOCKET_PATH = 107
#: a CSI driver name (DNS-1123 subdomain, at most 63 characters): it becomes part of a file name
_DRIVER_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class State(enum.StrEnum):
    PENDING = "pending"  # serving, kubelet has not said anything yet
    REGISTERED = "registered"
    FAILED = "failed"  # kubelet refused the registration


@dataclasses.dataclass(frozen=True)
class Status:
    state: State
    error: str = ""
    at: float = 0.0  # unix seconds of kubelet's last notification (0: none yet)


def socket_path(kubelet_dir: str, driver_name: str) -> str:
    return os.path.join(kubelet_dir, REGISTRY_DIR, f"{driver_name}-reg.sock")


class RegistrationService(pluginregistration_pb2_grpc.RegistrationServicer):
    """GetInfo says who we are and where the CSI socket is; NotifyRegistrationStatus records kubelet's
    answer. Neither needs a lock beyond the status's own: both are reads or one assignment."""

    def __init__(
        self, *, driver_name: str, endpoint: str, metrics: metrics_mod.Metrics | None = None
    ) -> None:
        self._driver_name = driver_name
        self._endpoint = endpoint
        self._metrics = metrics
        self._lock = threading.Lock()
        self._status = Status(State.PENDING)
        self._publish()

    @property
    def status(self) -> Status:
        with self._lock:
            return self._status

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.registration(self.status.state.value)

    def GetInfo(
        self, request: pluginregistration_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> pluginregistration_pb2.PluginInfo:
        return pluginregistration_pb2.PluginInfo(
            type=PLUGIN_TYPE,
            name=self._driver_name,
            endpoint=self._endpoint,
            supported_versions=list(SUPPORTED_VERSIONS),
        )

    def NotifyRegistrationStatus(
        self, request: pluginregistration_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> pluginregistration_pb2.RegistrationStatusResponse:
        status = Status(
            State.REGISTERED if request.plugin_registered else State.FAILED,
            error=request.error,
            at=time.time(),
        )
        with self._lock:
            self._status = status
        self._publish()
        if status.state == State.REGISTERED:
            log.info(
                "msg=%s driver=%s endpoint=%s", "registered with kubelet", self._driver_name, self._endpoint
            )
        else:
            log.error(
                "msg=%s driver=%s error=%s",
                "kubelet refused the registration",
                self._driver_name,
                status.error,
            )
        return pluginregistration_pb2.RegistrationStatusResponse()


class RegistrationServer:
    """The registration socket of one driver, from `start()` to `stop()` (a server.Companion)."""

    def __init__(
        self,
        *,
        kubelet_dir: str,
        driver_name: str,
        endpoint: str,
        metrics: metrics_mod.Metrics | None = None,
    ) -> None:
        """`endpoint`: the CSI socket's path as kubelet on the host sees it (absolute)."""
        if not _DRIVER_NAME.match(driver_name):
            raise errors.InvalidArgument(
                f"driver name {driver_name!r}: a DNS subdomain of at most 63 characters ([a-z0-9.-])"
            )
        for label, path in (("kubelet dir", kubelet_dir), ("registration endpoint", endpoint)):
            if not path.startswith("/") or os.path.normpath(path) != path:
                raise errors.InvalidArgument(f"{label} {path!r} must be an absolute, normalized path")
        self.path = socket_path(kubelet_dir, driver_name)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            # checked here, before the engine opens: grpc would only fail at bind, with a RuntimeError
            raise errors.InvalidArgument(
                f"registration socket {self.path!r} is longer than a unix socket path may be "
                f"({MAX_SOCKET_PATH} bytes): use a shorter --kubelet-dir"
            )
        self.service = RegistrationService(driver_name=driver_name, endpoint=endpoint, metrics=metrics)
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="registration"),
            interceptors=[interceptor.EdgeInterceptor(metrics)],
        )
        pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(self.service, self._server)
        self._serving = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        server.remove_stale_socket(self.path)
        try:
            # the one way to make a 0600 socket: never reachable with the umask's looser mode
            server.listen_private(self._server, self.path)
        except RuntimeError as exc:  # grpc's only signal that the bind failed
            raise errors.Unavailable(f"cannot listen on {self.path}: {exc}") from exc
        self._server.start()
        self._serving.set()
        log.info("msg=%s path=%s", "serving kubelet registration", self.path)

    def stop(self, grace: float = server.DEFAULT_GRACE_SECONDS) -> None:
        """Remove the socket first (kubelet deregisters the driver), then stop serving."""
        if not self._serving.is_set():
            return
        self._serving.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server.stop(grace).wait(grace + 1.0)
        log.info("msg=%s path=%s", "stopped kubelet registration", self.path)

    def problem(self) -> str | None:
        """None while registration is fine or pending; else why not (a /healthz check)."""
        if not self._serving.is_set():
            return "kubelet registration socket not serving"
        if not os.path.exists(self.path):
            return f"kubelet registration socket {self.path} was removed"
        status = self.service.status
        if status.state == State.FAILED:
            return f"kubelet refused the registration: {status.error or 'no reason given'}"
        return None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The registration flags of a node plugin command (`standalone`, `node`)."""
    parser.add_argument(
        "--kubelet-dir",
        default="",
        help="kubelet's root dir (e.g. /var/lib/kubelet): register with kubelet through its "
        f"{REGISTRY_DIR}/ (default: do not register)",
    )
    parser.add_argument(
        "--kubelet-registration-path",
        default="",
        help="the CSI socket's path as kubelet on the host sees it (default: the --endpoint's path)",
    )


def from_args(
    args: argparse.Namespace, *, endpoint: server.Endpoint, driver_name: str, metrics: metrics_mod.Metrics
) -> RegistrationServer | None:
    """The registration server the flags ask for (None without --kubelet-dir); validated, not started."""
    if not args.kubelet_dir:
        return None
    path = args.kubelet_registration_path or (endpoint.address if endpoint.scheme == "unix" else "")
    if not path:
        raise errors.InvalidArgument(
            "--kubelet-dir: kubelet reaches CSI plugins over unix sockets, the endpoint is "
            f"{endpoint.target}; give --kubelet-registration-path"
        )
    return RegistrationServer(
        kubelet_dir=args.kubelet_dir, driver_name=driver_name, endpoint=path, metrics=metrics
    )
