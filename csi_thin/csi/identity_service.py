"""CSI Identity: who the plugin is, what it offers, and whether it has started and can serve."""

from __future__ import annotations

from collections.abc import Callable

import grpc

import csi_thin
from csi_thin import deadline as deadline_mod
from csi_thin.csi import interceptor
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc

DEFAULT_NAME = "csi-thin.io"

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(
        self,
        *,
        ready: Callable[[deadline_mod.Deadline], bool],
        name: str = DEFAULT_NAME,
        controller: bool = True,
        snapshot_metadata: bool = False,
        group_controller: bool = False,
    ) -> None:
        """`ready` answers Probe: false only while the plugin is still starting up; it raises when
        the plugin cannot serve at all. Pool health is no part of it (see Probe). `snapshot_metadata`:
        the SnapshotMetadata service is served on this endpoint; `group_controller`: the
        GroupController (volume group snapshots) is."""
        self._ready = ready
        self._name = name
        self._controller = controller
        self._snapshot_metadata = snapshot_metadata
        self._group_controller = group_controller

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._name, vendor_version=csi_thin.__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        services = [_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS] + (
            [_Service.CONTROLLER_SERVICE] if self._controller else []
        )
        if self._snapshot_metadata:
            services.append(_Service.SNAPSHOT_METADATA_SERVICE)
        if self._group_controller:
            services.append(_Service.GROUP_CONTROLLER_SERVICE)
        caps = [csi_pb2.PluginCapability(service=_Service(type=s)) for s in services]
        caps.append(csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        # Liveness, not pool health: a liveness probe that failed on a full or degraded pool would
        # restart the node plugin, which fixes neither and takes every staged volume's node calls
        # down meanwhile. Volume conditions, GetCapacity, `pool status` and metrics report the pool.
        response = csi_pb2.ProbeResponse()
        response.ready.value = self._ready(interceptor.rpc_deadline(context))
        return response
