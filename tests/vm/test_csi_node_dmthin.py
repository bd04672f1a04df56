"""The CSI Node service on real dm-thin (vm tier): the scenarios every backend must pass
(tests/node_scenarios.py), over real gRPC, with the driver restarted in between."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import config, model
from csi_thin import deadline as deadline_mod
from csi_thin.dm import ioctl
from csi_thin.node import mountinfo
from csi_thin.pool import dmthin
from tests import csi_harness as h
from tests import node_scenarios


@pytest.fixture
def workdir() -> Iterator[pathlib.Path]:
    path = pathlib.Path("/scratch") / f"node-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path


def _config(workdir: pathlib.Path) -> config.PoolConfig:
    return config.PoolConfig(
        name=f"n{uuid.uuid4().hex[:6]}",
        backend=config.BackendKind.DMTHIN,
        state_dir=str(workdir / "state"),
        dmthin=config.DmThinConfig(
            data_file=str(workdir / "data.img"), data_size=256 * model.MiB, block_size=64 * model.KiB
        ),
    )


def _devices(cfg: config.PoolConfig) -> list[ioctl.DeviceInfo]:
    """This pool's active thin devices (dm), for a cleanup after a failure."""
    ctl = ioctl.Control()
    infos = (ctl.info(d.name) for d in ctl.list_devices() if d.name.startswith(f"csi-thin-{cfg.name}-"))
    return [i for i in infos if i is not None]


def test_read_only_block_publish_is_read_only(workdir: pathlib.Path) -> None:
    cfg = _config(workdir)

    @contextlib.contextmanager
    def driver() -> Iterator[h.Driver]:
        with h.serve(workdir, dmthin.DmThinBackend(cfg)) as d:
            yield d

    try:
        node_scenarios.read_only_block_publish(workdir, driver)
    finally:
        for mount in sorted(
            m.mount_point for m in mountinfo.read() if m.mount_point.startswith(f"{workdir}/")
        ):
            subprocess.run(["umount", "-l", mount], check=False)
        ours = {os.makedev(d.major, d.minor) for d in _devices(cfg)}
        node_scenarios.drop_views_over(ours)
        dmthin.DmThinBackend(cfg).destroy(deadline=deadline_mod.Deadline.after(60))
    assert not any(d.name.startswith(f"csi-thin-{cfg.name}-") for d in ioctl.Control().list_devices())
