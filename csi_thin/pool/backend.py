"""The primitive steps a pool backend offers the engine.

The engine (journal, recovery, locking, thresholds, records) is backend-neutral; a backend only
performs single kernel-level steps on devices named by their numeric id. Every step is one
observable change, so the engine can journal intent before it and decide after a crash whether it
happened (by asking `device_ids()` and `transaction_id()`).

Errors: a step raises `csi_thin.errors.NotFound` (or a subclass) when the device id does not exist,
`csi_thin.errors.AlreadyExists` (or a subclass) when it already exists, `errors.ResourceExhausted`
when the pool is out of space, `errors.DeadlineExceeded` when the deadline passes, and
`errors.Internal` for everything else. Steps never retry beyond the deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model


class HoldLeft(errors.Internal):
    """`quiesce` failed, and letting go of what it held failed too for `origin_ids`: they may still
    be suspended or frozen (every writer on them hangs). `release` of them tries again."""

    def __init__(self, message: str, *, origin_ids: Sequence[int]) -> None:
        super().__init__(message)
        self.origin_ids = tuple(origin_ids)


class Backend(Protocol):
    #: "dmthin" or "reflink"; shown in status output
    kind: str

    def assemble(self, *, deadline: deadline_mod.Deadline) -> None:
        """Make the pool usable: idempotent; re-assembly from the same devices keeps every device.

        Checks the metadata of an inactive pool first and stops with a clear error if it fails.
        """
        ...

    def teardown(self, *, deadline: deadline_mod.Deadline) -> None:
        """Deactivate every device and the pool itself; all data and metadata are kept."""
        ...

    def destroy(self, *, deadline: deadline_mod.Deadline) -> None:
        """Tear down and remove what assemble created (loop files, pool image). Irreversible."""
        ...

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus: ...

    def transaction_id(self, *, deadline: deadline_mod.Deadline) -> int: ...

    def set_transaction_id(self, old: int, new: int, *, deadline: deadline_mod.Deadline) -> None:
        """Compare-and-swap the pool's transaction id (fails if the current id is not `old`)."""
        ...

    def create_thin(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        """Create an empty thin device (dm-thin ignores the size: it lives in the activation table)."""
        ...

    def create_snap(
        self,
        dev_id: int,
        origin_id: int,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        held: bool = False,
    ) -> None:
        """Create `dev_id` as a snapshot of `origin_id`.

        An active origin is made consistent around the step (dm-thin: suspend/resume; reflink:
        freeze/thaw) and is always resumed/thawed, on every failure path, within the deadline.
        With `held`, the caller holds the origin consistent already (`quiesce`): nothing is done
        around the step.
        """
        ...

    def quiesce(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        """Make every active origin's content stable and hold it so until `release` (dm-thin:
        suspend each active origin; reflink: freeze each mounted origin's filesystem, flush the
        others): a group snapshot taken in between is of one instant. All or nothing: a failure
        releases what it held before it raises (every one, even when one fails; then HoldLeft names
        those still held). A crash while held is repaired by the next `assemble` (a suspended device
        resumed, a frozen filesystem thawed)."""
        ...

    def release(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        """End `quiesce` for these origins: resume / thaw each one that is held (by this process, or
        left held by a let-go of its that failed; a freeze made by someone else since is kept).
        Idempotent; tries every origin even when one fails (then raises the first failure)."""
        ...

    def delete(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        """Delete an inactive device from the pool; NotFound if the pool has no such id."""
        ...

    def device_ids(self, *, deadline: deadline_mod.Deadline) -> dict[int, int]:
        """Every device id the pool holds, mapped to its allocated bytes (from the pool's metadata)."""
        ...

    def activate(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> str:
        """Make the device usable as a block device of `size_bytes`; return its path. Idempotent."""
        ...

    def deactivate(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        """Remove the block device (not the data). Succeeds if it is not active."""
        ...

    def resize(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        """Grow a device (active: reload + resume / refresh capacity; inactive: record only)."""
        ...

    def active_ids(self, *, deadline: deadline_mod.Deadline) -> set[int]: ...

    def kernel_size(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int | None:
        """The size the kernel gives the device now, where it keeps one (dm-thin: the live table of an
        active device, None when inactive; reflink: the device file's length); NotFound if absent."""
        ...

    def device_path(self, dev_id: int) -> str:
        """Where the block device of `dev_id` appears while active."""
        ...

    def mapped_bytes(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int:
        """Allocated bytes of one device (active: live status; inactive: pool metadata)."""
        ...

    def allocated(
        self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        """The byte ranges of the device that hold data, ascending and disjoint, within size_bytes.

        Read-only and from one consistent view (dm-thin: a metadata snapshot; reflink: the extent map
        of the open file); nothing is held when it returns. NotFound if the device is absent."""
        ...

    def delta(
        self, base_id: int, target_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        """The byte ranges where `target_id` may hold other bytes than `base_id`, ascending and
        disjoint, within size_bytes: a superset of the real differences, never fewer (copying them
        from the target onto a copy of the base rebuilds the target). As `allocated` otherwise."""
        ...
