"""CSI SnapshotMetadata (alpha in CSI 1.10+): changed-block tracking for backup tools.

GetMetadataAllocated streams the ranges of a snapshot that hold data; GetMetadataDelta the ranges in
which a later snapshot of the same volume may differ from an earlier one. Both in VARIABLE_LENGTH
style (the pool's own runs: dm-thin's mapped block runs, a reflink file's extents), in byte offsets.

Each call validates, asks the engine for the whole map (the engine reads one consistent view,
releases it and returns: no pool lock, no metadata snapshot and no open file is held while the
stream is sent), then yields it in messages of at most max_results ranges. A client that stops
reading, cancels or runs out of its deadline therefore holds nothing in the pool; the server stops
sending at the next message (the edge interceptor logs how the stream ended).

Served by a process that owns the pool: standalone mode, and in Kubernetes mode the node, on its
mutual-TLS listener for the controller, which forwards the sidecar's calls there
(csi_thin.csi.snapshot_metadata_link).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import grpc

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.csi import interceptor, validate
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc

#: ranges per message when the client names no max_results (or more than this): about 20 bytes
#: each on the wire, so a message stays far below gRPC's 4 MiB default limit
MAX_RESULTS = 4096


class Reader(Protocol):
    """The part of `csi_thin.pool.engine.PoolEngine` this service uses."""

    def allocated(
        self, name: str, *, starting_offset: int, deadline: deadline_mod.Deadline
    ) -> model.BlockMap: ...

    def delta(
        self, base: str, target: str, *, starting_offset: int, deadline: deadline_mod.Deadline
    ) -> model.BlockMap: ...


def _max_results(value: int) -> int:
    if value < 0:
        raise errors.InvalidArgument(f"max_results {value} must not be negative")
    return min(value, MAX_RESULTS) if value else MAX_RESULTS


def _offset(value: int) -> int:
    # the spec's code for a negative offset is OUT_OF_RANGE, like one beyond the snapshot's size
    if value < 0:
        raise errors.OutOfRange(f"starting_offset {value} must not be negative")
    return value


def check_paging(max_results: int, starting_offset: int) -> None:
    """What a servicer that does not read the map itself (Kubernetes mode's controller,
    csi_thin.csi.snapshot_metadata_link) checks before passing the call on, as this one would."""
    _max_results(max_results)
    _offset(starting_offset)


def _pages(block_map: model.BlockMap, per_message: int) -> Iterator[list[csi_pb2.BlockMetadata]]:
    """The map's ranges, at most `per_message` per message; an empty map still sends one message,
    so the client learns the capacity."""
    extents = block_map.extents
    if not extents:
        yield []
        return
    for i in range(0, len(extents), per_message):
        yield [
            csi_pb2.BlockMetadata(byte_offset=e.offset, size_bytes=e.length)
            for e in extents[i : i + per_message]
        ]


class SnapshotMetadataService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, *, reader: Reader) -> None:
        self._reader = reader

    # Not generators themselves: the map is computed (and every error raised) when the call is
    # made, before the first message; only the sending is lazy.

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        snapshot_id = validate.device_id(request.snapshot_id, "snapshot_id")
        per_message = _max_results(request.max_results)
        block_map = self._reader.allocated(
            snapshot_id,
            starting_offset=_offset(request.starting_offset),
            deadline=interceptor.rpc_deadline(context),
        )
        return (
            csi_pb2.GetMetadataAllocatedResponse(
                block_metadata_type=csi_pb2.VARIABLE_LENGTH,
                volume_capacity_bytes=block_map.capacity_bytes,
                block_metadata=page,
            )
            for page in _pages(block_map, per_message)
        )

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        base = validate.device_id(request.base_snapshot_id, "base_snapshot_id")
        target = validate.device_id(request.target_snapshot_id, "target_snapshot_id")
        per_message = _max_results(request.max_results)
        block_map = self._reader.delta(
            base,
            target,
            starting_offset=_offset(request.starting_offset),
            deadline=interceptor.rpc_deadline(context),
        )
        return (
            csi_pb2.GetMetadataDeltaResponse(
                block_metadata_type=csi_pb2.VARIABLE_LENGTH,
                volume_capacity_bytes=block_map.capacity_bytes,
                block_metadata=page,
            )
            for page in _pages(block_map, per_message)
        )
