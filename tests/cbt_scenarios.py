"""Changed-block tracking as a backup tool uses it, on any backend (tests/root: reflink natively,
tests/vm: dm-thin): a client of the CSI SnapshotMetadata service that checks every stream against the
spec's rules, copies only the ranges it is given and must end up with byte-identical volumes.

The client reads a snapshot's bytes the way the node would: the engine activates the snapshot's
device, the client reads it with O_DIRECT (the device's bytes, not a page cache's), and it is
deactivated again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import os
import pathlib
import random
import struct
from collections.abc import Callable, Iterator

import grpc

from csi_thin import deadline as deadline_mod
from csi_thin import model
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from tests import blockio
from tests import csi_harness as h

MiB = model.MiB
KiB = model.KiB
S = grpc.StatusCode
VOLUME = 64 * MiB
GROWN = 96 * MiB


def dl() -> deadline_mod.Deadline:
    return deadline_mod.Deadline.after(120)


@dataclasses.dataclass(frozen=True)
class Stream:
    capacity: int
    ranges: list[tuple[int, int]]
    messages: int


def check_stream(responses: Iterator[object], *, max_results: int = 0, starting_offset: int = 0) -> Stream:
    """Read a whole GetMetadata* stream, asserting the spec's rules for it."""
    kinds, capacities, ranges, messages = set(), set(), [], 0
    for r in responses:
        messages += 1
        kinds.add(r.block_metadata_type)  # type: ignore[attr-defined]
        capacities.add(r.volume_capacity_bytes)  # type: ignore[attr-defined]
        page = [(b.byte_offset, b.size_bytes) for b in r.block_metadata]  # type: ignore[attr-defined]
        if max_results:
            assert len(page) <= max_results
        ranges.extend(page)
    assert kinds == {csi_pb2.VARIABLE_LENGTH}, kinds
    assert len(capacities) == 1, capacities
    for (a_off, a_len), (b_off, _) in itertools.pairwise(ranges):
        assert a_off + a_len <= b_off, f"ranges overlap or go backwards: {(a_off, a_len)} then {b_off}"
    assert all(size > 0 for _, size in ranges)
    if ranges:
        assert starting_offset < ranges[0][0] + ranges[0][1]
    [capacity] = capacities
    assert all(off + size <= capacity for off, size in ranges)
    return Stream(capacity=capacity, ranges=ranges, messages=messages)


def allocated(stub: csi_pb2_grpc.SnapshotMetadataStub, snap: str, **kw: int) -> Stream:
    req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snap, **kw)
    return check_stream(stub.GetMetadataAllocated(req, timeout=60), **kw)


def delta(stub: csi_pb2_grpc.SnapshotMetadataStub, base: str, target: str, **kw: int) -> Stream:
    req = csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target, **kw)
    return check_stream(stub.GetMetadataDelta(req, timeout=60), **kw)


def write(d: h.Driver, volume: str, writes: list[tuple[int, bytes]]) -> None:
    dev = d.engine.activate(volume, deadline=dl())
    assert dev.path
    try:
        for offset, data in writes:
            blockio.write_at(dev.path, offset, data)
    finally:
        d.engine.deactivate(volume, deadline=dl())


BLKDISCARD = 0x1277  # _IO(0x12, 119): the range reads zeros after (dm-thin unmaps it, loop punches a hole)
BLKZEROOUT = 0x127F  # _IO(0x12, 127): write zeros (loop: FALLOC_FL_ZERO_RANGE, unwritten extents)


def block_ioctl(d: h.Driver, volume: str, request: int, ranges: list[tuple[int, int]]) -> None:
    dev = d.engine.activate(volume, deadline=dl())
    assert dev.path
    try:
        fd = os.open(dev.path, os.O_WRONLY)
        try:
            for offset, size in ranges:
                fcntl.ioctl(fd, request, struct.pack("=QQ", offset, size))
        finally:
            os.close(fd)
    finally:
        d.engine.deactivate(volume, deadline=dl())


def image(d: h.Driver, name: str, path: pathlib.Path) -> bytes:
    """The device's bytes, also saved to `path`."""
    dev = d.engine.activate(name, deadline=dl())
    assert dev.path
    try:
        data = blockio.read_direct(dev.path, 0, dev.size_bytes)
    finally:
        d.engine.deactivate(name, deadline=dl())
    path.write_bytes(data)
    return data


def apply(d: h.Driver, snap: str, ranges: list[tuple[int, int]], onto: pathlib.Path, capacity: int) -> bytes:
    """Copy exactly `ranges` of snapshot `snap` onto the file `onto` (grown to `capacity`)."""
    dev = d.engine.activate(snap, deadline=dl())
    assert dev.path
    try:
        fd = os.open(onto, os.O_RDWR)
        try:
            os.ftruncate(fd, capacity)
            for offset, size in ranges:
                os.pwrite(fd, blockio.read_direct(dev.path, offset, size), offset)
        finally:
            os.close(fd)
    finally:
        d.engine.deactivate(snap, deadline=dl())
    return onto.read_bytes()


def total(ranges: list[tuple[int, int]]) -> int:
    return sum(size for _, size in ranges)


def overlaps(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(off < hi and lo < off + size for off, size in ranges)


def backup_and_restore(d: h.Driver, stub: csi_pb2_grpc.SnapshotMetadataStub, workdir: pathlib.Path) -> None:
    """Full backup from GetMetadataAllocated, then an incremental one from GetMetadataDelta: both
    rebuild their snapshot byte for byte, and neither names much more than was written."""
    rnd = random.Random(12)
    vol = d.controller.CreateVolume(h.create_req("cbt-vol", VOLUME, h.block_cap())).volume.volume_id
    first = [(0, 1 * MiB), (8 * MiB, 192 * KiB), (40 * MiB, 64 * KiB)]
    write(d, vol, [(off, rnd.randbytes(n)) for off, n in first])
    s1 = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-s1", source_volume_id=vol))
    s1_id = s1.snapshot.snapshot_id
    # the volume grows between the snapshots: the delta's capacity is the target's
    d.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol, capacity_range=csi_pb2.CapacityRange(required_bytes=GROWN)
        )
    )
    # overwrite inside the first writes, write new places, one at the old end, one in the new room
    second = [
        (8 * MiB + 64 * KiB, 64 * KiB),
        (20 * MiB, 128 * KiB),
        (VOLUME - 1 * MiB, 1 * MiB),
        (VOLUME + 8 * MiB, 64 * KiB),
    ]
    write(d, vol, [(off, rnd.randbytes(n)) for off, n in second])
    s2_id = d.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="cbt-s2", source_volume_id=vol)
    ).snapshot.snapshot_id

    s1_bytes = image(d, s1_id, workdir / "s1.img")
    s2_bytes = image(d, s2_id, workdir / "s2.img")
    assert s1_bytes != s2_bytes

    # full backup of s1: its allocated ranges onto zeros
    full = allocated(stub, s1_id, max_results=2)
    assert full.capacity == VOLUME
    assert full.messages == -(-len(full.ranges) // 2)
    written = total([(0, n) for _, n in first])
    assert written <= total(full.ranges) <= written + 2 * MiB, full.ranges
    zeros = workdir / "full.img"
    zeros.write_bytes(b"")
    assert apply(d, s1_id, full.ranges, zeros, full.capacity) == s1_bytes

    # incremental: s2's changed ranges onto a copy of s1
    inc = delta(stub, s1_id, s2_id)
    assert inc.capacity == GROWN
    changed = total([(0, n) for _, n in second])
    assert changed <= total(inc.ranges) <= changed + 2 * MiB, inc.ranges
    assert not overlaps(inc.ranges, 0, 1 * MiB), "an unchanged region is in the delta"
    assert not overlaps(inc.ranges, 40 * MiB, 40 * MiB + 64 * KiB), "an unchanged region is in the delta"
    copy = workdir / "incremental.img"
    copy.write_bytes(s1_bytes)
    assert apply(d, s2_id, inc.ranges, copy, inc.capacity) == s2_bytes

    # a snapshot against itself: nothing changed
    assert delta(stub, s2_id, s2_id).ranges == []

    # resuming an interrupted stream: every range that ends after starting_offset, no other
    for start in (0, inc.ranges[0][0] + 1, 20 * MiB, VOLUME - 1, VOLUME, GROWN):
        want = [r for r in inc.ranges if r[0] + r[1] > start]
        assert delta(stub, s1_id, s2_id, starting_offset=start).ranges == want
        if start <= VOLUME:
            want = [r for r in full.ranges if r[0] + r[1] > start]
            assert allocated(stub, s1_id, starting_offset=start, max_results=1).ranges == want


def zeroed_since_the_base(
    d: h.Driver, stub: csi_pb2_grpc.SnapshotMetadataStub, workdir: pathlib.Path
) -> None:
    """Blocks that read zeros again after the base snapshot (discarded: unmapped or a hole now;
    zeroed out: unwritten extents on reflink) changed too: a delta that left them out would restore
    the base's old bytes there."""
    rnd = random.Random(7)
    vol = d.controller.CreateVolume(h.create_req("cbt-z", VOLUME, h.block_cap())).volume.volume_id
    write(d, vol, [(0, rnd.randbytes(4 * MiB)), (16 * MiB, rnd.randbytes(4 * MiB))])
    s1 = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-z1", source_volume_id=vol))
    block_ioctl(d, vol, BLKDISCARD, [(1 * MiB, 1 * MiB)])
    block_ioctl(d, vol, BLKZEROOUT, [(17 * MiB, 1 * MiB)])
    s2 = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-z2", source_volume_id=vol))
    s1_id, s2_id = s1.snapshot.snapshot_id, s2.snapshot.snapshot_id

    s1_bytes = image(d, s1_id, workdir / "z1.img")
    s2_bytes = image(d, s2_id, workdir / "z2.img")
    zeros = bytes(1 * MiB)
    assert s1_bytes[1 * MiB : 2 * MiB] != zeros and s1_bytes[17 * MiB : 18 * MiB] != zeros
    assert s2_bytes[1 * MiB : 2 * MiB] == zeros and s2_bytes[17 * MiB : 18 * MiB] == zeros

    inc = delta(stub, s1_id, s2_id)
    assert overlaps(inc.ranges, 1 * MiB, 2 * MiB), inc.ranges
    assert overlaps(inc.ranges, 17 * MiB, 18 * MiB), inc.ranges
    copy = workdir / "z-incremental.img"
    copy.write_bytes(s1_bytes)
    assert apply(d, s2_id, inc.ranges, copy, inc.capacity) == s2_bytes
    full = allocated(stub, s2_id)
    empty = workdir / "z-full.img"
    empty.write_bytes(b"")
    assert apply(d, s2_id, full.ranges, empty, full.capacity) == s2_bytes


def errors_and_streaming(d: h.Driver, stub: csi_pb2_grpc.SnapshotMetadataStub) -> None:
    """Validation per the spec's error tables, and a stream that holds nothing of the pool."""
    caps = d.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    service = csi_pb2.PluginCapability.Service
    assert service.SNAPSHOT_METADATA_SERVICE in {c.service.type for c in caps}

    vol = d.controller.CreateVolume(h.create_req("cbt-e1", VOLUME, h.block_cap())).volume.volume_id
    other = d.controller.CreateVolume(h.create_req("cbt-e2", VOLUME, h.block_cap())).volume.volume_id
    write(d, vol, [(0, b"x" * 64 * KiB)])
    a = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-ea", source_volume_id=vol))
    write(d, vol, [(1 * MiB, b"y" * 64 * KiB), (3 * MiB, b"z" * 64 * KiB)])
    b = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-eb", source_volume_id=vol))
    c = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="cbt-ec", source_volume_id=other))
    sa, sb, sc = a.snapshot.snapshot_id, b.snapshot.snapshot_id, c.snapshot.snapshot_id

    def code(call: Callable[[], object]) -> grpc.StatusCode:
        return h.code_of(lambda: list(call()))  # type: ignore[call-overload]

    def alloc(**kw: object) -> Callable[[], object]:
        return lambda: stub.GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(**kw), timeout=30)  # type: ignore[arg-type]

    def dlt(**kw: object) -> Callable[[], object]:
        return lambda: stub.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(**kw), timeout=30)  # type: ignore[arg-type]

    assert code(alloc(snapshot_id="s-no-such")) == S.NOT_FOUND
    assert code(alloc(snapshot_id=vol)) == S.NOT_FOUND  # a volume is no snapshot
    assert code(alloc(snapshot_id="")) == S.INVALID_ARGUMENT
    assert code(alloc(snapshot_id=sa, max_results=-1)) == S.INVALID_ARGUMENT
    assert code(alloc(snapshot_id=sa, starting_offset=-1)) == S.OUT_OF_RANGE
    assert code(alloc(snapshot_id=sa, starting_offset=VOLUME + 1)) == S.OUT_OF_RANGE
    assert code(dlt(base_snapshot_id="s-no-such", target_snapshot_id=sb)) == S.NOT_FOUND
    assert code(dlt(base_snapshot_id=sa, target_snapshot_id="s-no-such")) == S.NOT_FOUND
    assert code(dlt(base_snapshot_id=sa, target_snapshot_id="")) == S.INVALID_ARGUMENT
    assert code(dlt(base_snapshot_id=sa, target_snapshot_id=sc)) == S.INVALID_ARGUMENT  # other volume
    assert code(dlt(base_snapshot_id=sa, target_snapshot_id=sb, starting_offset=VOLUME + 1)) == S.OUT_OF_RANGE
    # at the very end: a valid, empty answer that still says the capacity
    end = allocated(stub, sa, starting_offset=VOLUME)
    assert (end.ranges, end.capacity, end.messages) == ([], VOLUME, 1)

    # A stream left open holds no lock and no view of the pool: the snapshot it reads can be
    # deleted (and another made) while the client pauses, and the rest of the stream still comes.
    whole = delta(stub, sa, sb).ranges
    assert len(whole) >= 2
    call = stub.GetMetadataDelta(
        csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=sa, target_snapshot_id=sb, max_results=1), timeout=60
    )
    first = next(call)
    d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sb), timeout=30)
    d.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="cbt-ed", source_volume_id=vol), timeout=30
    )
    rest = [(m.byte_offset, m.size_bytes) for r in call for m in r.block_metadata]
    assert [(m.byte_offset, m.size_bytes) for m in first.block_metadata] + rest == whole
    assert code(dlt(base_snapshot_id=sa, target_snapshot_id=sb)) == S.NOT_FOUND  # deleted now
