"""Harness honesty: the VM gives us real dm-thin, shown with plain dmsetup/losetup commands only.

Nothing here uses csi_thin's dm client or loop module (only its parsers, to read what dmsetup
printed), so a bug there cannot make this pass: if this test passes, the kernel really did create a
pool, snapshot an active origin, keep the snapshot's data after the origin changed, and grow a
device by a table reload.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import uuid

from csi_thin import model
from csi_thin.dm import parse
from tests import blockio, conftest

MiB = 1024 * 1024
DMS = ["dmsetup", "--noudevsync", "--noudevrules"]
BS = 64 * 1024


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout.strip()


def test_real_dm_thin_with_plain_dmsetup() -> None:
    kernel = os.uname().release
    with open("/proc/modules", encoding="utf-8") as f:
        modules = {line.split()[0] for line in f}
    conftest.report(f"VM harness: kernel {kernel}; dm_thin_pool loaded: {'dm_thin_pool' in modules}")
    assert "dm_thin_pool" in modules
    assert "dm_mod" in modules

    tag = uuid.uuid4().hex[:8]
    work = pathlib.Path("/scratch") / f"harness-{tag}"
    work.mkdir(parents=True)
    meta_file, data_file = work / "meta", work / "data"
    sh("truncate", "-s", "8M", str(meta_file))
    sh("truncate", "-s", "256M", str(data_file))
    meta = sh("losetup", "--find", "--show", str(meta_file))
    data = sh("losetup", "--find", "--show", str(data_file))
    pool, origin, snap = f"h-pool-{tag}", f"h-origin-{tag}", f"h-snap-{tag}"
    created: list[str] = []
    try:
        sh(*DMS, "create", pool, "--table", f"0 {256 * MiB // 512} thin-pool {meta} {data} 128 0 0")
        created.append(pool)
        sh(*DMS, "message", pool, "0", "create_thin 0")
        sh(*DMS, "create", origin, "--table", f"0 {32 * MiB // 512} thin /dev/mapper/{pool} 0")
        created.append(origin)
        blockio.write_at(f"/dev/mapper/{origin}", 4 * MiB, b"B" * BS)

        # snapshot of the ACTIVE origin: suspend, create_snap, resume
        sh(*DMS, "suspend", origin)
        sh(*DMS, "message", pool, "0", "create_snap 1 0")
        sh(*DMS, "resume", origin)
        assert "ACTIVE" in sh(*DMS, "info", origin)
        blockio.write_at(f"/dev/mapper/{origin}", 4 * MiB, b"A" * BS)  # the origin changes after the snapshot

        sh(*DMS, "create", snap, "--table", f"0 {32 * MiB // 512} thin /dev/mapper/{pool} 1")
        created.append(snap)
        assert blockio.read_at(f"/dev/mapper/{snap}", 4 * MiB, BS) == b"B" * BS
        assert blockio.read_at(f"/dev/mapper/{origin}", 4 * MiB, BS) == b"A" * BS

        # grow by a table reload + resume
        sh(*DMS, "reload", origin, "--table", f"0 {64 * MiB // 512} thin /dev/mapper/{pool} 0")
        sh(*DMS, "resume", origin)
        assert int(sh("blockdev", "--getsize64", f"/dev/mapper/{origin}")) == 64 * MiB
        assert blockio.read_at(f"/dev/mapper/{origin}", 4 * MiB, BS) == b"A" * BS

        # what dmsetup prints, read with our parsers
        _, length, ttype, params = parse.split_line(sh(*DMS, "status", pool))
        assert (length, ttype) == (256 * MiB // 512, "thin-pool")
        pool_status = parse.parse_pool_status(params)
        assert pool_status.mode == model.PoolMode.RW
        assert pool_status.data_total_blocks == 256 * MiB // BS
        assert pool_status.data_used_blocks == 2  # the block before, and its copy after the change
        _, _, _, params = parse.split_line(sh(*DMS, "status", origin))
        assert parse.parse_thin_status(params).mapped_sectors == BS // 512
        _, _, _, params = parse.split_line(sh(*DMS, "table", pool))
        table = parse.parse_pool_table(params)
        assert table.block_sectors == 128
        print(f"pool status: {pool_status}")
    finally:
        for name in reversed(created):
            sh(*DMS, "remove", name)
        sh("losetup", "-d", meta)
        sh("losetup", "-d", data)
        for path in (meta_file, data_file):
            path.unlink()
        work.rmdir()
    listed = sh(*DMS, "ls")
    assert pool not in listed
    assert origin not in listed
    assert snap not in listed
