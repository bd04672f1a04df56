"""containerd's Snapshots API served by the real `csi-thin snapshotter` process on real dm-thin
(vm tier): the same scenarios as on reflink (tests/snapshotter_client.py), every RPC and error code,
the returned thin devices mounted, committed layers deactivated, nothing left in the pool."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import demo
from tests import conftest, snapshotter_client


@pytest.fixture
def work() -> Iterator[pathlib.Path]:
    path = pathlib.Path("/scratch") / f"snap-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    problems = demo.cleanup(path, path / "pool.yaml")
    assert not problems, problems


def test_snapshotter_every_rpc_and_error_code(work: pathlib.Path) -> None:
    snapshotter_client.lifecycle(work, "dmthin")
    conftest.report("snapshotter (dm-thin): every Snapshots RPC and error code over the socket, mounted")


def test_snapshotter_async_remove_and_restart(work: pathlib.Path) -> None:
    snapshotter_client.async_remove_and_restart(work, "dmthin")
