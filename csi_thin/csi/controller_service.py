"""CSI Controller: each method validates, delegates to controller.provisioner, and responds.

No ControllerPublish: a volume lives on the node that holds its pool and needs no attach step.
"""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from csi_thin import errors, model
from csi_thin.controller import naming, provisioner
from csi_thin.csi import health, interceptor, validate
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc

_RPC = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME,
    _RPC.CREATE_DELETE_SNAPSHOT,
    _RPC.LIST_VOLUMES,
    _RPC.LIST_SNAPSHOTS,
    _RPC.GET_CAPACITY,
    _RPC.CLONE_VOLUME,
    _RPC.EXPAND_VOLUME,
    _RPC.GET_VOLUME,
    _RPC.GET_SNAPSHOT,
    _RPC.GET_VOLUME_HEALTH,
    _RPC.LIST_VOLUME_HEALTH,
    _RPC.SINGLE_NODE_MULTI_WRITER,
)


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, *, provisioner: provisioner.Provisioner) -> None:
        self._prov = provisioner
        self._node_id = provisioner.settings.node_id

    # -- volumes ---------------------------------------------------------------------------------

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        vreq = validate.volume_request(request)
        device = self._prov.create_volume(vreq, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.CreateVolumeResponse(volume=self._volume(device))

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        volume_id = validate.device_id(request.volume_id)
        self._prov.delete_volume(volume_id, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        volume_id = validate.device_id(request.volume_id)
        validate.some_capabilities(request.volume_capabilities)
        device = self._prov.get_volume(volume_id)
        unsupported = validate.unsupported(
            request.volume_capabilities, request.volume_context, dict(device.attributes)
        )
        if unsupported:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=unsupported)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        limit = validate.max_entries(request.max_entries)
        page = self._prov.list_volumes(max_entries=limit, token=request.starting_token)
        # no status: it only carries published node ids (LIST_VOLUMES_PUBLISHED_NODES, not offered:
        # nothing is attached); health has its own RPCs since CSI 1.13
        entries = [csi_pb2.ListVolumesResponse.Entry(volume=self._volume(d)) for d in page.devices]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=page.next_token)

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        device = self._prov.get_volume(validate.device_id(request.volume_id))
        # status is REQUIRED but has nothing to say (see ListVolumes): an empty one
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus()
        return csi_pb2.ControllerGetVolumeResponse(volume=self._volume(device), status=status)

    # -- volume health (alpha in CSI 1.13) -------------------------------------------------------

    def ControllerGetVolumeHealth(
        self, request: csi_pb2.ControllerGetVolumeHealthRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeHealthResponse:
        volume_id = validate.device_id(request.volume_id)
        vh = self._prov.volume_health(volume_id, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.ControllerGetVolumeHealthResponse(
            volume_health=health.volume(vh.volume.name, vh.issues)
        )

    def ControllerListVolumeHealth(
        self, request: csi_pb2.ControllerListVolumeHealthRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerListVolumeHealthResponse:
        page = self._prov.list_volume_health(
            max_entries=validate.max_entries(request.max_entries),
            token=request.starting_token,
            deadline=interceptor.rpc_deadline(context),
        )
        entries = [health.volume(vh.volume.name, vh.issues) for vh in page.entries]
        return csi_pb2.ControllerListVolumeHealthResponse(entries=entries, next_token=page.next_token)

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        volume_id, rng, _ = validate.expand_request(request)
        device = self._prov.expand_volume(volume_id, rng, deadline=interceptor.rpc_deadline(context))
        # also for a block volume: its read-only publishes are loop devices stacked on it (see
        # node.blockview), which keep their old size until NodeExpandVolume refreshes them
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=device.size_bytes, node_expansion_required=True
        )

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        if request.volume_capabilities:
            validate.capacity_capabilities(request.volume_capabilities)
        node = request.accessible_topology.segments.get(validate.TOPOLOGY_KEY)
        cap = self._prov.capacity(node_id=node, deadline=interceptor.rpc_deadline(context))
        response = csi_pb2.GetCapacityResponse(available_capacity=cap.available_bytes)
        response.maximum_volume_size.value = cap.maximum_volume_bytes
        response.minimum_volume_size.value = self._prov.settings.block_size
        return response

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        caps = [csi_pb2.ControllerServiceCapability(rpc=_RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)

    # -- snapshots -------------------------------------------------------------------------------

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        name = validate.name(request.name)
        source = validate.device_id(request.source_volume_id, "source_volume_id")
        device = self._prov.create_snapshot(name, source, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.CreateSnapshotResponse(snapshot=snapshot(device))

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        snapshot_id = validate.device_id(request.snapshot_id, "snapshot_id")
        self._prov.delete_snapshot(snapshot_id, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        page = self._prov.list_snapshots(
            snapshot_id=request.snapshot_id,
            source_id=request.source_volume_id,
            max_entries=validate.max_entries(request.max_entries),
            token=request.starting_token,
        )
        entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=snapshot(d)) for d in page.devices]
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=page.next_token)

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        device = self._prov.get_snapshot(validate.device_id(request.snapshot_id, "snapshot_id"))
        return csi_pb2.GetSnapshotResponse(snapshot=snapshot(device))

    # -- not offered: volumes are node-local and need no attach; parameters are not mutable ------

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        raise errors.Unimplemented("ControllerPublishVolume: volumes are node-local")

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        raise errors.Unimplemented("ControllerUnpublishVolume: volumes are node-local")

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        raise errors.Unimplemented("ControllerModifyVolume: no mutable parameters")

    # -- responses -------------------------------------------------------------------------------

    def _volume(self, device: model.Device) -> csi_pb2.Volume:
        node = device.node or self._node_id
        volume = csi_pb2.Volume(
            volume_id=device.name,
            capacity_bytes=device.size_bytes,
            volume_context=dict(device.attributes),
            accessible_topology=[csi_pb2.Topology(segments={validate.TOPOLOGY_KEY: node})] if node else [],
        )
        if device.origin and naming.is_own_id(device.origin, naming.IdKind.SNAPSHOT):
            volume.content_source.snapshot.snapshot_id = device.origin
        elif device.origin:
            volume.content_source.volume.volume_id = device.origin
        return volume


def snapshot(device: model.Device) -> csi_pb2.Snapshot:
    """A snapshot as CSI shows it (also inside a VolumeGroupSnapshot: a member names its group)."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(device.created_at * 1e9))
    return csi_pb2.Snapshot(
        snapshot_id=device.name,
        source_volume_id=device.origin or "",
        size_bytes=device.size_bytes,
        creation_time=created,
        ready_to_use=device.state == model.DeviceState.READY,
        group_snapshot_id=device.group or "",
    )
