"""containerd's Snapshots API served by the real `csi-thin snapshotter` process on a reflink pool
(real loop devices, mkfs, the returned mounts mounted), through a Python gRPC client: every RPC and
error code (tests/snapshotter_client.py). Everything under the temp dir is cleaned up, failure
included."""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import demo
from csi_thin.csi.pb import csi_pb2
from tests import conftest, snapshotter_client

pb = snapshotter_client.pb
MiB = snapshotter_client.MiB


@pytest.fixture
def work(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    yield tmp_path
    problems = demo.cleanup(tmp_path, tmp_path / "pool.yaml")
    assert not problems, problems


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_every_rpc_and_error_code(work: pathlib.Path, fs_type: str) -> None:
    snapshotter_client.lifecycle(work, "reflink", fs_type)
    conftest.report(
        f"snapshotter (reflink, {fs_type}): every Snapshots RPC and error code over the socket, mounted"
    )


def test_async_remove_and_restart_on_a_stale_socket(work: pathlib.Path) -> None:
    snapshotter_client.async_remove_and_restart(work, "reflink")


def test_the_node_process_serves_it_beside_csi(work: pathlib.Path) -> None:
    """`snapshotter.enabled` in the pool config: the standalone driver (the node process) serves the
    Snapshots API on its socket, on its own engine; GetCapacity counts the layer's size like a
    volume's, and `pool list` shows the layer."""
    sock = work / "snap.sock"
    config = snapshotter_client.pool_config(
        work, "reflink", snapshotter=f"{{enabled: true, socket: {sock}, base_image_size: 64MiB}}"
    )
    # an overprovision ratio below 1: the logical bound (ratio x data - provisioned) decides
    with demo.driver(config, work / "csi.sock", extra_args=["--overprovision-ratio", "0.5"]) as proc:
        d, channel = _connect(work, proc)
        with channel, snapshotter_client.client(sock) as c:
            snapshotter_client.wait_serving(sock, proc)
            assert snapshotter_client.socket_mode(sock) == 0o600
            before = d.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
            c.Prepare(pb.PrepareSnapshotRequest(key="default/1/extract"))
            after = d.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
            assert before - after == 64 * MiB, (before, after)
            vol = d.create("pvc-beside", 16 * MiB, demo.mount_cap("ext4"))
            kinds = sorted(str(x["kind"]) for x in snapshotter_client.devices(config))
            assert kinds == ["layer", "volume"], kinds
            c.Remove(pb.RemoveSnapshotRequest(key="default/1/extract"))
            d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
            assert snapshotter_client.devices(config) == []
    assert not sock.exists(), "the node process removes its snapshotter socket when it stops"


def _connect(work: pathlib.Path, proc: subprocess.Popen[bytes]) -> tuple[demo.Demo, grpc.Channel]:
    channel = grpc.insecure_channel(f"unix://{work / 'csi.sock'}")
    d = demo.Demo(channel)
    demo.wait_ready(d, proc)
    return d, channel
