"""`csi-thin standalone`: Identity + Controller + Node on one socket, LMDB the only metadata store.

The embedded default: no Kubernetes, one node, one pool. Start-up order: load and validate the pool
config; then csi_thin.app.open_engine takes the pool's owner lock, assembles the pool and runs the
engine's recovery (finish or undo whatever a crash left); then serve. SIGTERM stops accepting calls
and lets in-flight ones finish within the grace period; the pool stays assembled (staged volumes
keep working across a driver restart).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import socket
import sys
from collections.abc import Iterator
from typing import Any, Protocol

from csi_thin import config, errors, httpserver, model
from csi_thin import deadline as deadline_mod
from csi_thin import metrics as metrics_mod
from csi_thin.controller import groups, provisioner
from csi_thin.csi import (
    controller_service,
    group_controller_service,
    identity_service,
    node_service,
    registration,
    server,
    snapshot_metadata_service,
    snapshots,
)
from csi_thin.node import trim, volumes
from csi_thin.pool import engine

log = logging.getLogger(__name__)


def register(subparsers: Any, *, open_engine: EngineFactory) -> None:
    """Add the `standalone` subcommand to the CLI's subparsers; it runs `main` with `open_engine`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "standalone", help="serve Identity, Controller and Node on one socket (no Kubernetes)"
    )
    p.add_argument("--endpoint", required=True, help="unix:///path/csi.sock or tcp://host:port")
    p.add_argument("--pool-config", required=True, help="pool config file (YAML)")
    p.add_argument("--node-id", default=socket.gethostname(), help="this node's id (default: hostname)")
    p.add_argument("--driver-name", default=identity_service.DEFAULT_NAME)
    p.add_argument("--overprovision-ratio", type=float, default=provisioner.Settings.overprovision_ratio)
    p.add_argument(
        "--max-volumes", type=int, default=0, help="NodeGetInfo max_volumes_per_node (0: no limit)"
    )
    p.add_argument("--grace", type=float, default=server.DEFAULT_GRACE_SECONDS, help="shutdown grace (s)")
    p.add_argument("--log-level", default="INFO")
    httpserver.add_flag(p, default="")
    registration.add_flags(p)
    p.set_defaults(func=functools.partial(main, open_engine=open_engine))


class EngineFactory(Protocol):
    """`csi_thin.app.open_engine`: assemble, take the pool's owner lock, open LMDB, recover.

    Injected by the CLI (the composition root sits above this layer and may not be imported here).
    """

    def __call__(self, cfg: config.PoolConfig) -> contextlib.AbstractContextManager[engine.PoolEngine]: ...


def probe(eng: engine.PoolEngine, deadline: deadline_mod.Deadline) -> bool:
    """Probe of a process that owns a pool (standalone, node): ready once start-up (assembly,
    recovery) is done, whatever the pool's condition (a full or degraded pool is reported by volume
    conditions, GetCapacity, `pool status` and metrics: a liveness probe must not restart the plugin
    for it); a pool that cannot even report its status (it is gone) means the plugin cannot serve."""
    if eng.last_recovery is None:
        return False  # still starting up
    try:
        eng.status(deadline=deadline)
    except errors.Unavailable as exc:
        log.warning("msg=%s error=%s", "probe: the plugin cannot serve", exc)
        raise errors.FailedPrecondition(f"the plugin cannot serve: {exc.message}") from exc
    return True


def services(
    eng: engine.PoolEngine,
    *,
    node_id: str,
    block_size: int,
    thresholds: model.Thresholds,
    driver_name: str = identity_service.DEFAULT_NAME,
    overprovision_ratio: float = provisioner.Settings.overprovision_ratio,
    max_volumes: int = 0,
    claims: volumes.Claims | None = None,
) -> server.Services:
    """The CSI services of a standalone driver over one engine (the composition root)."""

    settings = provisioner.Settings(
        node_id=node_id, block_size=block_size, overprovision_ratio=overprovision_ratio
    )
    return server.Services(
        identity=identity_service.IdentityService(
            ready=functools.partial(probe, eng),
            name=driver_name,
            snapshot_metadata=True,
            group_controller=True,
        ),
        controller=controller_service.ControllerService(
            provisioner=provisioner.Provisioner(engine=eng, settings=settings)
        ),
        node=node_service.NodeService(
            volumes=volumes.NodeVolumes(engine=eng, thresholds=thresholds, claims=claims),
            node_id=node_id,
            max_volumes=max_volumes,
        ),
        # served where the controller is: a group's volumes all live in this one pool
        group_controller=group_controller_service.GroupControllerService(
            group_snapshots=groups.GroupSnapshots(engine=eng)
        ),
        # the engine is here, in this process: changed-block tracking reads the pool directly
        snapshot_metadata=snapshot_metadata_service.SnapshotMetadataService(reader=eng),
    )


class PoolProcess:
    """What every process that owns a pool (standalone, the Kubernetes node plugin) runs around its
    engine: the HTTP /healthz + /metrics server, up before the engine opens (assembly and recovery can
    take a while), the trim schedule of the staged filesystems (csi_thin.node.trim), kubelet plugin
    registration when asked for, containerd's Snapshots API when the pool config enables it (on its
    own socket, sharing the engine), and the CSI server, each with its /healthz check."""

    def __init__(self, args: argparse.Namespace, *, endpoint: server.Endpoint) -> None:
        self.metrics = metrics_mod.Metrics()
        self.health = httpserver.Health()
        #: the node service's per-volume claims, shared with the trim schedule (see NodeVolumes)
        self.claims = volumes.Claims()
        self._args = args
        self._endpoint = endpoint
        self._reg = registration.from_args(
            args, endpoint=endpoint, driver_name=args.driver_name, metrics=self.metrics
        )
        # the checks exist before the first probe can arrive: an empty Health would answer 200
        self.health.set("engine", lambda: "the pool engine is opening (assembly and recovery)")
        self.health.set("csi", lambda: "the CSI server is not started yet")
        self._snapshotter: snapshots.SnapshotsServer | None = None

    @contextlib.contextmanager
    def engine(self, cfg: config.PoolConfig, open_engine: EngineFactory) -> Iterator[engine.PoolEngine]:
        """The HTTP server (if asked for), then the engine (assembled, recovered), its metrics attached."""
        with contextlib.ExitStack() as stack:
            if self._args.http_endpoint:
                http = httpserver.HttpServer(
                    self._args.http_endpoint, health=self.health, metrics=self.metrics
                )
                http.start()
                stack.callback(http.stop)
            eng = stack.enter_context(open_engine(cfg))
            self.health.set("engine", lambda: None)
            stack.callback(self.health.set, "engine", lambda: "the pool engine is closed")
            self.metrics.attach_pool(cfg.name, eng)
            stack.callback(self.metrics.attach_pool, cfg.name, None)
            self._snapshotter = snapshots.companion(eng, cfg, metrics=self.metrics)
            trimmer = trim.Trimmer(
                engine=eng, pool=cfg.name, state_dir=cfg.state_dir, claim=self.claims.claim
            )
            self.metrics.attach_trim(cfg.name, trimmer.stats)
            stack.callback(self.metrics.attach_trim, cfg.name, None)
            if cfg.trim.enabled:
                schedule = trim.Scheduler(trimmer, cfg.trim)
                schedule.start()
                stack.callback(schedule.stop)  # before the engine closes (the stack unwinds in reverse)
            yield eng

    def serve(self, svc: server.Services) -> None:
        """Serve CSI (and registration beside it) until SIGTERM/SIGINT, then drain within the grace."""
        srv = server.Server(self._endpoint, svc, metrics=self.metrics)
        self.health.set("csi", srv.problem)
        companions: list[server.Companion] = []
        if self._snapshotter is not None:
            self.health.set("snapshotter", self._snapshotter.problem)
            companions.append(self._snapshotter)
        reg = self._reg
        if reg is not None:
            self.health.set("registration", reg.problem)
            companions.append(reg)
        srv.serve_until_signalled(self._args.grace, companions=companions)


def main(args: argparse.Namespace, *, open_engine: EngineFactory) -> int:
    # the CLI may have configured logging already (at WARNING unless -v): a serving driver logs its calls
    level = "DEBUG" if getattr(args, "verbose", False) else args.log_level.upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger().setLevel(level)
    try:
        endpoint = server.Endpoint.parse(args.endpoint)
        cfg = config.load_pool(args.pool_config)
        if not args.node_id or len(args.node_id) > 128:
            raise errors.InvalidArgument("--node-id must be 1..128 characters")
        proc = PoolProcess(args, endpoint=endpoint)
        with proc.engine(cfg, open_engine) as eng:
            proc.serve(
                services(
                    eng,
                    node_id=args.node_id,
                    block_size=cfg.block_size,
                    thresholds=cfg.thresholds,
                    driver_name=args.driver_name,
                    overprovision_ratio=args.overprovision_ratio,
                    max_volumes=args.max_volumes,
                    claims=proc.claims,
                )
            )
    except errors.CsiThinError as exc:
        log.error("msg=%s code=%s error=%s", "standalone driver failed", exc.code, exc.message)  # noqa: TRY400
        return 1
    return 0
