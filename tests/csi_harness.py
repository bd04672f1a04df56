"""A standalone CSI driver served in-process over a real unix socket, and clients for it.

The server is the real one (csi_thin.csi.server with the standalone composition) over the real
PoolEngine and LMDB; only the backend varies: tests.fakes.FakeBackend for the gRPC/controller tier,
the reflink backend (real loop devices) for the root tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator

import grpc

from csi_thin import config, model
from csi_thin import deadline as deadline_mod
from csi_thin import metrics as metrics_mod
from csi_thin.csi import server, standalone
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import engine as engine_mod
from csi_thin.store import lmdb_store
from tests import fakes

MiB = model.MiB
GiB = model.GiB
Mode = csi_pb2.VolumeCapability.AccessMode


@dataclasses.dataclass
class Driver:
    identity: csi_pb2_grpc.IdentityStub
    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub
    group: csi_pb2_grpc.GroupControllerStub
    engine: engine_mod.PoolEngine
    backend: backend_mod.Backend
    socket: pathlib.Path
    node_id: str
    server: server.Server


@contextlib.contextmanager
def serve(
    workdir: pathlib.Path,
    backend: backend_mod.Backend,
    *,
    block_size: int = 64 * 1024,
    thresholds: model.Thresholds | None = None,
    node_id: str = "node-1",
    overprovision_ratio: float = 10.0,
    metrics: metrics_mod.Metrics | None = None,
) -> Iterator[Driver]:
    thresholds = thresholds or model.Thresholds()
    backend.assemble(deadline=deadline_mod.default())
    sock = workdir / "csi.sock"
    with lmdb_store.LmdbStore(str(workdir / "state")) as store:
        eng = engine_mod.PoolEngine(
            backend=backend, store=store, thresholds=thresholds, block_size=block_size
        )
        eng.recover(deadline=deadline_mod.default())
        svc = standalone.services(
            eng,
            node_id=node_id,
            block_size=block_size,
            thresholds=thresholds,
            overprovision_ratio=overprovision_ratio,
        )
        srv = server.Server(server.Endpoint.parse(f"unix://{sock}"), svc, metrics=metrics)
        srv.start()
        try:
            with grpc.insecure_channel(f"unix://{sock}") as channel:
                yield Driver(
                    identity=csi_pb2_grpc.IdentityStub(channel),
                    controller=csi_pb2_grpc.ControllerStub(channel),
                    node=csi_pb2_grpc.NodeStub(channel),
                    group=csi_pb2_grpc.GroupControllerStub(channel),
                    engine=eng,
                    backend=backend,
                    socket=sock,
                    node_id=node_id,
                    server=srv,
                )
        finally:
            srv.stop(grace=5)


@contextlib.contextmanager
def fake_driver(workdir: pathlib.Path, **kwargs: object) -> Iterator[Driver]:
    data_total = kwargs.pop("data_total", 64 * GiB)
    backend = fakes.FakeBackend(str(workdir / "fake-pool.json"), data_total=data_total)  # type: ignore[arg-type]
    with serve(workdir, backend, **kwargs) as d:  # type: ignore[arg-type]
        yield d


def exported_metric_names(workdir: pathlib.Path) -> set[str]:
    """Every sample name a csi-thin process exports (a pool and its trim totals attached, a
    registration state, a call made, a pool operation of the node agent, a CR wait of the
    controller): what alert rules and dashboards may read."""
    m = metrics_mod.Metrics()
    with fake_driver(workdir, metrics=m) as d:
        m.attach_pool("p", d.engine)
        m.attach_trim("p", model.TrimStats)
        m.registration("failed")
        d.controller.CreateVolume(create_req("pvc-1"))
        m.pool_operation("create_volume", "OK", 0.1)
        m.cr_wait("create_volume", "ok", 0.1)
        return {s.name for fam in m.registry.collect() for s in fam.samples}


def reflink_raw(workdir: pathlib.Path, size: str = "2GiB") -> dict[str, object]:
    """The pool config file's content for a reflink pool on an image under workdir."""
    return {
        "name": "test",
        "backend": "reflink",
        "state_dir": str(workdir / "state"),
        "reflink": {
            "directory": str(workdir / "pool"),
            "image_file": str(workdir / "pool.img"),
            "image_size": size,
            "fs_type": "xfs",
        },
    }


def reflink_config(workdir: pathlib.Path, size: str = "2GiB") -> config.PoolConfig:
    return config.pool_from_dict(reflink_raw(workdir, size))


def mount_cap(
    fs_type: str = "", mode: int = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode),
    )


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))


def create_req(
    name: str, size: int = 64 * MiB, cap: csi_pb2.VolumeCapability | None = None, **kw: object
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[cap or mount_cap()],
        **kw,  # type: ignore[arg-type]
    )


def code_of(call: object) -> grpc.StatusCode:
    """Run a zero-argument callable that makes one RPC; the status code it failed with."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
