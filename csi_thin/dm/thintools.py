"""Wrappers of thin-provisioning-tools: thin_check, thin_ls, thin_metadata_size.

Used by the dm-thin backend to check metadata before assembling an inactive pool, to list the
pool's devices from a metadata snapshot (the pool's own truth, for recovery against LMDB), and to
size a new metadata device. Every call goes through csi_thin.runner with the caller's deadline.
"""

from __future__ import annotations

import dataclasses

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
