"""The dm-thin backend's guard on its configured block devices, with real block devices (loop devices
stand in for disks; the host has no device-mapper, so nothing here may reach it)."""

from __future__ import annotations

import pathlib

import pytest

from csi_thin import config, errors
from csi_thin import deadline as deadline_mod
from csi_thin.dm import loop
from csi_thin.pool import dmthin


class _NoPoolYet:
    """A Control on a host without the pool; any call that would build one is recorded, not made."""

    def __init__(self) -> None:
        self.building: list[str] = []

    def info(self, name: str) -> None:
        return None

    def __getattr__(self, name: str) -> object:
        def record(*args: object, **kwargs: object) -> None:
            self.building.append(name)
            raise AssertionError(f"the pool is being built: Control.{name}")

        return record


def test_assemble_refuses_one_disk_under_two_names(tmp_path: pathlib.Path) -> None:
    """/dev/sdb and /dev/disk/by-id/...: two names, one disk. The kernel would take it as both the
    pool's metadata and its data, format the metadata at its start, where the first data blocks land
    too: the first volume writes would overwrite the pool's metadata."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    dev = loop.attach(str(backing))
    try:
        alias = tmp_path / "by-id"
        alias.symlink_to(dev)
        cfg = config.PoolConfig(
            name="blk",
            backend=config.BackendKind.DMTHIN,
            state_dir=str(tmp_path / "state"),
            dmthin=config.DmThinConfig(data_device=dev, metadata_device=str(alias)),
        )
        ctl = _NoPoolYet()
        be = dmthin.DmThinBackend(cfg, control=ctl)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument, match="one device"):
            be.assemble(deadline=deadline_mod.Deadline.after(30))
        assert ctl.building == []
    finally:
        loop.detach(dev)
