"""Health issues (csi_thin.pool.health) as CSI 1.13's volume- and storage-health messages.

The one place that maps our severities onto the spec's error types, for the Controller's and the
Node's health RPCs alike. Storage health has no DATA_LOSS type: a pool that lost devices still
serves the others, so it is STORAGE_DEGRADED (the reason, DevicesLost, says what happened).
Messages are cut to the spec's size limit for strings (`pool status` shows a pool's in full).
"""

from __future__ import annotations

from collections.abc import Iterable

from csi_thin.csi.pb import csi_pb2
from csi_thin.pool import health

#: CSI's general size limit for a string field (spec "Size Limits"); neither health message
#: overrides it, so a CO may refuse or cut a longer one
MAX_STRING_BYTES = 128
_CUT = "…"

_VOLUME = {
    health.Severity.DEGRADED: csi_pb2.DEGRADED,
    health.Severity.INACCESSIBLE: csi_pb2.INACCESSIBLE,
    health.Severity.DATA_LOSS: csi_pb2.DATA_LOSS,
}
_STORAGE = {
    health.Severity.DEGRADED: csi_pb2.STORAGE_DEGRADED,
    health.Severity.INACCESSIBLE: csi_pb2.STORAGE_UNREACHABLE,
    health.Severity.DATA_LOSS: csi_pb2.STORAGE_DEGRADED,
}


def volume(volume_id: str, issues: Iterable[health.Issue]) -> csi_pb2.VolumeHealth:
    return csi_pb2.VolumeHealth(
        volume_id=volume_id,
        health_statuses=[
            csi_pb2.VolumeHealth.VolumeHealthEntry(
                status=_VOLUME[i.severity], reason=i.reason, message=_bounded(i.message)
            )
            for i in _distinct(issues)
        ],
    )


def storage(issues: Iterable[health.Issue]) -> csi_pb2.NodeGetStorageHealthResponse:
    # no volume_capability: every issue of a pool affects every kind of volume on it
    return csi_pb2.NodeGetStorageHealthResponse(
        backend_health=[
            csi_pb2.NodeGetStorageHealthResponse.StorageBackendHealth(
                status=_STORAGE[i.severity], reason=i.reason, message=_bounded(i.message)
            )
            for i in _distinct(issues)
        ]
    )


def _distinct(issues: Iterable[health.Issue]) -> list[health.Issue]:
    """The spec forbids two entries with the same (status, reason): the first one is kept."""
    seen: set[tuple[health.Severity, str]] = set()
    out = []
    for i in issues:
        if (i.severity, i.reason) not in seen:
            seen.add((i.severity, i.reason))
            out.append(i)
    return out


def _bounded(message: str) -> str:
    """`message` within MAX_STRING_BYTES, cut at a character boundary and marked when longer."""
    raw = message.encode()
    if len(raw) <= MAX_STRING_BYTES:
        return message
    return raw[: MAX_STRING_BYTES - len(_CUT.encode())].decode(errors="ignore") + _CUT
