"""Typed device-mapper errors, decided from errno where the ioctl returns.

The DM ioctl client (and the thin tools wrappers) raise these; callers catch them by type, never by
matching message text. Each subclasses the csi_thin domain error that carries its gRPC code, so a
DeviceNotFound escaping to the CSI edge is NOT_FOUND without any translation in between.
"""

from __future__ import annotations

import errno as errno_mod
import os

from csi_thin import errors


class DmError(errors.Internal):
    """A device-mapper operation failed; `errno` is the kernel's answer (0 when not from a syscall)."""

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class DeviceNotFound(errors.NotFound):
    """No such dm device (ENXIO), or no such thin id in the pool (ENODATA)."""

    def __init__(self, message: str, *, errno: int = errno_mod.ENXIO) -> None:
        super().__init__(message)
        self.errno = errno


class DeviceExists(errors.AlreadyExists):
    """The dm device name/uuid is taken, or the thin id already exists in the pool."""

    def __init__(self, message: str, *, errno: int = errno_mod.EEXIST) -> None:
        super().__init__(message)
        self.errno = errno


class DeviceBusy(errors.FailedPrecondition):
    """The device is open (mounted, held by another table) and cannot be removed now."""

    def __init__(self, message: str, *, errno: int = errno_mod.EBUSY) -> None:
        super().__init__(message)
        self.errno = errno


class NoSpace(errors.ResourceExhausted):
    """The pool (data or metadata) has no room for the step."""

    def __init__(self, message: str, *, errno: int = errno_mod.ENOSPC) -> None:
        super().__init__(message)
        self.errno = errno


class DmInvalidArgument(DmError):
    """The kernel refused the request as malformed (EINVAL): a bug on our side, not the user's."""


class TransactionIdMismatch(errors.FailedPrecondition):
    """set_transaction_id: the pool's current id is not the expected old one (the CAS failed)."""


class MetadataCheckFailed(errors.FailedPrecondition):
    """thin_check found the pool metadata damaged: the pool is NOT assembled; repair is manual."""


def from_errno(err: int, what: str, *, create: bool = False) -> errors.CsiThinError:
    """The typed error for a failed DM ioctl.

    `create`: the kernel answers EBUSY when a device name or uuid is already taken by
    DM_DEV_CREATE, which means "exists" there and "in use" everywhere else.
    """
    text = f"{what}: {os.strerror(err)} (errno {err})"
    if err in (errno_mod.ENXIO, errno_mod.ENODEV, errno_mod.ENODATA):
        return DeviceNotFound(text, errno=err)
    if err == errno_mod.EEXIST or (create and err == errno_mod.EBUSY):
        return DeviceExists(text, errno=err)
    if err == errno_mod.EBUSY:
        return DeviceBusy(text, errno=err)
    if err == errno_mod.ENOSPC:
        return NoSpace(text, errno=err)
    if err == errno_mod.EINVAL:
        return DmInvalidArgument(text, errno=err)
    return DmError(text, errno=err)
