"""thin_dump and thin_delta (thin-provisioning-tools, from Debian) read by csi_thin.dm.thintools for
changed-block tracking: on pool metadata written by thin_restore from a known layout, so the real
tools' output is parsed without a kernel (tests/vm reads a live pool's metadata snapshot)."""

from __future__ import annotations

import pathlib

import pytest

from csi_thin import deadline, runner
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import thintools

LAYOUT = """<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128"
  nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="12" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
    <single_mapping origin_block="20" data_block="30" time="0"/>
    <single_mapping origin_block="21" data_block="31" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="12" transaction="0" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="5" time="0"/>
    <range_mapping origin_begin="5" data_begin="40" length="5" time="1"/>
    <single_mapping origin_block="20" data_block="30" time="0"/>
    <single_mapping origin_block="50" data_block="60" time="1"/>
  </device>
</superblock>
"""


@pytest.fixture
def metadata(tmp_path: pathlib.Path) -> str:
    xml = tmp_path / "layout.xml"
    xml.write_text(LAYOUT)
    meta = tmp_path / "meta.bin"
    with meta.open("wb") as f:
        f.truncate(8 * 1024 * 1024)
    runner.run(["thin_restore", "-i", str(xml), "-o", str(meta)], deadline=deadline.default())
    return str(meta)


def test_mappings(metadata: str) -> None:
    runs = thintools.mappings(metadata, 1, deadline=deadline.default(), metadata_snap=False)
    assert runs.block_bytes == 64 * 1024
    assert runs.runs == ((0, 10), (20, 2))  # thin_dump joins 20 and 21 (data blocks 30, 31)


def test_delta_names_every_block_that_may_differ(metadata: str) -> None:
    runs = thintools.delta(metadata, 1, 2, deadline=deadline.default(), metadata_snap=False)
    assert runs.block_bytes == 64 * 1024
    # 5..9 remapped, 21 mapped in the base only (reads zeros now), 50 new; 0..4 and 20 are shared
    assert runs.runs == ((5, 5), (21, 1), (50, 1))


def test_missing_devices_are_not_found(metadata: str) -> None:
    with pytest.raises(dm_errors.DeviceNotFound):
        thintools.mappings(metadata, 9, deadline=deadline.default(), metadata_snap=False)
    with pytest.raises(dm_errors.DeviceNotFound):
        thintools.delta(metadata, 1, 9, deadline=deadline.default(), metadata_snap=False)
    with pytest.raises(dm_errors.DeviceNotFound):
        thintools.delta(metadata, 9, 1, deadline=deadline.default(), metadata_snap=False)
