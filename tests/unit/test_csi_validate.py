"""Validation tables for the gRPC edge: hostile input becomes INVALID_ARGUMENT before anything runs."""

from __future__ import annotations

import pytest

from csi_thin import errors
from csi_thin.controller import naming, provisioner
from csi_thin.csi import validate
from csi_thin.csi.pb import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode


def mount(
    fs_type: str = "", mode: int = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode),
    )


def block(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))


@pytest.mark.parametrize("value", ["v-pvc-1", "vh-" + "a" * 40, "some-vol-id", "x" * 128, "a/b", "../x"])
def test_device_id_accepts_visible_ascii(value: str) -> None:
    assert validate.device_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "with space", "tab\there", "nul\x00", "é", "new\nline"])
def test_device_id_rejects(value: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.device_id(value)


@pytest.mark.parametrize("value", ["pvc-1", "sanity Node Service 1234", "ü" * 64, "a" * 128])
def test_name_accepts(value: str) -> None:
    assert validate.name(value) == value


@pytest.mark.parametrize("value", ["", "a" * 129, "ü" * 65, "ctl\x01", "del\x7f"])
def test_name_rejects(value: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.name(value)


@pytest.mark.parametrize(
    "value", ["/var/lib/kubelet/pods/x/volumes/csi/mount", "/tmp/a", "/a/b.c/d..e", "/a/...", "/a b/c"]
)
def test_path_accepts(value: str) -> None:
    assert validate.path(value, "target_path") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "relative/path",
        "./x",
        "/",
        "//double",
        "/a/../b",
        "/a/..",
        "/a/./b",
        "/a//b",
        "/a/b/",
        "/a\x00b",
        "/a\nb",
        "/" + "x" * 4096,
    ],
)
def test_path_rejects(value: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.path(value, "target_path")


@pytest.mark.parametrize("value", ["some/path", "/a/../b", "/a/b/"])
def test_lookup_path_not_canonical_is_not_found(value: str) -> None:
    with pytest.raises(errors.NotFound):
        validate.lookup_path(value, "volume_path")


@pytest.mark.parametrize("value", ["", "/a\x00b"])
def test_lookup_path_malformed_is_invalid(value: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.lookup_path(value, "volume_path")


@pytest.mark.parametrize(
    ("cap", "block_", "fs", "ro", "once"),
    [
        (mount(), False, "ext4", False, False),
        (mount("ext4"), False, "ext4", False, False),
        (mount("xfs"), False, "xfs", False, False),
        (mount(mode=Mode.SINGLE_NODE_READER_ONLY), False, "ext4", True, False),
        (mount(mode=Mode.SINGLE_NODE_SINGLE_WRITER), False, "ext4", False, True),
        (mount(mode=Mode.SINGLE_NODE_MULTI_WRITER), False, "ext4", False, False),
        (block(), True, "", False, False),
        (block(Mode.SINGLE_NODE_READER_ONLY), True, "", True, False),
        (block(Mode.SINGLE_NODE_SINGLE_WRITER), True, "", False, True),
    ],
)
def test_capability_accepts(
    cap: csi_pb2.VolumeCapability, block_: bool, fs: str, ro: bool, once: bool
) -> None:
    got = validate.capability(cap)
    assert (got.block, got.fs_type, got.read_only, got.single_writer) == (block_, fs, ro, once)


def test_optional_path() -> None:
    """The health RPCs' paths are OPTIONAL: empty is fine, a given one is checked like any path."""
    assert validate.optional_path("", "volume_publish_path") == ""
    assert validate.optional_path("/var/lib/kubelet/x", "volume_publish_path") == "/var/lib/kubelet/x"
    for bad in ("relative/x", "/a/../b", "/a/./b", "/"):
        with pytest.raises(errors.InvalidArgument):
            validate.optional_path(bad, "volume_publish_path")


@pytest.mark.parametrize(
    "cap",
    [
        mount("btrfs"),
        mount("ext3"),
        mount("nfs"),
        mount("ext4;rm -rf /"),
        mount(mode=Mode.MULTI_NODE_MULTI_WRITER),
        mount(mode=Mode.MULTI_NODE_READER_ONLY),
        mount(mode=Mode.MULTI_NODE_SINGLE_WRITER),
        mount(mode=Mode.UNKNOWN),
        mount(mode=99),
        block(Mode.MULTI_NODE_MULTI_WRITER),
        csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)),  # no access type
        csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()),  # no access mode
        mount(flags=("noatime,x", "a b")),
        mount(flags=("o\x00",)),
        mount(flags=tuple(f"f{i}" for i in range(33))),
    ],
)
def test_capability_rejects(cap: csi_pb2.VolumeCapability) -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.capability(cap)


def test_capability_uses_the_recorded_fs_type_and_access_type() -> None:
    ctx = {validate.CTX_FS_TYPE: "xfs", validate.CTX_ACCESS_TYPE: "mount"}
    assert validate.capability(mount(), ctx).fs_type == "xfs"
    assert validate.capability(mount("xfs"), ctx).fs_type == "xfs"
    # the record wins: a capability the volume does not have exceeds its capabilities
    with pytest.raises(errors.FailedPrecondition):
        validate.capability(mount("ext4"), ctx)
    with pytest.raises(errors.FailedPrecondition):
        validate.capability(block(), ctx)
    with pytest.raises(errors.FailedPrecondition):
        validate.capability(mount(), {validate.CTX_ACCESS_TYPE: "block"})


_MOUNT_XFS = {validate.CTX_ACCESS_TYPE: "mount", validate.CTX_FS_TYPE: "xfs"}


@pytest.mark.parametrize(
    ("request_ctx", "recorded", "trusted"),
    [
        ({}, _MOUNT_XFS, _MOUNT_XFS),
        ({"other": "kept"}, _MOUNT_XFS, {**_MOUNT_XFS, "other": "kept"}),
        (_MOUNT_XFS, _MOUNT_XFS, _MOUNT_XFS),
        ({validate.CTX_FS_TYPE: "xfs"}, _MOUNT_XFS, _MOUNT_XFS),
        # a volume recorded before the attributes were: the request's context is all there is
        (_MOUNT_XFS, {}, _MOUNT_XFS),
        ({}, {}, {}),
        # contradictions
        ({validate.CTX_FS_TYPE: "ext4"}, _MOUNT_XFS, None),
        ({validate.CTX_ACCESS_TYPE: "mount"}, {validate.CTX_ACCESS_TYPE: "block"}, None),
        ({validate.CTX_ACCESS_TYPE: "block"}, _MOUNT_XFS, None),
    ],
)
def test_trusted_context_is_the_record(
    request_ctx: dict[str, str], recorded: dict[str, str], trusted: dict[str, str] | None
) -> None:
    if trusted is None:
        with pytest.raises(errors.FailedPrecondition):
            validate.trusted_context(request_ctx, recorded)
    else:
        assert validate.trusted_context(request_ctx, recorded) == trusted


def test_capabilities_must_agree_and_exist() -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.capabilities([])
    with pytest.raises(errors.InvalidArgument):
        validate.capabilities([mount(), block()])
    with pytest.raises(errors.InvalidArgument):
        validate.capabilities([mount("ext4"), mount("xfs")])
    assert len(validate.capabilities([mount(), mount(mode=Mode.SINGLE_NODE_READER_ONLY)])) == 2


@pytest.mark.parametrize(
    ("required", "limit", "ok"),
    [
        (0, 0, True),
        (1, 0, True),
        (10, 10, True),
        (0, 5, True),
        (-1, 0, False),
        (0, -1, False),
        (10, 5, False),
    ],
)
def test_capacity(required: int, limit: int, ok: bool) -> None:
    rng = csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)
    if ok:
        assert validate.capacity(rng) == provisioner.CapacityRange(required, limit)
    else:
        with pytest.raises(errors.InvalidArgument):
            validate.capacity(rng)


def test_content_source() -> None:
    src = csi_pb2.VolumeContentSource
    assert validate.content_source(src()) is None
    snap = validate.content_source(src(snapshot=src.SnapshotSource(snapshot_id="s-a")))
    assert snap == provisioner.ContentSource(naming.IdKind.SNAPSHOT, "s-a")
    vol = validate.content_source(src(volume=src.VolumeSource(volume_id="v-a")))
    assert vol == provisioner.ContentSource(naming.IdKind.VOLUME, "v-a")
    with pytest.raises(errors.InvalidArgument):
        validate.content_source(src(volume=src.VolumeSource(volume_id="")))


def test_allowed_nodes() -> None:
    key = validate.TOPOLOGY_KEY
    req = csi_pb2.TopologyRequirement
    assert validate.allowed_nodes(req()) is None
    assert validate.allowed_nodes(req(preferred=[csi_pb2.Topology(segments={key: "n1"})])) is None
    got = validate.allowed_nodes(
        req(requisite=[csi_pb2.Topology(segments={key: "n1"}), csi_pb2.Topology(segments={"zone": "z"})])
    )
    assert got == frozenset({"n1"})


def test_expand_request() -> None:
    r = csi_pb2.ControllerExpandVolumeRequest
    rng = csi_pb2.CapacityRange(required_bytes=10)
    assert validate.expand_request(r(volume_id="v-a", capacity_range=rng)) == (
        "v-a",
        provisioner.CapacityRange(10, 0),
        False,
    )
    assert validate.expand_request(r(volume_id="v-a", capacity_range=rng, volume_capability=block()))[2]
    with pytest.raises(errors.InvalidArgument):
        validate.expand_request(r(volume_id="v-a"))
    with pytest.raises(errors.InvalidArgument):
        validate.expand_request(r(capacity_range=rng))


def test_unsupported_answers_instead_of_failing() -> None:
    assert validate.unsupported([mount()], {}, {}) == ""
    assert "not supported" in validate.unsupported([mount(mode=Mode.MULTI_NODE_MULTI_WRITER)], {}, {})
    assert "created for" in validate.unsupported([mount("ext4")], {}, _MOUNT_XFS)
    assert "contradicts" in validate.unsupported([mount()], {validate.CTX_FS_TYPE: "ext4"}, _MOUNT_XFS)
    with pytest.raises(errors.InvalidArgument):
        validate.unsupported([], {}, {})
