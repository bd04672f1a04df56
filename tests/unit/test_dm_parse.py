"""csi_thin.dm.parse: tables of real-looking kernel lines, including failed pools and bad input."""

from __future__ import annotations

import pytest

from csi_thin import model
from csi_thin.dm import parse

RW = model.PoolMode.RW


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "0 10/4096 0/16384 - rw discard_passdown queue_if_no_space - 1024",
            parse.PoolStatusLine(
                mode=RW,
                transaction_id=0,
                metadata_used_blocks=10,
                metadata_total_blocks=4096,
                data_used_blocks=0,
                data_total_blocks=16384,
                discard="discard_passdown",
                metadata_low_watermark=1024,
            ),
        ),
        (
            "7 183/8192 4017/16384 186 rw no_discard_passdown error_if_no_space - 2048",
            parse.PoolStatusLine(
                mode=RW,
                transaction_id=7,
                metadata_used_blocks=183,
                metadata_total_blocks=8192,
                data_used_blocks=4017,
                data_total_blocks=16384,
                held_root=186,
                discard="no_discard_passdown",
                error_if_no_space=True,
                metadata_low_watermark=2048,
            ),
        ),
        (  # older kernels: no metadata low watermark
            "3 20/1024 16384/16384 - out_of_data_space ignore_discard queue_if_no_space -",
            parse.PoolStatusLine(
                mode=model.PoolMode.OUT_OF_DATA_SPACE,
                transaction_id=3,
                metadata_used_blocks=20,
                metadata_total_blocks=1024,
                data_used_blocks=16384,
                data_total_blocks=16384,
                discard="ignore_discard",
            ),
        ),
        (
            "12 1024/1024 100/16384 - ro discard_passdown error_if_no_space needs_check 256",
            parse.PoolStatusLine(
                mode=model.PoolMode.RO,
                transaction_id=12,
                metadata_used_blocks=1024,
                metadata_total_blocks=1024,
                data_used_blocks=100,
                data_total_blocks=16384,
                discard="discard_passdown",
                error_if_no_space=True,
                needs_check=True,
                metadata_low_watermark=256,
            ),
        ),
        ("Fail", parse.PoolStatusLine(mode=model.PoolMode.FAIL)),
        ("Error", parse.PoolStatusLine(mode=model.PoolMode.FAIL)),
    ],
)
def test_pool_status(line: str, expected: parse.PoolStatusLine) -> None:
    got = parse.parse_pool_status(line)
    assert got == expected
    assert got.failed == (expected.mode == model.PoolMode.FAIL)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "0 10/4096 0/16384 - rw discard_passdown",  # truncated
        "x 10/4096 0/16384 - rw discard_passdown queue_if_no_space -",  # bad transaction id
        "0 10-4096 0/16384 - rw discard_passdown queue_if_no_space -",  # no used/total
        "0 10/4096 0/16384 - rx discard_passdown queue_if_no_space -",  # unknown mode
        "0 10/4096 0/16384 - rw discard queue_if_no_space -",  # unknown discard mode
        "0 10/4096 0/16384 - rw discard_passdown panic_if_no_space -",
        "0 10/4096 0/16384 - rw discard_passdown queue_if_no_space maybe",
        "0 10/4096 0/16384 x rw discard_passdown queue_if_no_space -",  # bad held root
        "-1 10/4096 0/16384 - rw discard_passdown queue_if_no_space -",  # negative
    ],
)
def test_pool_status_rejects(line: str) -> None:
    with pytest.raises(parse.ParseError):
        parse.parse_pool_status(line)


def test_to_pool_status_converts_blocks_to_bytes() -> None:
    line = parse.parse_pool_status("5 100/4096 32/16384 - rw discard_passdown error_if_no_space - 1024")
    status = parse.to_pool_status(line, block_size_bytes=64 * model.KiB)
    assert status == model.PoolStatus(
        transaction_id=5,
        block_size_bytes=64 * model.KiB,
        data_used_bytes=32 * 64 * model.KiB,
        data_total_bytes=16384 * 64 * model.KiB,
        metadata_used_bytes=100 * 4096,
        metadata_total_bytes=4096 * 4096,
        mode=RW,
        needs_check=False,
    )
    assert status.healthy


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("0 -", parse.ThinStatusLine(mapped_sectors=0, highest_mapped_sector=None)),
        ("2048 4095", parse.ThinStatusLine(mapped_sectors=2048, highest_mapped_sector=4095)),
        ("128 2097151", parse.ThinStatusLine(mapped_sectors=128, highest_mapped_sector=2097151)),
        ("Fail", parse.ThinStatusLine(failed=True)),
        ("Error", parse.ThinStatusLine(failed=True)),
    ],
)
def test_thin_status(line: str, expected: parse.ThinStatusLine) -> None:
    assert parse.parse_thin_status(line) == expected


def test_thin_status_mapped_bytes() -> None:
    assert parse.parse_thin_status("2048 4095").mapped_bytes == model.MiB


@pytest.mark.parametrize("line", ["", "12", "a -", "1 2 3", "-5 -"])
def test_thin_status_rejects(line: str) -> None:
    with pytest.raises(parse.ParseError):
        parse.parse_thin_status(line)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("253:1 253:2 128 32768 0", parse.PoolTable("253:1", "253:2", 128, 32768)),
        ("7:0 7:1 128 0", parse.PoolTable("7:0", "7:1", 128, 0)),
        (
            "7:1 7:0 1024 16 2 skip_block_zeroing error_if_no_space",
            parse.PoolTable("7:1", "7:0", 1024, 16, skip_block_zeroing=True, error_if_no_space=True),
        ),
        (
            "/dev/loop1 /dev/loop0 128 10 1 no_discard_passdown",
            parse.PoolTable("/dev/loop1", "/dev/loop0", 128, 10, no_discard_passdown=True),
        ),
        (
            "7:1 7:0 128 10 5 skip_block_zeroing ignore_discard no_discard_passdown read_only"
            " error_if_no_space",
            parse.PoolTable(
                "7:1",
                "7:0",
                128,
                10,
                skip_block_zeroing=True,
                ignore_discard=True,
                no_discard_passdown=True,
                read_only=True,
                error_if_no_space=True,
            ),
        ),
    ],
)
def test_pool_table_parse(line: str, expected: parse.PoolTable) -> None:
    assert parse.parse_pool_table(line) == expected


@pytest.mark.parametrize(
    "table",
    [
        parse.PoolTable("7:1", "7:0", 128, 0),
        parse.PoolTable("7:1", "7:0", 2048, 99, skip_block_zeroing=True, no_discard_passdown=True),
        parse.PoolTable("7:1", "7:0", 128, 5, error_if_no_space=True, read_only=True),
    ],
)
def test_pool_table_round_trip(table: parse.PoolTable) -> None:
    assert parse.parse_pool_table(table.format()) == table


def test_pool_table_format_is_kernel_order() -> None:
    table = parse.PoolTable("7:1", "7:0", 128, 0, error_if_no_space=True, skip_block_zeroing=True)
    assert table.format() == "7:1 7:0 128 0 2 skip_block_zeroing error_if_no_space"


@pytest.mark.parametrize(
    "line",
    ["7:1 7:0 128", "7:1 7:0 128 0 2 skip_block_zeroing", "7:1 7:0 128 0 1 go_faster", "7:1 7:0 x 0"],
)
def test_pool_table_rejects(line: str) -> None:
    with pytest.raises(parse.ParseError):
        parse.parse_pool_table(line)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("253:3 0", parse.ThinTable("253:3", 0)),
        ("253:3 16777215", parse.ThinTable("253:3", 16777215)),
        ("/dev/mapper/pool 7 253:9", parse.ThinTable("/dev/mapper/pool", 7, "253:9")),
    ],
)
def test_thin_table(line: str, expected: parse.ThinTable) -> None:
    assert parse.parse_thin_table(line) == expected
    assert parse.parse_thin_table(expected.format()) == expected


@pytest.mark.parametrize("line", ["253:3", "253:3 x", "253:3 16777216", "a 1 b c"])
def test_thin_table_rejects(line: str) -> None:
    with pytest.raises(parse.ParseError):
        parse.parse_thin_table(line)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("0 2097152 thin 2048 4095", (0, 2097152, "thin", "2048 4095")),
        ("0 2048 zero", (0, 2048, "zero", "")),
        (
            "0 524288 thin-pool 0 10/4096 0/8192 - rw discard_passdown queue_if_no_space - 1024",
            (0, 524288, "thin-pool", "0 10/4096 0/8192 - rw discard_passdown queue_if_no_space - 1024"),
        ),
    ],
)
def test_split_line(line: str, expected: tuple[int, int, str, str]) -> None:
    assert parse.split_line(line) == expected


def test_split_line_rejects() -> None:
    with pytest.raises(parse.ParseError):
        parse.split_line("0 12")
