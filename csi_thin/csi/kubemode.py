"""Kubernetes mode: `csi-thin controller` and `csi-thin node`.

- controller (a Deployment, stateless, any number of replicas: the sidecars elect a leader): CSI
  Identity + Controller + GroupController over the CR engine (csi_thin.kube.crengine). The
  provisioning and group snapshot logic is the standalone one (csi_thin.controller.provisioner and
  .groups), in its many-nodes form. With --http-endpoint it
  serves /healthz (the CSI server serves) and /metrics (RPC latency and codes, CR wait time).
- node (a DaemonSet): CSI Identity + Node over the node's pool engine, plus the node agent that
  reconciles this node's CRs through the same engine. Start-up order: load the pool config; take the
  pool's owner lock, assemble, recover (csi_thin.app.open_engine); start the agent (start-up
  reconcile, including the rebuild of a lost LMDB from the CRs); its private control socket in the
  state dir (csi_thin.node.control: `pool gc --orphans --node-id N`); then serve CSI.

The kubeconfig is a file (`--kubeconfig`) or, when absent, the pod's service account.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any

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
    snapshot_metadata_link,
    snapshot_metadata_service,
    standalone,
)
from csi_thin.kube import client as client_mod
from csi_thin.kube import crengine
from csi_thin.node import agent as agent_mod
from csi_thin.node import control, volumes
from csi_thin.pool import engine

log = logging.getLogger(__name__)

#: the controller rounds every size up to a multiple of this; make it a multiple of every node's pool
#: block size (the node rounds up to its own block size, and reports the size it made)
DEFAULT_BLOCK_SIZE = model.MiB

DEFAULT_KUBELET_DIR = "/var/lib/kubelet"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True, help="unix:///path/csi.sock or tcp://host:port")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster service account)")
    p.add_argument("--driver-name", default=identity_service.DEFAULT_NAME)
    p.add_argument("--overprovision-ratio", type=float, default=provisioner.Settings.overprovision_ratio)
    p.add_argument("--grace", type=float, default=server.DEFAULT_GRACE_SECONDS, help="shutdown grace (s)")
    p.add_argument("--log-level", default="INFO")


def _tls_flags(p: argparse.ArgumentParser, *, this: str, other: str) -> None:
    """The snapshot metadata link's mutual TLS (csi_thin.csi.snapshot_metadata_link)."""
    p.add_argument("--snapshot-metadata-tls-cert", default="", help=f"the {this}'s certificate (PEM)")
    p.add_argument("--snapshot-metadata-tls-key", default="", help=f"the {this}'s private key (PEM)")
    p.add_argument(
        "--snapshot-metadata-tls-ca", default="", help=f"the CA that signed the {other}'s certificate"
    )


def _tls(args: argparse.Namespace) -> snapshot_metadata_link.TlsFiles | None:
    files = (args.snapshot_metadata_tls_cert, args.snapshot_metadata_tls_key, args.snapshot_metadata_tls_ca)
    if not any(files):
        return None
    if not all(files):
        raise errors.InvalidArgument(
            "--snapshot-metadata-tls-cert, --snapshot-metadata-tls-key and --snapshot-metadata-tls-ca "
            "go together"
        )
    return snapshot_metadata_link.TlsFiles(cert=files[0], key=files[1], ca=files[2])


def register(subparsers: Any, *, open_engine: standalone.EngineFactory) -> None:
    """Add the `controller` and `node` subcommands."""
    c: argparse.ArgumentParser = subparsers.add_parser(
        "controller", help="Kubernetes mode: CSI Identity + Controller over ThinVolume/ThinSnapshot CRs"
    )
    _common(c)
    c.add_argument("--block-size", default=str(DEFAULT_BLOCK_SIZE), help="size granularity (bytes, 1MiB)")
    c.add_argument(
        "--status-skew-seconds",
        type=float,
        default=crengine.SKEW_SECONDS,
        help="a node whose ThinPool status is older than 3 x its refresh period + this is down",
    )
    # off by default: the controller pod's sidecars have ports of their own; the chart sets it
    httpserver.add_flag(c, default="")
    # with them, the controller serves CSI SnapshotMetadata by forwarding to the snapshot's node
    _tls_flags(c, this="controller", other="nodes")
    c.set_defaults(func=controller_main)

    n: argparse.ArgumentParser = subparsers.add_parser(
        "node", help="Kubernetes mode: CSI Identity + Node and the node agent that owns the pool"
    )
    _common(n)
    n.add_argument("--node-id", default=socket.gethostname(), help="this node's name ($NODE_NAME)")
    n.add_argument("--pool-config", required=True, help="pool config file (YAML)")
    n.add_argument("--max-volumes", type=int, default=0, help="NodeGetInfo max_volumes_per_node (0: none)")
    registration.add_flags(n)
    n.set_defaults(kubelet_dir=DEFAULT_KUBELET_DIR)  # a node plugin registers with kubelet by default
    httpserver.add_flag(n, default=f"127.0.0.1:{httpserver.DEFAULT_PORT}")
    n.add_argument(
        "--refresh-seconds", type=float, default=agent_mod.REFRESH_SECONDS, help="ThinPool status period"
    )
    n.add_argument(
        "--snapshot-metadata-listen",
        default="",
        help="host:port to serve CSI SnapshotMetadata to the controller on (mutual TLS; off when empty)",
    )
    _tls_flags(n, this="node", other="controller")
    n.set_defaults(func=functools.partial(node_main, open_engine=open_engine))


def _logging(args: argparse.Namespace) -> None:
    level = "DEBUG" if getattr(args, "verbose", False) else args.log_level.upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger().setLevel(level)


def controller_services(
    api: client_mod.Client,
    *,
    block_size: int,
    driver_name: str = identity_service.DEFAULT_NAME,
    overprovision_ratio: float = provisioner.Settings.overprovision_ratio,
    metrics: metrics_mod.Metrics | None = None,
    skew_seconds: float = crengine.SKEW_SECONDS,
    snapshot_metadata_tls: snapshot_metadata_link.TlsFiles | None = None,
) -> server.Services:
    cr = crengine.CrEngine(
        api, on_wait=metrics.cr_wait if metrics else crengine.no_observer, skew_seconds=skew_seconds
    )
    settings = provisioner.Settings(
        node_id=None, block_size=block_size, overprovision_ratio=overprovision_ratio
    )
    forwarder = (
        None
        if snapshot_metadata_tls is None
        else snapshot_metadata_link.Forwarder(router=cr, tls=snapshot_metadata_tls)
    )
    return server.Services(
        identity=identity_service.IdentityService(
            ready=lambda _dl: True,
            name=driver_name,
            group_controller=True,
            snapshot_metadata=forwarder is not None,
        ),
        controller=controller_service.ControllerService(
            provisioner=provisioner.Provisioner(engine=cr, settings=settings, nodes=cr.on)
        ),
        # a group's volumes must share a node: the CR engine refuses others before writing anything
        group_controller=group_controller_service.GroupControllerService(
            group_snapshots=groups.GroupSnapshots(engine=cr)
        ),
        snapshot_metadata=forwarder,
    )


def controller_main(args: argparse.Namespace) -> int:
    _logging(args)
    try:
        endpoint = server.Endpoint.parse(args.endpoint)
        block_size = config.parse_size(args.block_size)
        metrics = metrics_mod.Metrics()
        api = client_mod.connect(args.kubeconfig)
        with contextlib.ExitStack() as stack:
            stack.callback(api.close)
            svc = controller_services(
                api,
                block_size=block_size,
                driver_name=args.driver_name,
                overprovision_ratio=args.overprovision_ratio,
                metrics=metrics,
                skew_seconds=args.status_skew_seconds,
                snapshot_metadata_tls=_tls(args),
            )
            srv = server.Server(endpoint, svc, metrics=metrics)
            if args.http_endpoint:
                health = httpserver.Health()
                health.set("csi", srv.problem)
                http = httpserver.HttpServer(args.http_endpoint, health=health, metrics=metrics)
                http.start()
                stack.callback(http.stop)
            srv.serve_until_signalled(args.grace)
    except errors.CsiThinError as exc:
        log.error("msg=%s code=%s error=%s", "controller failed", exc.code, exc.message)  # noqa: TRY400
        return 1
    return 0


class _AgentPool:
    """The pool as the metrics read it in Kubernetes mode: the engine's, with the agent's orphans."""

    def __init__(self, eng: engine.PoolEngine, agent: agent_mod.Agent) -> None:
        self._eng = eng
        self._agent = agent

    @property
    def thresholds(self) -> model.Thresholds:
        return self._eng.thresholds

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        return self._eng.status(deadline=deadline)

    def totals(self) -> model.Totals:
        return self._eng.totals()

    def intents(self) -> Sequence[object]:
        return self._eng.intents()

    def orphans(self) -> Sequence[object]:
        return self._agent.orphans()


def node_main(args: argparse.Namespace, *, open_engine: standalone.EngineFactory) -> int:
    _logging(args)
    try:
        endpoint = server.Endpoint.parse(args.endpoint)
        cfg = config.load_pool(args.pool_config)
        if not args.node_id or len(args.node_id) > 128:
            raise errors.InvalidArgument("--node-id must be 1..128 characters")
        tls = _tls(args)
        if bool(args.snapshot_metadata_listen) != (tls is not None):
            raise errors.InvalidArgument(
                "--snapshot-metadata-listen needs the --snapshot-metadata-tls-* files"
            )
        proc = standalone.PoolProcess(args, endpoint=endpoint)
        api = client_mod.connect(args.kubeconfig)
        with contextlib.ExitStack() as stack:
            stack.callback(api.close)
            eng = stack.enter_context(proc.engine(cfg, open_engine))
            link_address = ""
            if tls is not None:
                # before the agent: its first ThinPool status publishes where the controller finds it
                link = snapshot_metadata_link.NodeServer(
                    args.snapshot_metadata_listen,
                    snapshot_metadata_service.SnapshotMetadataService(reader=eng),
                    tls=tls,
                    metrics=proc.metrics,
                )
                link.start()
                stack.callback(link.stop)
                link_address = link.address
            agent = agent_mod.Agent(
                api=api,
                engine=eng,
                node=args.node_id,
                pool=cfg.name,
                overprovision_ratio=args.overprovision_ratio,
                refresh_seconds=args.refresh_seconds,
                on_error=proc.metrics.reconcile_error,
                on_operation=proc.metrics.pool_operation,
                snapshot_metadata_endpoint=link_address,
            )
            agent.start(deadline=deadline_mod.default())
            stack.callback(agent.stop)
            # orphans as the agent sees them (records no CR owns too), not only ids no record owns
            proc.metrics.attach_pool(cfg.name, _AgentPool(eng, agent))
            ctl = control.Server(cfg.state_dir, agent=agent, node=args.node_id)
            ctl.start()  # `csi-thin pool gc --orphans --node-id N` asks here
            stack.callback(ctl.stop)
            proc.serve(
                server.Services(
                    identity=identity_service.IdentityService(
                        ready=functools.partial(standalone.probe, eng),
                        name=args.driver_name,
                        controller=False,
                    ),
                    node=node_service.NodeService(
                        volumes=volumes.NodeVolumes(
                            engine=eng, thresholds=cfg.thresholds, claims=proc.claims
                        ),
                        node_id=args.node_id,
                        max_volumes=args.max_volumes,
                    ),
                )
            )
    except errors.CsiThinError as exc:
        log.error("msg=%s code=%s error=%s", "node failed", exc.code, exc.message)  # noqa: TRY400
        return 1
    return 0
