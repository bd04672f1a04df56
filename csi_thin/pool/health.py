"""A pool's health as a list of issues: what CSI's volume-health RPCs (spec 1.13) report.

The controller (ControllerGetVolumeHealth, ControllerListVolumeHealth) and the node
(NodeGetVolumeHealth, NodeGetStorageHealth) read a pool from different places (a ThinPool
CustomResource, the node's own engine) but judge it by this one function, so the two perspectives
never disagree about the same status. Each issue carries a CamelCase reason for machines and CLI
columns, and a message an operator can act on (for a damaged pool: the same hint as the UNAVAILABLE
refusals, `modes.HINTS`). Every issue that holds is reported, not only the worst: a pool out of data
space can have its metadata above the threshold too, and an operator should see both at once.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from csi_thin import model
from csi_thin.pool import modes


class Severity(enum.StrEnum):
    """How bad an issue is; the CSI edge maps it onto the spec's error types."""

    #: usable, but not operating normally (writes may fail, changes are refused)
    DEGRADED = "degraded"
    #: cannot be used at all (storage: unreachable)
    INACCESSIBLE = "inaccessible"
    #: data is known to be gone (a device recorded but missing from the pool)
    DATA_LOSS = "data_loss"


@dataclasses.dataclass(frozen=True)
class Issue:
    severity: Severity
    reason: str
    message: str


#: the reasons, one per condition (tests and alerting key on them)
FAILED = "PoolFailed"
READ_ONLY = "PoolReadOnly"
NEEDS_CHECK = "PoolNeedsCheck"
OUT_OF_DATA_SPACE = "PoolOutOfDataSpace"
DATA_ABOVE_THRESHOLD = "DataAboveThreshold"
METADATA_ABOVE_THRESHOLD = "MetadataAboveThreshold"
DEVICES_LOST = "DevicesLost"
DEVICE_LOST = "DeviceLost"
DEVICE_NOT_READY = "DeviceNotReady"
UNAVAILABLE = "PoolUnavailable"


def pool(
    status: model.PoolStatus, thresholds: model.Thresholds, *, lost: Sequence[str] = ()
) -> tuple[Issue, ...]:
    """Every issue of a pool with this status and these thresholds; `lost` names the devices whose
    records exist but whose devices the pool no longer has. Empty: the pool is healthy."""
    issues: list[Issue] = []
    if status.mode == model.PoolMode.FAIL:
        issues.append(Issue(Severity.INACCESSIBLE, FAILED, modes.HINTS[modes.Condition.FAIL]))
    if status.mode == model.PoolMode.RO:
        issues.append(Issue(Severity.DEGRADED, READ_ONLY, modes.HINTS[modes.Condition.READ_ONLY]))
    if status.needs_check:
        issues.append(Issue(Severity.DEGRADED, NEEDS_CHECK, modes.HINTS[modes.Condition.NEEDS_CHECK]))
    if status.mode == model.PoolMode.OUT_OF_DATA_SPACE:
        issues.append(
            Issue(
                Severity.DEGRADED,
                OUT_OF_DATA_SPACE,
                f"thin pool data space is full (out_of_data_space, "
                f"{_bytes(status.data_used_bytes, status.data_total_bytes)}): writes to blocks a volume "
                "does not own yet fail. Deletes still run and free space; creates, snapshots, clones, "
                "restores and expands are refused until they do (or the pool gets more data space)",
            )
        )
    elif status.mode != model.PoolMode.FAIL and status.data_used_ratio >= thresholds.data:
        issues.append(
            Issue(
                Severity.DEGRADED,
                DATA_ABOVE_THRESHOLD,
                f"thin pool data {status.data_used_ratio:.0%} used "
                f"({_bytes(status.data_used_bytes, status.data_total_bytes)}), at or above the "
                f"{thresholds.data:.0%} threshold: writes may fail soon and new volumes and snapshots "
                "are refused; delete volumes or snapshots, or give the pool more data space",
            )
        )
    if status.mode != model.PoolMode.FAIL and status.metadata_used_ratio >= thresholds.metadata:
        issues.append(
            Issue(
                Severity.DEGRADED,
                METADATA_ABOVE_THRESHOLD,
                f"thin pool metadata {status.metadata_used_ratio:.0%} used "
                f"({_bytes(status.metadata_used_bytes, status.metadata_total_bytes)}), at or above the "
                f"{thresholds.metadata:.0%} threshold: new volumes and snapshots are refused, and full "
                "metadata turns the pool read-only; delete snapshots or give the pool a larger "
                "metadata device",
            )
        )
    if lost:
        shown = ", ".join(sorted(lost)[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
        issues.append(
            Issue(
                Severity.DATA_LOSS,
                DEVICES_LOST,
                f"{len(lost)} device(s) are recorded but missing from the pool, their data gone: "
                f"{shown}. They are never re-created empty; delete them (`pool status` lists them)",
            )
        )
    return tuple(issues)


def volume(device: model.Device, status: model.PoolStatus, thresholds: model.Thresholds) -> tuple[Issue, ...]:
    """The issues of one volume as its pool's record and status show them (the controller's view):
    its own device's state, then its pool's issues (a volume never carries another device's loss)."""
    own: list[Issue] = []
    if device.state == model.DeviceState.LOST:
        own.append(
            Issue(
                Severity.DATA_LOSS,
                DEVICE_LOST,
                f"the pool no longer has device {device.dev_id} of {device.name}: its data is gone "
                "(it is never re-created empty); delete the volume",
            )
        )
    elif device.state != model.DeviceState.READY:
        own.append(Issue(Severity.INACCESSIBLE, DEVICE_NOT_READY, f"{device.name} is {device.state.value}"))
    return (*own, *pool(status, thresholds))


def unavailable(message: str) -> Issue:
    """The pool's status cannot even be read (it is gone): nothing on it can be used."""
    return Issue(Severity.INACCESSIBLE, UNAVAILABLE, f"the pool's status cannot be read: {message}")


def unreported(message: str) -> Issue:
    """The pool's status is too old to trust (its node stopped reporting): nothing on it can be used,
    as far as anyone can tell. `message` says for how long."""
    return Issue(Severity.INACCESSIBLE, UNAVAILABLE, message)


def _bytes(used: int, total: int) -> str:
    return f"{used} of {total} bytes"
