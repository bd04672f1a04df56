"""CSI Node: each method validates, delegates to node.volumes, and responds."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from csi_thin.csi import health, interceptor, validate
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.node import volumes

_RPC = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (
    _RPC.STAGE_UNSTAGE_VOLUME,
    _RPC.GET_VOLUME_STATS,
    _RPC.EXPAND_VOLUME,
    _RPC.GET_VOLUME_HEALTH,
    _RPC.GET_STORAGE_HEALTH,
    _RPC.SINGLE_NODE_MULTI_WRITER,
)
_Unit = csi_pb2.VolumeUsage


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, *, volumes: volumes.NodeVolumes, node_id: str, max_volumes: int = 0) -> None:
        self._volumes = volumes
        self._node_id = node_id
        self._max_volumes = max_volumes

    def _context(self, volume_id: str, requested: Mapping[str, str]) -> dict[str, str]:
        """The volume context to trust: the volume's record over the caller's (see
        `validate.trusted_context`). An unknown volume has none; the call then says NOT_FOUND."""
        return validate.trusted_context(requested, self._volumes.recorded(volume_id))

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        volume_id = validate.device_id(request.volume_id)
        staging = validate.path(request.staging_target_path, "staging_target_path")
        cap = validate.capability(request.volume_capability, self._context(volume_id, request.volume_context))
        self._volumes.stage(volume_id, staging, cap, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        volume_id = validate.device_id(request.volume_id)
        staging = validate.path(request.staging_target_path, "staging_target_path")
        self._volumes.unstage(volume_id, staging, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.NodeUnstageVolumeResponse()

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        volume_id = validate.device_id(request.volume_id)
        staging = validate.path(request.staging_target_path, "staging_target_path")
        target = validate.path(request.target_path, "target_path")
        cap = validate.capability(request.volume_capability, self._context(volume_id, request.volume_context))
        self._volumes.publish(
            volume_id,
            staging_path=staging,
            target_path=target,
            cap=cap,
            read_only=request.readonly,
            deadline=interceptor.rpc_deadline(context),
        )
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = validate.device_id(request.volume_id)
        target = validate.path(request.target_path, "target_path")
        self._volumes.unpublish(volume_id, target, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id = validate.device_id(request.volume_id)
        path = validate.lookup_path(request.volume_path, "volume_path")
        stats = self._volumes.stats(volume_id, path, deadline=interceptor.rpc_deadline(context))
        return _stats(stats)

    def NodeGetVolumeHealth(
        self, request: csi_pb2.NodeGetVolumeHealthRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeHealthResponse:
        volume_id = validate.device_id(request.volume_id)
        staging = validate.optional_path(request.staging_target_path, "staging_target_path")
        publish = validate.optional_path(request.volume_publish_path, "volume_publish_path")
        issues = self._volumes.volume_health(
            volume_id, staging_path=staging, publish_path=publish, deadline=interceptor.rpc_deadline(context)
        )
        return csi_pb2.NodeGetVolumeHealthResponse(volume_health=health.volume(volume_id, issues))

    def NodeGetStorageHealth(
        self, request: csi_pb2.NodeGetStorageHealthRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetStorageHealthResponse:
        return health.storage(self._volumes.storage_health(deadline=interceptor.rpc_deadline(context)))

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        volume_id = validate.device_id(request.volume_id)
        path = validate.lookup_path(request.volume_path, "volume_path")
        block = (
            validate.capability(request.volume_capability, self._context(volume_id, {})).block
            if request.HasField("volume_capability")
            else None
        )
        size = self._volumes.expand(volume_id, path, block=block, deadline=interceptor.rpc_deadline(context))
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        caps = [csi_pb2.NodeServiceCapability(rpc=_RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node_id,
            max_volumes_per_node=self._max_volumes,
            accessible_topology=csi_pb2.Topology(segments={validate.TOPOLOGY_KEY: self._node_id}),
        )


def _stats(stats: volumes.Stats) -> csi_pb2.NodeGetVolumeStatsResponse:
    if stats.usage is None:
        usage = [csi_pb2.VolumeUsage(unit=_Unit.BYTES, total=stats.block_bytes)]
    else:
        u = stats.usage
        usage = [
            csi_pb2.VolumeUsage(
                unit=_Unit.BYTES, total=u.total_bytes, available=u.available_bytes, used=u.used_bytes
            ),
            csi_pb2.VolumeUsage(
                unit=_Unit.INODES, total=u.total_inodes, available=u.available_inodes, used=u.used_inodes
            ),
        ]
    return csi_pb2.NodeGetVolumeStatsResponse(usage=usage)
