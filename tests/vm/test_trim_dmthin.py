"""Space given back to a dm-thin pool (vm tier): a staged filesystem trimmed by `csi-thin pool trim`
discards its free blocks, the thin device unmaps them, and the pool's used data blocks fall by what
the deleted file held; with discard_passdown the pool's data file gets its holes back too."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import yaml

from csi_thin import config, model
from csi_thin import deadline as deadline_mod
from csi_thin.dm import ioctl
from csi_thin.node import mountinfo
from csi_thin.pool import dmthin
from tests import csi_harness as h
from tests import node_scenarios


@pytest.fixture
def workdir() -> Iterator[pathlib.Path]:
    path = pathlib.Path("/scratch") / f"trim-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_trim_gives_deleted_space_back(workdir: pathlib.Path, fs_type: str) -> None:
    raw = {
        "name": f"t{uuid.uuid4().hex[:6]}",
        "backend": "dmthin",
        "state_dir": str(workdir / "state"),
        "dmthin": {"data_file": str(workdir / "data.img"), "data_size": "1GiB", "block_size": "64KiB"},
    }
    config_file = workdir / "pool.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    cfg = config.pool_from_dict(raw)

    @contextlib.contextmanager
    def driver() -> Iterator[h.Driver]:
        with h.serve(workdir, dmthin.DmThinBackend(cfg)) as d:
            yield d

    try:
        node_scenarios.trim_gives_space_back(workdir, driver, config_file=config_file, fs_type=fs_type)
        # passdown: the pool handed the discards on to its loop device, which punched holes in the
        # data file, so the host's disk got the space back too (the file holds far less than 200 MiB)
        assert os.stat(workdir / "data.img").st_blocks * model.SECTOR < 100 * model.MiB
    finally:
        for mount in sorted(
            m.mount_point for m in mountinfo.read() if m.mount_point.startswith(f"{workdir}/")
        ):
            subprocess.run(["umount", "-l", mount], check=False)
        dmthin.DmThinBackend(cfg).destroy(deadline=deadline_mod.Deadline.after(60))
    assert not any(d.name.startswith(f"csi-thin-{cfg.name}-") for d in ioctl.Control().list_devices())
