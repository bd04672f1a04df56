"""The real `csi-thin standalone` process, restarted between NodeStageVolume and NodePublishVolume
(gracefully, and by SIGKILL as in a node-plugin crash): the staged volume survives the restart and
publish, write, stats, unpublish, unstage and delete all keep working. Reflink backend, natively."""

from __future__ import annotations

import os
import pathlib
import signal
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import demo
from csi_thin.csi.pb import csi_pb2

MiB = 1024 * 1024


@pytest.fixture
def work(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    yield tmp_path
    problems = demo.cleanup(tmp_path, tmp_path / "pool.yaml")
    assert not problems, problems


def _connect(work: pathlib.Path, proc: object) -> tuple[demo.Demo, grpc.Channel]:
    channel = grpc.insecure_channel(f"unix://{work / 'csi.sock'}")
    d = demo.Demo(channel)
    demo.wait_ready(d, proc)  # type: ignore[arg-type]
    return d, channel


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_between_stage_and_publish(work: pathlib.Path, how: str) -> None:
    config = demo.pool_config(work, "reflink")
    cap = demo.mount_cap("ext4")
    stage, target = work / "stage", work / "target"
    with demo.driver(config, work / "csi.sock") as proc:
        d, channel = _connect(work, proc)
        with channel:
            vol = d.create("pvc-restart", 64 * MiB, cap)
            d.stage(vol, cap, stage)
        if how == "sigkill":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert os.path.ismount(stage), "the staged filesystem must outlive the driver process"

    with demo.driver(config, work / "csi.sock") as proc:
        d, channel = _connect(work, proc)
        with channel:
            d.stage(vol, cap, stage)  # a retried stage after the restart is idempotent
            d.publish(vol, cap, stage, target)
            (target / "after-restart").write_text("ok")
            stats = d.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(target))
            )
            assert any(u.total > 0 for u in stats.usage)
            health = d.node.NodeGetVolumeHealth(
                csi_pb2.NodeGetVolumeHealthRequest(
                    volume_id=vol.volume_id, staging_target_path=str(stage), volume_publish_path=str(target)
                )
            ).volume_health
            assert not health.health_statuses, health
            d.release(vol.volume_id, stage, target)
            assert not os.path.ismount(stage)
            d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
            assert not d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
