"""Request validation at the gRPC edge: protobuf in, checked domain values out.

Everything a client can send is checked here before any layer below sees it; a failure is
InvalidArgument with a message that names the field, and nothing has been changed. Ids are checked
for shape only: a well-formed id this driver never issued is the lower layers' NOT_FOUND (CSI and
csi-sanity require NOT_FOUND, or success for deletes, for ids that do not exist).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence

from csi_thin import errors, model
from csi_thin.controller import naming, provisioner
from csi_thin.csi.pb import csi_pb2
from csi_thin.node import filesystem, volumes

#: CSI: names and ids SHOULD be at most 128 bytes; we hold clients to it.
MAX_ID_BYTES = 128
MAX_PATH_BYTES = 4096
MAX_MOUNT_FLAGS = 32
TOPOLOGY_KEY = "csi-thin.io/node"
#: volume_context keys: CreateVolume records the access and filesystem type; the node reads them back
CTX_ACCESS_TYPE = model.ATTR_ACCESS_TYPE
CTX_FS_TYPE = model.ATTR_FS_TYPE
DEFAULT_FS = "ext4"

_ID = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: keeps ids printable in logs
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MOUNT_FLAG = re.compile(r"^[A-Za-z0-9_.=:/+-]{1,256}$")

_Mode = csi_pb2.VolumeCapability.AccessMode
_SINGLE_NODE = {
    _Mode.SINGLE_NODE_WRITER,
    _Mode.SINGLE_NODE_READER_ONLY,
    _Mode.SINGLE_NODE_SINGLE_WRITER,
    _Mode.SINGLE_NODE_MULTI_WRITER,
}
_MULTI_NODE = {_Mode.MULTI_NODE_READER_ONLY, _Mode.MULTI_NODE_SINGLE_WRITER, _Mode.MULTI_NODE_MULTI_WRITER}


def device_id(value: str, field: str = "volume_id") -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is required")
    if len(value.encode()) > MAX_ID_BYTES or not _ID.match(value):
        raise errors.InvalidArgument(f"{field}: at most {MAX_ID_BYTES} visible ASCII characters")
    return value


def name(value: str, field: str = "name") -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is required")
    if len(value.encode()) > MAX_ID_BYTES:
        raise errors.InvalidArgument(f"{field} is longer than {MAX_ID_BYTES} bytes")
    if _CONTROL.search(value):
        raise errors.InvalidArgument(f"{field} contains control characters")
    return value


def path(value: str, field: str) -> str:
    """An absolute, normalised path with no traversal: what kubelet sends, and nothing else."""
    if not value:
        raise errors.InvalidArgument(f"{field} is required")
    if len(value.encode()) > MAX_PATH_BYTES or _CONTROL.search(value):
        raise errors.InvalidArgument(f"{field}: too long or contains control characters")
    if not value.startswith("/") or value.startswith("//"):
        raise errors.InvalidArgument(f"{field} {value!r} must be an absolute path")
    if ".." in value.split("/") or posixpath.normpath(value) != value or value == "/":
        raise errors.InvalidArgument(f"{field} {value!r} must be normalised, without '..' or '.'")
    return value


def optional_path(value: str, field: str) -> str:
    """An OPTIONAL path ("" when not given); a given one is checked like `path`."""
    return path(value, field) if value else ""


def lookup_path(value: str, field: str) -> str:
    """A path that only names where a volume is (stats, expansion): anything but a clean absolute
    path cannot be where this driver put a volume, so it is NOT_FOUND (csi-sanity requires this for
    "some/path"); a missing or malformed value is still INVALID_ARGUMENT."""
    try:
        return path(value, field)
    except errors.InvalidArgument:
        if not value or len(value.encode()) > MAX_PATH_BYTES or _CONTROL.search(value):
            raise
        raise errors.NotFound(f"no volume is staged or published at {field} {value!r}") from None


def capacity(rng: csi_pb2.CapacityRange) -> provisioner.CapacityRange:
    if rng.required_bytes < 0 or rng.limit_bytes < 0:
        raise errors.InvalidArgument("capacity_range: sizes must not be negative")
    if rng.limit_bytes and rng.limit_bytes < rng.required_bytes:
        raise errors.InvalidArgument("capacity_range: limit_bytes is below required_bytes")
    return provisioner.CapacityRange(required=rng.required_bytes, limit=rng.limit_bytes)


def capability(cap: csi_pb2.VolumeCapability, context: Mapping[str, str] | None = None) -> volumes.Capability:
    """One volume capability: single-node access modes, block or mount (ext4 default, xfs)."""
    mode = cap.access_mode.mode
    if mode in _MULTI_NODE:
        raise errors.InvalidArgument(
            f"access mode {_Mode.Mode.Name(mode)} is not supported: volumes are node-local"
        )
    if mode not in _SINGLE_NODE:
        raise errors.InvalidArgument(f"volume_capability: unknown or missing access mode {mode}")
    read_only = mode == _Mode.SINGLE_NODE_READER_ONLY
    single_writer = mode == _Mode.SINGLE_NODE_SINGLE_WRITER
    which = cap.WhichOneof("access_type")
    recorded = (context or {}).get(CTX_ACCESS_TYPE)
    if which is None:
        raise errors.InvalidArgument("volume_capability: access_type (block or mount) is required")
    # CSI: a capability the volume does not have "exceeds its capabilities" (FAILED_PRECONDITION)
    if recorded and recorded != which:
        raise errors.FailedPrecondition(
            f"volume_capability: the volume was created for {recorded} access, not {which}"
        )
    if which == "block":
        return volumes.Capability(block=True, fs_type="", read_only=read_only, single_writer=single_writer)
    recorded_fs = (context or {}).get(CTX_FS_TYPE)
    fs_type = cap.mount.fs_type or recorded_fs or DEFAULT_FS
    if fs_type not in filesystem.SUPPORTED:
        raise errors.InvalidArgument(f"fs_type {fs_type!r}: supported are {', '.join(filesystem.SUPPORTED)}")
    if recorded_fs and fs_type != recorded_fs:
        # its filesystem may well exist already: staging it as another type would be refused
        raise errors.FailedPrecondition(
            f"volume_capability: the volume was created for a {recorded_fs} filesystem, not {fs_type}"
        )
    flags = tuple(cap.mount.mount_flags)
    if len(flags) > MAX_MOUNT_FLAGS or not all(_MOUNT_FLAG.match(f) for f in flags):
        raise errors.InvalidArgument("mount_flags: at most 32 flags of [A-Za-z0-9_.=:/+-]")
    return volumes.Capability(
        block=False, fs_type=fs_type, mount_flags=flags, read_only=read_only, single_writer=single_writer
    )


def capabilities(
    caps: Iterable[csi_pb2.VolumeCapability], context: Mapping[str, str] | None = None
) -> list[volumes.Capability]:
    checked = [capability(c, context) for c in caps]
    if not checked:
        raise errors.InvalidArgument("volume_capabilities is required")
    if len({c.block for c in checked}) > 1 or len({c.fs_type for c in checked}) > 1:
        raise errors.InvalidArgument("volume_capabilities disagree on the access or filesystem type")
    return checked


def capacity_capabilities(caps: Iterable[csi_pb2.VolumeCapability]) -> list[volumes.Capability]:
    """GetCapacity's capabilities: as CreateVolume's, except that an unset access mode or access type
    means "any". The external-provisioner's capacity controller sends exactly that (mode UNKNOWN and
    an empty mount), as the spec makes the field mandatory and capacity does not depend on it here.
    """
    probes = []
    for cap in caps:
        probe = csi_pb2.VolumeCapability()
        probe.CopyFrom(cap)
        if probe.access_mode.mode == _Mode.UNKNOWN:
            probe.access_mode.mode = _Mode.SINGLE_NODE_WRITER
        if probe.WhichOneof("access_type") is None:
            probe.mount.SetInParent()
        probes.append(probe)
    return capabilities(probes)


def content_source(src: csi_pb2.VolumeContentSource) -> provisioner.ContentSource | None:
    which = src.WhichOneof("type")
    if which == "snapshot":
        return provisioner.ContentSource(
            naming.IdKind.SNAPSHOT, device_id(src.snapshot.snapshot_id, "snapshot_id")
        )
    if which == "volume":
        return provisioner.ContentSource(naming.IdKind.VOLUME, device_id(src.volume.volume_id, "volume_id"))
    return None


def allowed_nodes(req: csi_pb2.TopologyRequirement) -> frozenset[str] | None:
    """The node ids the requisite topology allows (None: no requirement)."""
    if not req.requisite:
        return None
    return frozenset(t.segments[TOPOLOGY_KEY] for t in req.requisite if TOPOLOGY_KEY in t.segments)


def preferred_nodes(req: csi_pb2.TopologyRequirement) -> tuple[str, ...]:
    """The node ids of the preferred topology, in the caller's order."""
    return tuple(t.segments[TOPOLOGY_KEY] for t in req.preferred if TOPOLOGY_KEY in t.segments)


def max_entries(value: int) -> int:
    if value < 0:
        raise errors.InvalidArgument("max_entries must not be negative")
    return value


def volume_context(cap: volumes.Capability) -> dict[str, str]:
    """What the node needs to know of a volume (its access type and filesystem): CreateVolume keeps it
    on the device, and CSI hands it to every node call as volume_context."""
    if cap.block:
        return {CTX_ACCESS_TYPE: "block"}
    return {CTX_ACCESS_TYPE: "mount", CTX_FS_TYPE: cap.fs_type}


def volume_request(req: csi_pb2.CreateVolumeRequest) -> provisioner.VolumeRequest:
    caps = capabilities(req.volume_capabilities)
    return provisioner.VolumeRequest(
        name=name(req.name),
        capacity=capacity(req.capacity_range),
        source=content_source(req.volume_content_source),
        allowed_nodes=allowed_nodes(req.accessibility_requirements),
        preferred_nodes=preferred_nodes(req.accessibility_requirements),
        min_bytes=max(0 if c.block else filesystem.min_bytes(c.fs_type) for c in caps),
        attributes=volume_context(caps[0]),
    )


def trusted_context(request: Mapping[str, str], recorded: Mapping[str, str]) -> dict[str, str]:
    """The volume context to act on: the volume's record (its access and filesystem type, kept by
    CreateVolume), never the caller's word over it. A request context that contradicts the record
    is refused (FAILED_PRECONDITION); a record without these keys (a volume made before they were
    recorded) leaves the caller's context as the only one there is.
    """
    ours = {k: recorded[k] for k in (CTX_ACCESS_TYPE, CTX_FS_TYPE) if recorded.get(k)}
    if not ours:
        return dict(request)
    for key, value in ours.items():
        if request.get(key, value) != value:
            raise errors.FailedPrecondition(
                f"volume_context {key}={request[key]!r} contradicts the volume, which was created "
                f"with {value!r}"
            )
    return {**request, **ours}


def unsupported(
    caps: Sequence[csi_pb2.VolumeCapability], context: Mapping[str, str], recorded: Mapping[str, str]
) -> str:
    """ValidateVolumeCapabilities: why these capabilities are not supported ("" when they are),
    judged against the volume's record (`recorded`), whatever the request's `context` says.

    No capabilities at all is a malformed request (INVALID_ARGUMENT); unsupported ones are an answer.
    """
    some_capabilities(caps)
    try:
        capabilities(caps, trusted_context(context, recorded))
    except (errors.InvalidArgument, errors.FailedPrecondition) as exc:
        return exc.message
    return ""


def some_capabilities(caps: Sequence[csi_pb2.VolumeCapability]) -> None:
    if not caps:
        raise errors.InvalidArgument("volume_capabilities is required")


def expand_request(
    req: csi_pb2.ControllerExpandVolumeRequest,
) -> tuple[str, provisioner.CapacityRange, bool]:
    """(volume id, capacity range, is a block volume) of a ControllerExpandVolume request."""
    volume_id = device_id(req.volume_id)
    rng = capacity(req.capacity_range)
    if rng.required <= 0:
        raise errors.InvalidArgument("capacity_range.required_bytes is required")
    block = req.HasField("volume_capability") and capability(req.volume_capability).block
    return volume_id, rng, block
