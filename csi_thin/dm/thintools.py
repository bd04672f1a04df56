"""Wrappers of thin-provisioning-tools: thin_check, thin_ls, thin_dump, thin_delta, thin_metadata_size.

Used by the dm-thin backend to check metadata before assembling an inactive pool, to list the
pool's devices from a metadata snapshot (the pool's own truth, for recovery against LMDB), to read
one device's mappings (thin_dump) and two devices' differences (thin_delta) from a metadata snapshot
for changed-block tracking, and to size a new metadata device. Every call goes through
csi_thin.runner with the caller's deadline.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import xml.etree.ElementTree as ET  # the output of our own pinned tool, not untrusted input

from csi_thin import deadline as deadline_mod
from csi_thin import errors, runner
from csi_thin.dm import errors as dm_errors


@dataclasses.dataclass(frozen=True)
class CheckResult:
    ok: bool
    returncode: int
    output: str  # thin_check's report (stderr + stdout), for the error message and the log


def check(metadata_dev: str, *, deadline: deadline_mod.Deadline) -> CheckResult:
    """Run thin_check on an INACTIVE pool's metadata device (never on a live one: it would race
    the kernel's writes). Only checks: repair is an operator's decision."""
    result = runner.run(["thin_check", metadata_dev], deadline=deadline, check=False)
    output = (result.stderr + result.stdout).strip()
    return CheckResult(ok=result.returncode == 0, returncode=result.returncode, output=output)


def ls_mapped_bytes(
    metadata_dev: str, *, deadline: deadline_mod.Deadline, metadata_snap: bool = True
) -> dict[int, int]:
    """{thin id: mapped bytes} from the pool metadata.

    With `metadata_snap` (a live pool) the caller must hold a reserved metadata snapshot
    (`reserve_metadata_snap`) for the whole call; thin_ls reads that frozen copy.
    """
    argv = ["thin_ls", "--no-headers", "-o", "DEV,MAPPED_BYTES"]
    if metadata_snap:
        argv.append("--metadata-snap")
    argv.append(metadata_dev)
    try:
        result = runner.run(argv, deadline=deadline)
    except errors.CommandFailed as exc:
        raise dm_errors.DmError(f"thin_ls {metadata_dev}: {exc.stderr.strip()}") from exc
    return parse_ls(result.stdout)


def parse_ls(text: str) -> dict[int, int]:
    """Parse `thin_ls --no-headers -o DEV,MAPPED_BYTES` output."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
            raise dm_errors.DmError(f"thin_ls: unexpected line {line!r}")
        out[int(fields[0])] = int(fields[1])
    return out


@dataclasses.dataclass(frozen=True)
class BlockRuns:
    """Runs of a thin device's virtual blocks, as (first block, number of blocks), ascending."""

    block_bytes: int  # the pool's data block size
    runs: tuple[tuple[int, int], ...]


#: thin_delta's complaint about a device id the metadata does not hold
_NO_DEVICE = re.compile(r"Unable to find mapping tree for snap[12] \((\d+)\)")


def _tool(argv: list[str], *, deadline: deadline_mod.Deadline) -> ET.Element:
    try:
        result = runner.run(argv, deadline=deadline)
    except errors.CommandFailed as exc:
        missing = _NO_DEVICE.search(exc.stderr)
        if missing:
            raise dm_errors.DeviceNotFound(
                f"the pool's metadata has no thin device {missing.group(1)}", errno=errno.ENODATA
            ) from exc
        raise dm_errors.DmError(f"{argv[0]} {argv[-1]}: {exc.stderr.strip()}") from exc
    try:
        return ET.fromstring(result.stdout)  # noqa: S314
    except ET.ParseError as exc:
        raise dm_errors.DmError(f"{argv[0]}: unreadable output ({exc}): {result.stdout[:200]!r}") from exc


def _block_bytes(superblock: ET.Element) -> int:
    sectors = int(superblock.get("data_block_size", "0"))
    if superblock.tag != "superblock" or sectors <= 0:
        raise dm_errors.DmError(f"thin tool output: no superblock with a data_block_size ({superblock.tag})")
    return sectors * 512


def _snap_flag(metadata_snap: bool) -> list[str]:
    return ["--metadata-snap"] if metadata_snap else []


def mappings(
    metadata_dev: str, dev_id: int, *, deadline: deadline_mod.Deadline, metadata_snap: bool = True
) -> BlockRuns:
    """The mapped virtual blocks of thin device `dev_id`; DeviceNotFound when there is no such device.

    With `metadata_snap` (a live pool) the caller holds a metadata snapshot for the whole call."""
    root = _tool(
        ["thin_dump", *_snap_flag(metadata_snap), "--dev-id", str(dev_id), metadata_dev], deadline=deadline
    )
    device = next((d for d in root.iter("device") if d.get("dev_id") == str(dev_id)), None)
    if device is None:
        raise dm_errors.DeviceNotFound(
            f"the pool's metadata has no thin device {dev_id}", errno=errno.ENODATA
        )
    runs: list[tuple[int, int]] = []
    for m in device:
        if m.tag == "range_mapping":
            runs.append((int(m.get("origin_begin", "")), int(m.get("length", ""))))
        elif m.tag == "single_mapping":
            runs.append((int(m.get("origin_block", "")), 1))
        else:
            # anything else may name mapped blocks (thin_dump 1.x's <ref> to a shared <def>):
            # skipping it would leave data out of a full backup
            raise dm_errors.DmError(
                f"thin_dump: <{m.tag}> in device {dev_id} is not read by csi-thin (only range_mapping "
                "and single_mapping): refusing rather than leaving its blocks out"
            )
    return BlockRuns(block_bytes=_block_bytes(root), runs=tuple(sorted(runs)))


#: thin_delta's elements for blocks that may differ (it prints `same` runs too)
_DIFFERENT = frozenset({"different", "left_only", "right_only"})
_SAME = "same"


def delta(
    metadata_dev: str,
    base_id: int,
    target_id: int,
    *,
    deadline: deadline_mod.Deadline,
    metadata_snap: bool = True,
) -> BlockRuns:
    """The virtual blocks whose mapping differs between two thin devices (mapped in one only, or to
    other data blocks); DeviceNotFound when either is missing. With `metadata_snap` (a live pool)
    the caller holds a metadata snapshot for the whole call."""
    root = _tool(
        [
            "thin_delta",
            *_snap_flag(metadata_snap),
            "--snap1",
            str(base_id),
            "--snap2",
            str(target_id),
            metadata_dev,
        ],
        deadline=deadline,
    )
    runs: list[tuple[int, int]] = []
    for diff in root.iter("diff"):
        for e in diff:
            if e.tag in _DIFFERENT:
                runs.append((int(e.get("begin", "")), int(e.get("length", ""))))
            elif e.tag != _SAME:
                # an unknown kind of run may hold changed blocks: a delta must never name too few
                raise dm_errors.DmError(
                    f"thin_delta: <{e.tag}> in the delta {base_id}..{target_id} is not read by csi-thin "
                    f"(only {_SAME}, {', '.join(sorted(_DIFFERENT))}): refusing rather than leaving it out"
                )
    return BlockRuns(block_bytes=_block_bytes(root), runs=tuple(sorted(runs)))


def metadata_size(*, data_size: int, block_size: int, max_thins: int, deadline: deadline_mod.Deadline) -> int:
    """Metadata bytes thin_metadata_size recommends for a pool of `data_size` bytes."""
    argv = [
        "thin_metadata_size",
        "-b",
        f"{block_size // 512}s",
        "-s",
        f"{data_size // 512}s",
        "-m",
        str(max_thins),
        "-u",
        "b",
        "-n",
    ]
    result = runner.run(argv, deadline=deadline)
    text = result.stdout.strip()
    try:
        return int(float(text))
    except ValueError:
        raise dm_errors.DmError(f"thin_metadata_size: unexpected output {text!r}") from None
