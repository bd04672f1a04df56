"""containerd's Snapshots service (`containerd.services.snapshots.v1`) on its own unix socket: the gRPC
edge of the proxy snapshotter (csi_thin.snapshotter.service decides what each call means).

containerd uses it as a proxy plugin:

    [proxy_plugins.csi-thin]
      type = "snapshot"
      address = "/run/csi-thin/snapshotter.sock"

Served by `csi-thin snapshotter --pool-config F --socket S` (a process of its own that owns the
pool), or beside the CSI socket by the node process (standalone, `csi-thin node`) when the pool
config's `snapshotter.enabled` says so, sharing its engine. Errors go through the same interceptor
as CSI's (one mapping from domain errors to gRPC codes): containerd's errdefs reads NotFound,
AlreadyExists, FailedPrecondition and InvalidArgument back from the gRPC code. Keys arrive as
containerd's metadata store namespaced them (no `containerd-namespace` metadata reaches a proxy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Protocol

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from csi_thin import config, errors, model
from csi_thin import metrics as metrics_mod
from csi_thin.csi import interceptor, server
from csi_thin.pool import engine
from csi_thin.snapshotter import service
from csi_thin.snapshotter.pb import mount_pb2, snapshots_pb2, snapshots_pb2_grpc

log = logging.getLogger(__name__)

_KIND_TO_PB = {
    model.LayerKind.VIEW: snapshots_pb2.VIEW,
    model.LayerKind.ACTIVE: snapshots_pb2.ACTIVE,
    model.LayerKind.COMMITTED: snapshots_pb2.COMMITTED,
}
#: List answers in messages of this many snapshots (containerd's own service sends 100 at a time)
LIST_BATCH = 100


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def _info_pb(info: service.Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=_KIND_TO_PB[info.kind],
        created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at),
        labels=dict(info.labels),
    )


def _mounts_pb(mounts: Sequence[service.Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """Validate, delegate, respond. No call needs a lock here: the layer transactions claim their
    keys in the engine (a second call on a key in flight gets ABORTED)."""

    def __init__(self, snapshotter: service.Snapshotter) -> None:
        self._sn = snapshotter

    def Prepare(
        self, request: snapshots_pb2.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = self._sn.prepare(
            request.key, request.parent, dict(request.labels), deadline=interceptor.rpc_deadline(context)
        )
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    def View(
        self, request: snapshots_pb2.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self._sn.prepare(
            request.key,
            request.parent,
            dict(request.labels),
            view=True,
            deadline=interceptor.rpc_deadline(context),
        )
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    def Mounts(
        self, request: snapshots_pb2.MountsRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.MountsResponse:
        mounts = self._sn.mounts(request.key, deadline=interceptor.rpc_deadline(context))
        return snapshots_pb2.MountsResponse(mounts=_mounts_pb(mounts))

    def Commit(
        self, request: snapshots_pb2.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        if request.parent:
            # a new parent at commit is containerd's "rebase" capability, which is not advertised
            # here: a parent given must be the one the snapshot has
            info = self._sn.stat(request.key)
            if info.parent != request.parent:
                raise errors.FailedPrecondition(
                    f"snapshot {request.key!r} has parent {info.parent!r}, not {request.parent!r} "
                    "(no rebase at commit)"
                )
        self._sn.commit(
            request.name, request.key, dict(request.labels), deadline=interceptor.rpc_deadline(context)
        )
        return empty_pb2.Empty()

    def Remove(
        self, request: snapshots_pb2.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._sn.remove(request.key, deadline=interceptor.rpc_deadline(context))
        return empty_pb2.Empty()

    def Stat(
        self, request: snapshots_pb2.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.StatSnapshotResponse:
        return snapshots_pb2.StatSnapshotResponse(info=_info_pb(self._sn.stat(request.key)))

    def Update(
        self, request: snapshots_pb2.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        info = self._sn.update(request.info.name, dict(request.info.labels), list(request.update_mask.paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info_pb(info))

    def List(
        self, request: snapshots_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        infos = self._sn.walk(request.filters)
        for start in range(0, len(infos), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[_info_pb(i) for i in infos[start : start + LIST_BATCH]]
            )

    def Usage(
        self, request: snapshots_pb2.UsageRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UsageResponse:
        size, inodes = self._sn.usage(request.key, deadline=interceptor.rpc_deadline(context))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(
        self, request: snapshots_pb2.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._sn.cleanup(deadline=interceptor.rpc_deadline(context))
        return empty_pb2.Empty()


class SnapshotsServer:
    """The Snapshots service on a unix socket (mode 0600: whoever connects can delete layers; a stale
    socket of a dead server is replaced, a live one refused, as for the CSI socket). A Companion of
    the CSI server in the node process (start/stop), or served alone by `csi-thin snapshotter`."""

    def __init__(
        self,
        path: str,
        snapshotter: service.Snapshotter,
        *,
        max_workers: int = 16,
        metrics: metrics_mod.Metrics | None = None,
    ) -> None:
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise errors.InvalidArgument(f"snapshotter socket {path!r}: an absolute, normalised path")
        self.path = path
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="snap"),
            interceptors=[interceptor.EdgeInterceptor(metrics)],
        )
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), self._server)
        self._started = threading.Event()
        self._stopped = threading.Event()

    def problem(self) -> str | None:
        """None while serving; else why not (a /healthz check)."""
        if self._stopped.is_set():
            return f"snapshotter on {self.path} stopped"
        if not self._started.is_set():
            return f"snapshotter on {self.path} not started yet"
        return None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        server.remove_stale_socket(self.path)
        server.listen_private(self._server, self.path)
        self._server.start()
        self._started.set()
        log.info("msg=%s socket=%s", "snapshotter serving", self.path)

    def stop(self, grace: float = server.DEFAULT_GRACE_SECONDS) -> None:
        if self._stopped.is_set() or not self._started.is_set():
            return
        self._stopped.set()
        self._server.stop(grace).wait(grace + 1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("msg=%s socket=%s", "snapshotter stopped", self.path)


def companion(
    eng: engine.PoolEngine, cfg: config.PoolConfig, *, metrics: metrics_mod.Metrics | None = None
) -> SnapshotsServer | None:
    """The snapshotter a node process serves beside CSI when its pool config enables it."""
    if not cfg.snapshotter.enabled:
        return None
    return SnapshotsServer(cfg.snapshotter.socket, service.Snapshotter(eng, cfg.snapshotter), metrics=metrics)


class EngineFactory(Protocol):
    """`csi_thin.app.open_engine` (injected by the CLI, as for `standalone`)."""

    def __call__(self, cfg: config.PoolConfig) -> contextlib.AbstractContextManager[engine.PoolEngine]: ...


def register(subparsers: object, *, open_engine: EngineFactory) -> None:
    """Add `csi-thin snapshotter` to the CLI."""
    p: argparse.ArgumentParser = subparsers.add_parser(  # type: ignore[attr-defined]
        "snapshotter", help="serve containerd's Snapshots API (a proxy snapshotter) on a unix socket"
    )
    p.add_argument("--pool-config", required=True, help="pool config file (YAML)")
    p.add_argument("--socket", default="", help="unix socket path (default: the config's snapshotter.socket)")
    p.add_argument("--grace", type=float, default=server.DEFAULT_GRACE_SECONDS, help="shutdown grace (s)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=functools.partial(main, open_engine=open_engine))


def serve_until_signalled(srv: SnapshotsServer, grace: float) -> None:
    """Serve until SIGTERM or SIGINT (handlers in place before the socket exists), then drain."""
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("msg=%s signal=%s", "shutting down", signal.Signals(signum).name)
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        srv.start()
        try:
            server.wait_for_signal(done)
        finally:
            srv.stop(grace)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(args: argparse.Namespace, *, open_engine: EngineFactory) -> int:
    level = "DEBUG" if getattr(args, "verbose", False) else args.log_level.upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger().setLevel(level)
    try:
        cfg = config.load_pool(args.pool_config)
        path = args.socket or cfg.snapshotter.socket
        if not path:
            raise errors.InvalidArgument("give --socket, or snapshotter.socket in the pool config")
        with open_engine(cfg) as eng:
            serve_until_signalled(
                SnapshotsServer(path, service.Snapshotter(eng, cfg.snapshotter)), args.grace
            )
    except errors.CsiThinError as exc:
        log.error("msg=%s code=%s error=%s", "snapshotter failed", exc.code, exc.message)  # noqa: TRY400
        return 1
    return 0
