"""Which pool operations run in which pool condition: the one table the engine consults.

A pool is in one of five conditions, derived from its status (`condition`): `rw`,
`out_of_data_space` (data full: not damage, and exactly when users most need to delete),
`read_only` (dm-thin's `ro`: metadata full or a metadata error), `needs_check` (the metadata carries
the flag: the kernel keeps such a pool read-only) and `fail` (IO errors: nothing works).
`allowed(op, condition)` answers from TABLE; `require(op, status)` raises the refusal: a full pool
answers RESOURCE_EXHAUSTED naming what is full, a damaged one UNAVAILABLE with an operator hint.

Reads (status, list, get, stats) never consult the table: they work in every condition, as the
README's table says. Deactivate works in every condition too: an offline repair needs every device
deactivated first. Activate of an existing device works in every condition but `fail`: in
`out_of_data_space` staged volumes keep working (writes to blocks a device owns still succeed; a
block shared with a snapshot must be copied first, which fails until space is freed), in
`read_only` / `needs_check` data can still be read out, and a failed pool takes no thin table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from csi_thin import errors, model


class Op(enum.StrEnum):
    """Pool operations that the pool's condition can refuse."""

    CREATE_VOLUME = "create_volume"
    CREATE_SNAPSHOT = "create_snapshot"
    CLONE = "clone"  # a volume from a volume (clone) or from a snapshot (restore)
    GROW = "grow"
    DELETE = "delete"  # of a volume or a snapshot
    GC = "gc"  # delete of orphan devices (`pool gc --orphans`)
    ACTIVATE = "activate"
    DEACTIVATE = "deactivate"


class Condition(enum.StrEnum):
    RW = "rw"
    OUT_OF_DATA_SPACE = "out_of_data_space"
    READ_ONLY = "read_only"
    NEEDS_CHECK = "needs_check"
    FAIL = "fail"


_C = Condition
_ALL = frozenset(Condition)
_SPACE = frozenset({_C.RW})
_FREES_SPACE = frozenset({_C.RW, _C.OUT_OF_DATA_SPACE})

#: op -> the conditions it runs in
TABLE: Mapping[Op, frozenset[Condition]] = {
    Op.CREATE_VOLUME: _SPACE,
    Op.CREATE_SNAPSHOT: _SPACE,
    Op.CLONE: _SPACE,
    Op.GROW: _SPACE,
    Op.DELETE: _FREES_SPACE,
    Op.GC: _FREES_SPACE,
    Op.ACTIVATE: _ALL - {_C.FAIL},
    Op.DEACTIVATE: _ALL,
}

#: what the operator does about a damaged pool (the pool refuses changes until then)
HINTS: Mapping[Condition, str] = {
    _C.READ_ONLY: (
        "the pool is read-only (metadata full or a metadata error): existing data can still be read. "
        "Stop the driver, deactivate every volume, then check and repair the metadata offline "
        "(thin_check, thin_repair; give the pool a larger metadata device if it was full) and start again"
    ),
    _C.NEEDS_CHECK: (
        "the pool's metadata is flagged needs_check: stop the driver, deactivate every volume, run "
        "thin_check (and thin_repair if it fails) offline, clear the flag and start again"
    ),
    _C.FAIL: (
        "the pool has failed (IO errors on its data or metadata device): nothing can be read or "
        "written. Stop the driver, check the devices, repair the metadata offline (thin_check, "
        "thin_repair) and start again"
    ),
}


def condition(status: model.PoolStatus) -> Condition:
    """The pool's condition; the worst one wins (fail, then read-only, then needs_check)."""
    if status.mode == model.PoolMode.FAIL:
        return _C.FAIL
    if status.mode == model.PoolMode.RO:
        return _C.READ_ONLY
    if status.needs_check:
        return _C.NEEDS_CHECK
    if status.mode == model.PoolMode.OUT_OF_DATA_SPACE:
        return _C.OUT_OF_DATA_SPACE
    return _C.RW


def hint(cond: Condition) -> str:
    """What an operator reads about a pool in this condition (`pool status`)."""
    if cond == _C.RW:
        return ""
    if cond == _C.OUT_OF_DATA_SPACE:
        return (
            "the pool's data space is full: deletes still run and free space; creates, snapshots, "
            "clones, restores and expands are refused until they do (or the pool gets more data space)"
        )
    return HINTS[cond]


def allowed(op: Op, cond: Condition) -> bool:
    return cond in TABLE[op]


def runs_always(op: Op) -> bool:
    """True for an op every condition allows (it needs no status read first)."""
    return TABLE[op] == _ALL


def require(op: Op, status: model.PoolStatus) -> None:
    """Raise the refusal of `op` in the pool's condition (nothing when it may run)."""
    cond = condition(status)
    if allowed(op, cond):
        return
    if cond == _C.OUT_OF_DATA_SPACE:
        raise errors.PoolFull(
            f"{op.value} refused: the pool's data space is full (out_of_data_space, "
            f"{status.data_used_bytes} of {status.data_total_bytes} bytes used). Delete volumes or "
            "snapshots to free space (deletes still work), or give the pool more data space"
        )
    raise errors.Unavailable(f"{op.value} refused: {HINTS[cond]}")


def markdown_table() -> str:
    """TABLE as the README shows it (tests check the README carries exactly this)."""
    rows = [
        (
            "CreateVolume (new, clone, restore), CreateSnapshot, ControllerExpandVolume",
            (Op.CREATE_VOLUME, Op.CREATE_SNAPSHOT, Op.CLONE, Op.GROW),
        ),
        ("DeleteVolume, DeleteSnapshot, `pool gc --orphans`", (Op.DELETE, Op.GC)),
        ("NodeStageVolume (activate an existing volume)", (Op.ACTIVATE,)),
        ("NodeUnstageVolume (deactivate)", (Op.DEACTIVATE,)),
    ]
    refusal = {
        _C.OUT_OF_DATA_SPACE: "RESOURCE_EXHAUSTED",
        _C.READ_ONLY: "UNAVAILABLE",
        _C.NEEDS_CHECK: "UNAVAILABLE",
        _C.FAIL: "UNAVAILABLE",
    }
    conds = list(Condition)
    lines = [
        "| operation | " + " | ".join(f"`{c.value}`" for c in conds) + " |",
        "|---|" + "---|" * len(conds),
    ]
    for label, ops in rows:
        cells = []
        for c in conds:
            verdicts = {allowed(op, c) for op in ops}
            assert len(verdicts) == 1, f"{label}: the ops of one row must agree in {c.value}"
            cells.append("yes" if verdicts.pop() else refusal[c])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| NodePublish/Unpublish, NodeGetVolumeStats, List*, Get*, GetCapacity, Probe, `pool status` | "
        + " | ".join("yes" for _ in conds)
        + " |"
    )
    return "\n".join(lines)
