"""A full reflink pool heals (tests/fullpool.py): the pool filesystem (a loop-mounted XFS image) is
filled through a mounted ext4 volume over real gRPC, then a delete frees it with no restart."""

from __future__ import annotations

import pathlib

from csi_thin import deadline as deadline_mod
from csi_thin.pool import reflink
from tests import csi_harness as h
from tests import fullpool

MiB = h.MiB


def test_a_full_reflink_pool_serves_deletes_and_heals(tmp_path: pathlib.Path) -> None:
    # mkfs.xfs's minimum is 300 MB: the smallest pool image it makes
    cfg = h.reflink_config(tmp_path, size="320MiB")
    try:
        fullpool.run(
            lambda: h.serve(tmp_path, reflink.ReflinkBackend(cfg)),
            tmp_path,
            filler_bytes=512 * MiB,
            shared_rw_mount_fails=False,
        )
    finally:
        fullpool.unmount_under(tmp_path, keep=str(tmp_path / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline_mod.default())
