"""Space given back to a reflink pool, natively: a staged filesystem trimmed by `csi-thin pool trim`
discards its free blocks, the buffered loop device under it punches holes in the volume's sparse
file, and the pool filesystem's used space falls by what the deleted file held."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from csi_thin import deadline
from csi_thin.pool import reflink
from tests import csi_harness as h
from tests import node_scenarios
from tests.root import test_csi_node as base


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_trim_gives_deleted_space_back(tmp_path: pathlib.Path, fs_type: str) -> None:
    raw = h.reflink_raw(tmp_path)
    config_file = tmp_path / "pool.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    cfg = h.reflink_config(tmp_path)
    try:
        node_scenarios.trim_gives_space_back(
            tmp_path, lambda: base.reflink_driver(tmp_path), config_file=config_file, fs_type=fs_type
        )
    finally:
        base._cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())
