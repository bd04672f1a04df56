"""CSI GroupController: volume group snapshots; each method validates, delegates to
controller.groups, and responds."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from csi_thin.controller import groups
from csi_thin.csi import controller_service, interceptor, validate
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc

_RPC = csi_pb2.GroupControllerServiceCapability.RPC
CAPABILITIES = (_RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,)


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, *, group_snapshots: groups.GroupSnapshots) -> None:
        self._groups = group_snapshots

    def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        caps = [csi_pb2.GroupControllerServiceCapability(rpc=_RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=caps)

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        name = validate.name(request.name)
        sources = [validate.device_id(v, "source_volume_ids") for v in request.source_volume_ids]
        group = self._groups.create(name, sources, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=_group(group))

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        group_id = validate.device_id(request.group_snapshot_id, "group_snapshot_id")
        snapshot_ids = [validate.device_id(s, "snapshot_ids") for s in request.snapshot_ids]
        self._groups.delete(group_id, snapshot_ids, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        group_id = validate.device_id(request.group_snapshot_id, "group_snapshot_id")
        snapshot_ids = [validate.device_id(s, "snapshot_ids") for s in request.snapshot_ids]
        group = self._groups.get(group_id, snapshot_ids)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=_group(group))


def _group(group: groups.GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(group.created_at * 1e9))
    return csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=group.group_id,
        snapshots=[controller_service.snapshot(d) for d in group.snapshots],
        creation_time=created,
        ready_to_use=group.ready,
    )
