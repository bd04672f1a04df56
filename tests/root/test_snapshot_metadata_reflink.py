"""Changed-block tracking on the reflink backend, natively: the CSI SnapshotMetadata service over
real gRPC on a reflink pool (XFS image on a loop device), its ranges from the snapshot files'
FIEMAP extent maps, checked by a client that rebuilds snapshots from them (tests/cbt_scenarios.py)."""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import config, deadline, model
from csi_thin import metrics as metrics_mod
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.pool import reflink
from tests import cbt_scenarios
from tests import csi_harness as h
from tests.root import test_csi_node as base

MiB = model.MiB


@contextlib.contextmanager
def _driver(
    workdir: pathlib.Path, fs_type: str = "xfs", **kw: object
) -> Iterator[tuple[h.Driver, csi_pb2_grpc.SnapshotMetadataStub]]:
    raw = h.reflink_raw(workdir)
    raw["reflink"]["fs_type"] = fs_type  # type: ignore[index]
    cfg = config.pool_from_dict(raw)
    try:
        with (
            h.serve(workdir, reflink.ReflinkBackend(cfg), **kw) as d,  # type: ignore[arg-type]
            grpc.insecure_channel(f"unix://{d.socket}") as ch,
        ):
            yield d, csi_pb2_grpc.SnapshotMetadataStub(ch)
    finally:
        base._cleanup_mounts(workdir, keep=str(workdir / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


@pytest.mark.parametrize("fs_type", ["xfs", "btrfs"])
def test_backup_and_restore_from_ranges(tmp_path: pathlib.Path, fs_type: str) -> None:
    with _driver(tmp_path, fs_type) as (d, stub):
        cbt_scenarios.backup_and_restore(d, stub, tmp_path)


@pytest.mark.parametrize("fs_type", ["xfs", "btrfs"])
def test_blocks_zeroed_since_the_base_are_in_the_delta(tmp_path: pathlib.Path, fs_type: str) -> None:
    with _driver(tmp_path, fs_type) as (d, stub):
        cbt_scenarios.zeroed_since_the_base(d, stub, tmp_path)


def test_errors_and_streaming(tmp_path: pathlib.Path) -> None:
    with _driver(tmp_path) as (d, stub):
        cbt_scenarios.errors_and_streaming(d, stub)


def _ended(m: metrics_mod.Metrics, code: str) -> float:
    """How many GetMetadataAllocated streams the server saw end with `code`."""
    for fam in m.registry.collect():
        for s in fam.samples:
            if s.name == "csi_thin_operation_duration_seconds_count" and s.labels == {
                "operation": "GetMetadataAllocated",
                "grpc_code": code,
            }:
                return float(s.value)
    return 0.0


def _wait_for(m: metrics_mod.Metrics, code: str, count: int) -> None:
    """Wait (bounded) for the server's side of a stream to end: it notices at its next send."""
    for _ in deadline.Deadline.after(10).backoff(first=0.01, cap=0.2):
        if _ended(m, code) == count:
            return
    ends = {c: _ended(m, c) for c in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL")}
    raise AssertionError(f"the server saw no {count} stream(s) end {code}: {ends}")


def test_stream_ends_on_cancel_and_deadline(tmp_path: pathlib.Path) -> None:
    """A stream longer than gRPC's flow-control window (BDP probing off: a 64 KiB window) blocks the
    server until the client reads; the client's cancel and its deadline end it on the server too."""
    m = metrics_mod.Metrics()
    with _driver(tmp_path, metrics=m) as (d, _):
        vol = d.controller.CreateVolume(h.create_req("cbt-many", 64 * MiB, h.block_cap())).volume.volume_id
        # every other 4 KiB block: 8192 extents, 8192 messages of one range each (~300 KiB)
        cbt_scenarios.write(d, vol, [(off, b"d" * 4096) for off in range(0, 64 * MiB, 8192)])
        snap = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-m", source_volume_id=vol))
        req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snap.snapshot.snapshot_id, max_results=1)
        with grpc.insecure_channel(f"unix://{d.socket}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
            stub = csi_pb2_grpc.SnapshotMetadataStub(ch)
            assert len(cbt_scenarios.check_stream(stub.GetMetadataAllocated(req, timeout=60)).ranges) == 8192
            _wait_for(m, "OK", 1)

            call = stub.GetMetadataAllocated(req, timeout=60)
            next(call)
            call.cancel()
            assert h.code_of(lambda: list(call)) == grpc.StatusCode.CANCELLED
            _wait_for(m, "CANCELLED", 1)

            call = stub.GetMetadataAllocated(req, timeout=2)
            next(call)
            time.sleep(2.5)  # the client reads nothing more until its deadline has passed
            assert h.code_of(lambda: list(call)) == grpc.StatusCode.DEADLINE_EXCEEDED
            _wait_for(m, "DEADLINE_EXCEEDED", 1)
        assert _ended(m, "OK") == 1
