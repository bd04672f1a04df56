"""ValidateVolumeCapabilities answers from the volume's record, not from the caller's volume_context
(real gRPC, real engine and LMDB, fake backend)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from csi_thin.csi.pb import csi_pb2
from tests import csi_harness as h


@pytest.fixture
def d(tmp_path: pathlib.Path) -> Iterator[h.Driver]:
    with h.fake_driver(tmp_path) as driver:
        yield driver


def _validate(
    d: h.Driver, volume_id: str, cap: csi_pb2.VolumeCapability, context: dict[str, str] | None = None
) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
    return d.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume_id, volume_capabilities=[cap], volume_context=context or {}
        )
    )


def test_validate_is_answered_from_the_record(d: h.Driver) -> None:
    """Reproduced: without volume_context (or with one that lies) Validate confirmed a filesystem
    type, or an access type, that the volume was not created with."""
    ext4 = d.controller.CreateVolume(h.create_req("pvc-ext4", 10 * h.MiB, cap=h.mount_cap("ext4"))).volume
    raw = d.controller.CreateVolume(h.create_req("pvc-raw", 10 * h.MiB, cap=h.block_cap())).volume
    lying = {"csi-thin.io/access-type": "mount", "csi-thin.io/fs-type": "xfs"}
    refused = [
        (ext4, h.mount_cap("xfs"), None),
        (ext4, h.block_cap(), None),
        (ext4, h.mount_cap("xfs"), lying),
        (ext4, h.mount_cap(), lying),  # the context contradicts the record
        (raw, h.mount_cap(), None),
        (raw, h.mount_cap("ext4"), lying),
    ]
    for vol, cap, context in refused:
        resp = _validate(d, vol.volume_id, cap, context)
        assert not resp.HasField("confirmed") and resp.message, (vol.volume_id, cap, context)
    for vol, cap in ((ext4, h.mount_cap()), (ext4, h.mount_cap("ext4")), (raw, h.block_cap())):
        assert _validate(d, vol.volume_id, cap).HasField("confirmed")
        assert _validate(d, vol.volume_id, cap, dict(vol.volume_context)).HasField("confirmed")
