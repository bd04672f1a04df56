"""Changed-block tracking on real dm-thin (vm tier): the CSI SnapshotMetadata service over real gRPC,
its ranges read by thin_dump / thin_delta from a metadata snapshot of the live pool, checked by a
client that rebuilds snapshots from them (tests/cbt_scenarios.py); and the metadata snapshot is
released on every path, a failed one included."""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import config, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.dm import ioctl
from csi_thin.pool import dmthin, faults
from tests import cbt_scenarios
from tests import csi_harness as h


@pytest.fixture
def workdir() -> Iterator[pathlib.Path]:
    path = pathlib.Path("/scratch") / f"cbt-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path


@contextlib.contextmanager
def _driver(workdir: pathlib.Path) -> Iterator[tuple[h.Driver, csi_pb2_grpc.SnapshotMetadataStub]]:
    cfg = config.PoolConfig(
        name=f"c{uuid.uuid4().hex[:6]}",
        backend=config.BackendKind.DMTHIN,
        state_dir=str(workdir / "state"),
        dmthin=config.DmThinConfig(
            data_file=str(workdir / "data.img"), data_size=256 * model.MiB, block_size=64 * model.KiB
        ),
    )
    try:
        with (
            h.serve(workdir, dmthin.DmThinBackend(cfg)) as d,
            grpc.insecure_channel(f"unix://{d.socket}") as ch,
        ):
            yield d, csi_pb2_grpc.SnapshotMetadataStub(ch)
    finally:
        dmthin.DmThinBackend(cfg).destroy(deadline=deadline_mod.Deadline.after(60))
    assert not any(d.name.startswith(f"csi-thin-{cfg.name}-") for d in ioctl.Control().list_devices())


def _held_root(be: dmthin.DmThinBackend) -> str:
    [target] = ioctl.Control().status(be.pool_name)
    return target.params.split()[3]


def test_backup_and_restore_from_ranges(workdir: pathlib.Path) -> None:
    with _driver(workdir) as (d, stub):
        cbt_scenarios.backup_and_restore(d, stub, workdir)
        assert _held_root(d.backend) == "-"  # type: ignore[arg-type]


def test_blocks_zeroed_since_the_base_are_in_the_delta(workdir: pathlib.Path) -> None:
    with _driver(workdir) as (d, stub):
        cbt_scenarios.zeroed_since_the_base(d, stub, workdir)
        assert _held_root(d.backend) == "-"  # type: ignore[arg-type]


def test_errors_and_streaming(workdir: pathlib.Path) -> None:
    with _driver(workdir) as (d, stub):
        cbt_scenarios.errors_and_streaming(d, stub)


@pytest.mark.parametrize("point", ["dmthin:metadata_snap/reserved", "dmthin:metadata_snap/read"])
def test_metadata_snapshot_released_when_a_read_fails(workdir: pathlib.Path, point: str) -> None:
    with _driver(workdir) as (d, stub):
        vol = d.controller.CreateVolume(h.create_req("cbt-f", 64 * model.MiB, h.block_cap())).volume.volume_id
        cbt_scenarios.write(d, vol, [(0, b"f" * 64 * model.KiB)])
        a = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-fa", source_volume_id=vol))
        b = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-fb", source_volume_id=vol))
        req = csi_pb2.GetMetadataDeltaRequest(
            base_snapshot_id=a.snapshot.snapshot_id, target_snapshot_id=b.snapshot.snapshot_id
        )
        reached: list[str] = []

        def fail(p: str) -> None:
            if p == point:
                reached.append(p)
                raise errors.Unavailable(f"injected at {p}")

        faults.hook = fail
        try:
            assert (
                h.code_of(lambda: list(stub.GetMetadataDelta(req, timeout=60))) == grpc.StatusCode.UNAVAILABLE
            )
        finally:
            faults.hook = None
        assert reached == [point]
        assert _held_root(d.backend) == "-"  # type: ignore[arg-type]
        # and the next reader gets its own snapshot: nothing was left behind
        assert cbt_scenarios.check_stream(stub.GetMetadataDelta(req, timeout=60)).ranges == []
