"""thin_dump and thin_delta (thin-provisioning-tools, from Debian) read by csi_thin.dm.thintools for
changed-block tracking: on pool metadata written by thin_restore from a known layout, so the real
tools' output is parsed without a kernel (tests/vm reads a live pool's metadata snapshot)."""

from __future__ import annotations

import pathlib
import random

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


def _random_layout(seed: int) -> tuple[str, dict[int, int], dict[int, int]]:
    """Two devices' mappings (virtual block -> data block): runs the second shares with the first,
    remaps, drops, or maps anew, at gaps small and large, so every kind of thin_delta run meets every
    other one, at the start and at the end of both devices."""
    rnd = random.Random(seed)
    next_data = 0
    base: dict[int, int] = {}
    target: dict[int, int] = {}
    block = rnd.choice([0, 3])
    while len(base) < 2000:
        block += rnd.choice([0, 0, 1, 9, 700])
        length = rnd.choice([1, 2, 7, 64, 300])
        kind = rnd.random()
        for i in range(length):
            base[block + i] = next_data
            next_data += 1
            if kind < 0.4 or (kind >= 0.8 and rnd.random() < 0.5):
                target[block + i] = base[block + i]  # shared
            elif kind < 0.6:
                pass  # discarded since: mapped in the base only
            else:
                target[block + i] = next_data  # written since: remapped
                next_data += 1
        block += length
        if rnd.random() < 0.3:  # new data where the base has none
            for i in range(rnd.choice([1, 3, 50])):
                target[block + i] = next_data
                next_data += 1
            block += 50

    def device(dev_id: int, m: dict[int, int]) -> str:
        rows = "".join(
            f'<single_mapping origin_block="{b}" data_block="{d}" time="0"/>' for b, d in sorted(m.items())
        )
        return (
            f'<device dev_id="{dev_id}" mapped_blocks="{len(m)}" transaction="0" creation_time="0" '
            f'snap_time="1">{rows}</device>'
        )

    xml = (
        f'<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" '
        f'nr_data_blocks="{next_data + 1}">{device(1, base)}{device(2, target)}</superblock>'
    )
    return xml, base, target


def _blocks(runs: tuple[tuple[int, int], ...]) -> set[int]:
    return {b for first, n in runs for b in range(first, first + n)}


@pytest.mark.parametrize("seed", range(8))
def test_random_layouts_name_every_changed_block(tmp_path: pathlib.Path, seed: int) -> None:
    """The real tools' answers on random layouts (multi-leaf btrees), against the layout itself: the
    delta names every block whose mapping differs (never fewer: a backup would miss it) and, with this
    thin_delta, no other; thin_dump names exactly the mapped blocks."""
    xml, base, target = _random_layout(seed)
    (tmp_path / "layout.xml").write_text(xml)
    meta = tmp_path / "meta.bin"
    with meta.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    dl = deadline.default()
    runner.run(["thin_restore", "-i", str(tmp_path / "layout.xml"), "-o", str(meta)], deadline=dl)

    changed = {b for b in base.keys() | target.keys() if base.get(b) != target.get(b)}
    got = _blocks(thintools.delta(str(meta), 1, 2, deadline=dl, metadata_snap=False).runs)
    assert not changed - got, f"changed blocks missing from the delta: {sorted(changed - got)[:20]}"
    assert got == changed
    assert _blocks(thintools.mappings(str(meta), 2, deadline=dl, metadata_snap=False).runs) == set(target)
