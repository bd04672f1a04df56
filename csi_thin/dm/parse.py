"""Parsers (and formatters) for dm-thin status and table lines.

Pure functions over the text the DM ioctl returns for thin-pool and thin targets (the same text
`dmsetup status` / `dmsetup table` prints after the `<start> <length> <type>` prefix). The dm-thin
backend turns these into model.PoolStatus and into table comparisons for idempotent re-assembly.
Formats: Documentation/admin-guide/device-mapper/thin-provisioning.rst.
"""

from __future__ import annotations

import dataclasses

from csi_thin import errors, model

#: thin-pool metadata blocks are always 4 KiB
METADATA_BLOCK_BYTES = 4 * model.KiB


class ParseError(errors.Internal):
    """The kernel printed something this code does not understand: a bug here, or a new kernel."""


@dataclasses.dataclass(frozen=True)
class PoolStatusLine:
    """A thin-pool status line. When the pool has failed the kernel prints only `Fail` (or
    `Error`); then `mode` is FAIL and every number is 0."""

    mode: model.PoolMode
    transaction_id: int = 0
    metadata_used_blocks: int = 0
    metadata_total_blocks: int = 0
    data_used_blocks: int = 0
    data_total_blocks: int = 0
    held_root: int | None = None  # metadata block of the reserved metadata snapshot, if any
    discard: str = ""  # discard_passdown | no_discard_passdown | ignore_discard
    error_if_no_space: bool = False
    needs_check: bool = False
    metadata_low_watermark: int | None = None  # blocks; absent on older kernels

    @property
    def failed(self) -> bool:
        return self.mode == model.PoolMode.FAIL


@dataclasses.dataclass(frozen=True)
class ThinStatusLine:
    """A thin device status line: `<mapped sectors> <highest mapped sector>` or `Fail`."""

    mapped_sectors: int = 0
    highest_mapped_sector: int | None = None  # None: nothing mapped
    failed: bool = False

    @property
    def mapped_bytes(self) -> int:
        return self.mapped_sectors * model.SECTOR


_MODES = {
    "rw": model.PoolMode.RW,
    "ro": model.PoolMode.RO,
    "out_of_data_space": model.PoolMode.OUT_OF_DATA_SPACE,
}
_DISCARDS = {"discard_passdown", "no_discard_passdown", "ignore_discard"}


def _int(token: str, what: str, line: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ParseError(f"{what}: not a number {token!r} in {line!r}") from None
    if value < 0:
        raise ParseError(f"{what}: negative {token!r} in {line!r}")
    return value


def _fraction(token: str, what: str, line: str) -> tuple[int, int]:
    used, sep, total = token.partition("/")
    if not sep:
        raise ParseError(f"{what}: expected used/total, got {token!r} in {line!r}")
    return _int(used, what, line), _int(total, what, line)


def parse_pool_status(line: str) -> PoolStatusLine:
    """Parse the params part of a thin-pool status line."""
    tokens = line.split()
    if tokens and tokens[0] in ("Fail", "Error"):
        return PoolStatusLine(mode=model.PoolMode.FAIL)
    if len(tokens) < 8:
        raise ParseError(f"thin-pool status: expected at least 8 fields, got {line!r}")
    meta_used, meta_total = _fraction(tokens[1], "metadata blocks", line)
    data_used, data_total = _fraction(tokens[2], "data blocks", line)
    held = None if tokens[3] == "-" else _int(tokens[3], "held metadata root", line)
    mode = _MODES.get(tokens[4])
    if mode is None:
        raise ParseError(f"thin-pool status: unknown mode {tokens[4]!r} in {line!r}")
    if tokens[5] not in _DISCARDS:
        raise ParseError(f"thin-pool status: unknown discard mode {tokens[5]!r} in {line!r}")
    if tokens[6] not in ("error_if_no_space", "queue_if_no_space"):
        raise ParseError(f"thin-pool status: unknown no-space policy {tokens[6]!r} in {line!r}")
    if tokens[7] not in ("needs_check", "-"):
        raise ParseError(f"thin-pool status: unknown needs_check field {tokens[7]!r} in {line!r}")
    watermark = _int(tokens[8], "metadata low watermark", line) if len(tokens) > 8 else None
    return PoolStatusLine(
        mode=mode,
        transaction_id=_int(tokens[0], "transaction id", line),
        metadata_used_blocks=meta_used,
        metadata_total_blocks=meta_total,
        data_used_blocks=data_used,
        data_total_blocks=data_total,
        held_root=held,
        discard=tokens[5],
        error_if_no_space=tokens[6] == "error_if_no_space",
        needs_check=tokens[7] == "needs_check",
        metadata_low_watermark=watermark,
    )


def parse_thin_status(line: str) -> ThinStatusLine:
    """Parse the params part of a thin device status line."""
    tokens = line.split()
    if tokens and tokens[0] in ("Fail", "Error"):
        return ThinStatusLine(failed=True)
    if len(tokens) != 2:
        raise ParseError(f"thin status: expected 2 fields, got {line!r}")
    mapped = _int(tokens[0], "mapped sectors", line)
    highest = None if tokens[1] == "-" else _int(tokens[1], "highest mapped sector", line)
    return ThinStatusLine(mapped_sectors=mapped, highest_mapped_sector=highest)


def to_pool_status(line: PoolStatusLine, *, block_size_bytes: int) -> model.PoolStatus:
    """The backend-neutral view: sizes in bytes (metadata blocks 4 KiB, data blocks the pool's)."""
    return model.PoolStatus(
        transaction_id=line.transaction_id,
        block_size_bytes=block_size_bytes,
        data_used_bytes=line.data_used_blocks * block_size_bytes,
        data_total_bytes=line.data_total_blocks * block_size_bytes,
        metadata_used_bytes=line.metadata_used_blocks * METADATA_BLOCK_BYTES,
        metadata_total_bytes=line.metadata_total_blocks * METADATA_BLOCK_BYTES,
        mode=line.mode,
        needs_check=line.needs_check,
    )


# -- tables ---------------------------------------------------------------------------------------

# the order the kernel prints feature args in (pool_status, STATUSTYPE_TABLE)
_FEATURES = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space")


@dataclasses.dataclass(frozen=True)
class PoolTable:
    """`<metadata dev> <data dev> <block size sectors> <low water mark blocks> [<n> <feature>...]`.

    Devices are kept as written; the kernel prints them back as major:minor, so the backend writes
    major:minor too and compares tables with ==.
    """

    metadata_dev: str
    data_dev: str
    block_sectors: int
    low_water_mark: int
    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    no_discard_passdown: bool = False
    read_only: bool = False
    error_if_no_space: bool = False

    def format(self) -> str:
        feats = [f for f in _FEATURES if getattr(self, f)]
        head = f"{self.metadata_dev} {self.data_dev} {self.block_sectors} {self.low_water_mark}"
        return " ".join([head, str(len(feats)), *feats])


def parse_pool_table(line: str) -> PoolTable:
    tokens = line.split()
    if len(tokens) < 4:
        raise ParseError(f"thin-pool table: expected at least 4 fields, got {line!r}")
    nfeat = _int(tokens[4], "feature count", line) if len(tokens) > 4 else 0
    feats = tokens[5:]
    if len(feats) != nfeat:
        raise ParseError(f"thin-pool table: {nfeat} features announced, {len(feats)} given in {line!r}")
    unknown = set(feats) - set(_FEATURES)
    if unknown:
        raise ParseError(f"thin-pool table: unknown features {sorted(unknown)} in {line!r}")
    return PoolTable(
        metadata_dev=tokens[0],
        data_dev=tokens[1],
        block_sectors=_int(tokens[2], "block size", line),
        low_water_mark=_int(tokens[3], "low water mark", line),
        **{f: f in feats for f in _FEATURES},
    )


@dataclasses.dataclass(frozen=True)
class ThinTable:
    """`<pool dev> <dev id> [<external origin dev>]`."""

    pool_dev: str
    dev_id: int
    external_origin: str | None = None

    def format(self) -> str:
        tail = f" {self.external_origin}" if self.external_origin else ""
        return f"{self.pool_dev} {self.dev_id}{tail}"


def parse_thin_table(line: str) -> ThinTable:
    tokens = line.split()
    if len(tokens) not in (2, 3):
        raise ParseError(f"thin table: expected 2 or 3 fields, got {line!r}")
    dev_id = _int(tokens[1], "device id", line)
    if dev_id > model.MAX_DEVICE_ID:
        raise ParseError(f"thin table: device id {dev_id} wider than 24 bits in {line!r}")
    return ThinTable(
        pool_dev=tokens[0], dev_id=dev_id, external_origin=tokens[2] if len(tokens) == 3 else None
    )


def split_line(line: str) -> tuple[int, int, str, str]:
    """Split a full `dmsetup status|table` line into (start, length, type, params)."""
    tokens = line.split(maxsplit=3)
    if len(tokens) < 3:
        raise ParseError(f"dm line: expected <start> <length> <type> [params], got {line!r}")
    start = _int(tokens[0], "start", line)
    length = _int(tokens[1], "length", line)
    return start, length, tokens[2], tokens[3] if len(tokens) == 4 else ""
