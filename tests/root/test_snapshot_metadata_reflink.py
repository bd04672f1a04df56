"""Changed-block tracking on the reflink backend, natively: the CSI SnapshotMetadata service over
real gRPC on a reflink pool (XFS image on a loop device), its ranges from the snapshot files'
FIEMAP extent maps, checked by a client that rebuilds snapshots from them (tests/cbt_scenarios.py)."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import deadline
from csi_thin.csi.pb import csi_pb2_grpc
from csi_thin.pool import reflink
from tests import cbt_scenarios
from tests import csi_harness as h
from tests.root import test_csi_node as base


@contextlib.contextmanager
def _driver(workdir: pathlib.Path, **kw: object) -> Iterator[tuple[h.Driver, csi_pb2_grpc.SnapshotMetadataStub]]:
    cfg = h.reflink_config(workdir)
    try:
        with base.reflink_driver(workdir, **kw) as d, grpc.insecure_channel(f"unix://{d.socket}") as ch:
            yield d, csi_pb2_grpc.SnapshotMetadataStub(ch)
    finally:
        base._cleanup_mounts(workdir, keep=str(workdir / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


def test_backup_and_restore_from_ranges(tmp_path: pathlib.Path) -> None:
    with _driver(tmp_path) as (d, stub):
        cbt_scenarios.backup_and_restore(d, stub, tmp_path)


def test_errors_and_streaming(tmp_path: pathlib.Path) -> None:
    with _driver(tmp_path) as (d, stub):
        cbt_scenarios.errors_and_streaming(d, stub)
