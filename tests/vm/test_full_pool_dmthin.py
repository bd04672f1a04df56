"""A full dm-thin pool heals (tests/fullpool.py): a 128 MiB loop-file pool with error_if_no_space is
filled through a mounted ext4 volume over real gRPC, then a delete frees it with no restart."""

from __future__ import annotations

import pathlib
import uuid

from csi_thin import config, model
from csi_thin import deadline as deadline_mod
from csi_thin.dm import ioctl
from csi_thin.pool import dmthin
from tests import csi_harness as h
from tests import fullpool

MiB = model.MiB


def test_a_full_dmthin_pool_serves_deletes_and_heals() -> None:
    root = pathlib.Path("/scratch") / f"full-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    cfg = config.PoolConfig(
        name=f"f{uuid.uuid4().hex[:6]}",
        backend=config.BackendKind.DMTHIN,
        state_dir=str(root / "state"),
        dmthin=config.DmThinConfig(
            data_file=str(root / "data.img"),
            data_size=128 * MiB,
            block_size=64 * model.KiB,
            error_if_no_space=True,  # writes fail fast instead of queueing for no_space_timeout
        ),
    )
    try:
        fullpool.run(
            lambda: h.serve(root, dmthin.DmThinBackend(cfg)),
            root,
            filler_bytes=256 * MiB,
            shared_rw_mount_fails=True,
        )
    finally:
        fullpool.unmount_under(root)
        dmthin.DmThinBackend(cfg).destroy(deadline=deadline_mod.Deadline.after(120))
    assert not any(dev.name.startswith(f"csi-thin-{cfg.name}-") for dev in ioctl.Control().list_devices())
