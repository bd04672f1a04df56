"""The one registry of fault-injection points: every place in the pool layer where a crash, or a
step that fails, leaves a state of its own.

The engine (around each journalled step and each undo), recovery (around each action it takes on
the pool) and both backends (inside their compound kernel steps) call `reach(point)` with a name
declared here, and nowhere else. In production `hook` is None and `reach` is a set lookup. Tests set
`hook` to record the points a mutation passes, to fail one step once, or to SIGKILL the process there;
the engine suite fails if any point declared for a backend was never killed and never failed
(tests/enginesuite.py).

Names: `<op>/<step>` before an engine step and `<op>/<step>:done` after it, `<op>/undo:<step>` before
its undo and `<op>/undo:<step>:done` after, `recover/<op>/<action>[:done]` around recovery's actions,
`<backend>:<step>/<state>` inside a backend step (the state the kernel is left in).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

Hook = Callable[[str], None]

#: Test seam: called with the name of every point reached (None in production).
hook: Hook | None = None

#: The journalled engine operations and their steps, in order.
OP_STEPS: Mapping[str, tuple[str, ...]] = {
    "create_volume": ("create_thin", "fence"),
    "create_snapshot": ("create_snap", "fence"),
    "clone": ("create_snap", "fence"),
    # one intent for every member: hold every origin, snapshot each, let go of all, one fence
    "create_group_snapshot": ("quiesce", "create_snap", "release", "fence"),
    "delete": ("delete", "fence"),
    "gc": ("delete", "fence"),
    "grow": ("grow",),
    "activate": ("activate",),
    "deactivate": ("deactivate",),
    # containerd snapshots (csi_thin.pool.layers)
    "layer_prepare": ("create_thin", "fence", "activate", "mkfs"),
    "layer_snap": ("create_snap", "fence", "activate"),
    "layer_commit": ("deactivate",),
    "layer_remove": ("discard", "deactivate", "delete", "fence"),
}


#: Undos that never complete: a delete's fence runs only after the delete happened, so its undo
#: always finishes the delete instead (through recovery's roll-forward).
_ROLL_FORWARD_UNDOS = frozenset({("delete", "fence"), ("gc", "fence"), ("layer_remove", "fence")})


def _engine_points() -> frozenset[str]:
    out: set[str] = set()
    for op, steps in OP_STEPS.items():
        out |= {f"{op}/journaled", f"{op}/committed", f"{op}/aborted"}
        for step in steps:
            out |= {f"{op}/{step}", f"{op}/{step}:done", f"{op}/undo:{step}"}
            if (op, step) not in _ROLL_FORWARD_UNDOS:
                out.add(f"{op}/undo:{step}:done")
    return frozenset(out)


#: Around every engine step and every undo.
ENGINE = _engine_points()

#: Around every action recovery takes on the pool: the delete that undoes an unfenced create, the
#: fence that finishes a delete (a delete cannot be undone), the resize that finishes a grow.
RECOVERY = frozenset(
    {f"recover/{op}/delete{s}" for op in ("create_volume", "create_snapshot", "clone") for s in ("", ":done")}
    | {f"recover/{op}/fence{s}" for op in ("delete", "gc") for s in ("", ":done")}
    | {"recover/grow/resize", "recover/grow/resize:done"}
    # a group snapshot's: let go of origins an undo failed to release, delete the members it made
    | {f"recover/create_group_snapshot/{a}{s}" for a in ("release", "delete") for s in ("", ":done")}
    # containerd snapshots: an open Prepare is undone, an open Remove or Commit finished
    | {
        f"recover/{op}/{action}{s}"
        for op in ("layer_prepare", "layer_snap")
        for action in ("deactivate", "delete", "unfence")
        for s in ("", ":done")
    }
    | {
        f"recover/layer_remove/{action}{s}"
        for action in ("deactivate", "delete", "fence")
        for s in ("", ":done")
    }
    | {"recover/layer_commit/deactivate", "recover/layer_commit/deactivate:done"}
)

#: Inside the dm-thin backend's compound steps: what a crash there leaves in the kernel.
DMTHIN = frozenset(
    {
        "dmthin:create_snap/suspended",  # active origin suspended, create_snap not sent yet
        "dmthin:create_snap/messaged",  # snapshot made, origin still suspended
        "dmthin:quiesce/suspended",  # a group snapshot's active origins all suspended
        "dmthin:activate/created",  # device made, no table
        "dmthin:activate/loaded",  # table loaded (inactive), not resumed
        "dmthin:resize/loaded",  # bigger table loaded beside the live one, not resumed
        # every reader of a metadata snapshot (device ids; changed-block tracking) holds it through
        # one context manager, so these two points cover them all
        "dmthin:metadata_snap/reserved",  # metadata snapshot held, not read yet
        "dmthin:metadata_snap/read",  # metadata snapshot read, still held
        "dmthin:assemble/repair",  # a leftover of a killed step found, before it is repaired
    }
)

#: Inside the reflink backend's compound steps.
REFLINK = frozenset(
    {
        "reflink:create_snap/frozen",  # origin made consistent (its filesystem frozen if mounted)
        "reflink:create_snap/cloned",  # extents shared into the temp file, origin still frozen
        "reflink:quiesce/frozen",  # a group snapshot's mounted origins all frozen
        "reflink:publish/written",  # temp file complete, not fsynced
        "reflink:publish/synced",  # temp file fsynced, not linked to its device name
        "reflink:publish/linked",  # device name linked, temp name not removed, directory not fsynced
        "reflink:assemble/repair",  # a filesystem a killed snapshot may have left frozen, before the thaw
    }
)

POINTS = ENGINE | RECOVERY | DMTHIN | REFLINK

_BACKEND_POINTS: Mapping[str, frozenset[str]] = {"dmthin": DMTHIN, "reflink": REFLINK}


def for_backend(kind: str) -> frozenset[str]:
    """Every point a pool of this backend kind can reach."""
    return ENGINE | RECOVERY | _BACKEND_POINTS.get(kind, frozenset())


def reach(point: str) -> None:
    """Mark a declared point; call the test hook if one is set."""
    if point not in POINTS:
        raise AssertionError(f"fault point {point!r} is not declared in csi_thin.pool.faults")
    current = hook
    if current is not None:
        current(point)
