"""containerd's Snapshots API served by the real `csi-thin snapshotter` process on a reflink pool
(real loop devices, mkfs, the returned mounts mounted), through a Python gRPC client: every RPC and
error code (tests/snapshotter_client.py). Everything under the temp dir is cleaned up, failure
included."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from csi_thin import demo
from tests import conftest, snapshotter_client


@pytest.fixture
def work(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    yield tmp_path
    problems = demo.cleanup(tmp_path, tmp_path / "pool.yaml")
    assert not problems, problems


def test_every_rpc_and_error_code(work: pathlib.Path) -> None:
    snapshotter_client.lifecycle(work, "reflink")
    conftest.report(
        "snapshotter (reflink): every Snapshots RPC and error code over the socket, mounts mounted"
    )


def test_async_remove_and_restart_on_a_stale_socket(work: pathlib.Path) -> None:
    snapshotter_client.async_remove_and_restart(work, "reflink")
