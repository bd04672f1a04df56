"""Kubernetes mode's CSI SnapshotMetadata: the controller forwards each stream to the snapshot's node.

Kubernetes' external-snapshot-metadata sidecar talks to ONE CSI endpoint per driver (the one its
SnapshotMetadataService object names): it runs beside the controller, on the controller's socket.
The blocks are node-local, so the controller serves the service by forwarding:

    sidecar --unix--> controller (Forwarder) --mutual TLS--> node (NodeServer) -> pool engine

- The node serves the standalone servicer (csi_thin.csi.snapshot_metadata_service) over its own
  engine on a TCP listener of its own (`--snapshot-metadata-listen host:port`, the node's address on
  the host network), and publishes that address in its ThinPool status.
- The controller finds the snapshot's ThinSnapshot, the node it names, and that node's ThinPool's
  address (csi_thin.kube.crengine.CrEngine.metadata_route), and relays the call there message by
  message: nothing is buffered, the sidecar's deadline goes down as the call's timeout, and a cancel
  (or a deadline passed) of the sidecar's call cancels the node's, which ends its stream.
- Both ends authenticate: the node's listener requires a client certificate from the chart's CA
  and accepts only the controller's name in it; the controller verifies the node's certificate
  against the same CA, under the one name every node's certificate carries.
- Errors are the node's own (NOT_FOUND, INVALID_ARGUMENT, OUT_OF_RANGE, ABORTED, INTERNAL ..., with
  its message: the node marks its statuses, NODE_STATUS_KEY); a node that cannot be reached, does not
  complete the TLS handshake in time, or goes silent or breaks the connection mid-stream is
  UNAVAILABLE, naming the node and its address.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import grpc

from csi_thin import deadline as deadline_mod
from csi_thin import errors
from csi_thin import metrics as metrics_mod
from csi_thin.csi import interceptor, snapshot_metadata_service, validate
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.kube import crengine

#: the common name of the controller's client certificate: the only client a node serves
CONTROLLER_NAME = "csi-thin-controller"
#: the DNS name every node's certificate carries (nodes come and go; their addresses vary), which
#: the controller verifies instead of the address it dials
NODE_NAME = "csi-thin-node"
#: a node that completes no TLS connection within this long (or the call's time, if shorter) is
#: UNAVAILABLE: reading blocks cannot start without it
CONNECT_SECONDS = 5.0
#: HTTP/2 keepalive on the relay: a node that vanishes mid-stream (power, network) is found within
#: about PING + PING_TIMEOUT seconds, instead of at the sidecar's deadline
PING_SECONDS = 10.0
PING_TIMEOUT_SECONDS = 5.0
#: relayed streams at once: each holds one of the controller's RPC threads until it ends (up to the
#: sidecar's --max-streaming-duration with a slow backup tool), and the controller's CSI server has
#: 16 (csi_thin.csi.server.Server). Beyond this a stream is refused RESOURCE_EXHAUSTED at once, so
#: the provisioner's, snapshotter's and resizer's calls and the probes always find threads
MAX_STREAMS = 8


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files: this end's certificate and key, and the CA that signed the other end's."""

    cert: str
    key: str
    ca: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            with open(self.cert, "rb") as c, open(self.key, "rb") as k, open(self.ca, "rb") as a:
                return c.read(), k.read(), a.read()
        except OSError as exc:
            raise errors.InvalidArgument(f"snapshot metadata TLS: {exc}") from exc


class Router(Protocol):
    """The part of `csi_thin.kube.crengine.CrEngine` the forwarder uses."""

    def metadata_route(
        self, name: str, *, deadline: deadline_mod.Deadline, what: str = "snapshot"
    ) -> crengine.MetadataRoute: ...


#: trailing metadata the node's listener sends with every status of its own: the controller tells
#: the node's answers (relayed as they are, INTERNAL included) from failures of the link itself (an
#: INTERNAL or UNAVAILABLE that gRPC makes up when the connection breaks), which name the node
NODE_STATUS_KEY = "csi-thin-node-status"

# ---- node side -----------------------------------------------------------------------------------


class _OnlyController(csi_pb2_grpc.SnapshotMetadataServicer):
    """The node's servicer behind a check of the client's certificate name: the CA also signs the
    nodes' certificates, and a node must not read another node's blocks."""

    def __init__(self, inner: snapshot_metadata_service.SnapshotMetadataService, *, client_name: str) -> None:
        self._inner = inner
        self._client_name = client_name.encode()

    def _check(self, context: grpc.ServicerContext) -> None:
        context.set_trailing_metadata(((NODE_STATUS_KEY, "1"),))  # sent with whatever status ends it
        raw: bytes | list[bytes] = context.auth_context().get("x509_common_name", [])
        names = [raw] if isinstance(raw, bytes) else list(raw)
        if self._client_name not in names:
            got = b", ".join(names).decode(errors="replace") or "none"
            raise errors.PermissionDenied(
                f"client certificate name {got} is not {self._client_name.decode()!r}: only the "
                "csi-thin controller reads snapshot metadata here"
            )

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        self._check(context)
        return self._inner.GetMetadataAllocated(request, context)

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        self._check(context)
        return self._inner.GetMetadataDelta(request, context)


class NodeServer:
    """The node's mutual-TLS listener for the controller: SnapshotMetadata over the node's engine."""

    def __init__(
        self,
        address: str,
        servicer: snapshot_metadata_service.SnapshotMetadataService,
        *,
        tls: TlsFiles,
        client_name: str = CONTROLLER_NAME,
        metrics: metrics_mod.Metrics | None = None,
        max_workers: int = 8,
    ) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise errors.InvalidArgument(f"--snapshot-metadata-listen {address!r}: expected host:port")
        cert, key, ca = tls.read()
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cbt"),
            interceptors=[interceptor.EdgeInterceptor(metrics)],
            options=[
                # the controller's keepalive pings (see PING_SECONDS) are welcome
                ("grpc.http2.min_recv_ping_interval_without_data_ms", int(PING_SECONDS * 1000) // 2),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(
            _OnlyController(servicer, client_name=client_name), self._server
        )
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        bound = self._server.add_secure_port(address, credentials)
        if bound == 0:
            raise errors.Unavailable(f"cannot listen on {address} for snapshot metadata")
        #: the address as bound (port 0 picks one): what the node publishes for the controller
        self.address = f"{host}:{bound}"

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float = 5.0) -> None:
        self._server.stop(grace).wait(grace + 1.0)


# ---- controller side -----------------------------------------------------------------------------


class _Relayed(errors.CsiThinError):
    """The node's status, passed on with its code and message as they came."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


#: codes that, without the node's mark (NODE_STATUS_KEY), say the link itself went wrong: they name the node
_TRANSPORT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


#: what the controller dials: an IP address or a host name, and a port. The endpoint is a node's own
#: words (its ThinPool's status): never a gRPC target of another scheme (unix: sockets of the
#: controller's pod, dns:/// or xds: resolvers)
_ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def _dialable(route: crengine.MetadataRoute) -> str:
    m = _ENDPOINT.fullmatch(route.endpoint)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise errors.Unavailable(
            f"node {route.node!r} publishes snapshot metadata endpoint {route.endpoint!r}, which is not "
            "host:port: not dialled"
        )
    return route.endpoint


def _relayed(route: crengine.MetadataRoute, exc: grpc.RpcError) -> errors.CsiThinError:
    code: grpc.StatusCode = exc.code()
    details = exc.details() or ""
    from_node = any(m.key == NODE_STATUS_KEY for m in exc.trailing_metadata() or ())
    if code in _TRANSPORT and not from_node:
        return errors.Unavailable(
            f"node {route.node!r} (snapshot metadata endpoint {route.endpoint}) failed the stream: "
            f"{code.name}: {details}"
        )
    return _Relayed(code.name, details)


#: a caller's remaining time beyond this is no deadline at all: grpc reports "none" as centuries
#: (gpr_inf_future), which a client's timeout cannot take
_NO_DEADLINE_SECONDS = 10 * 365 * 86400.0


def _callers_time(context: grpc.ServicerContext) -> float | None:
    """The caller's remaining time, uncapped; None when it gave no deadline."""
    remaining: float | None = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_SECONDS else remaining


class Forwarder(csi_pb2_grpc.SnapshotMetadataServicer):
    """The controller's SnapshotMetadata: validate as the node would, find the node, relay."""

    def __init__(
        self,
        *,
        router: Router,
        tls: TlsFiles,
        node_name: str = NODE_NAME,
        connect_seconds: float = CONNECT_SECONDS,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        cert, key, ca = tls.read()
        self._router = router
        self._streams = threading.BoundedSemaphore(max_streams)
        self._max_streams = max_streams
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        self._options = [
            ("grpc.ssl_target_name_override", node_name),
            ("grpc.keepalive_time_ms", int(PING_SECONDS * 1000)),
            ("grpc.keepalive_timeout_ms", int(PING_TIMEOUT_SECONDS * 1000)),
            # newer gRPC cores time every ping's ack by this one (default 60 s), keepalive's included
            ("grpc.http2.ping_timeout_ms", int(PING_TIMEOUT_SECONDS * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            # a fixed 64 KiB window: the node runs at most that far ahead of the sidecar's reading,
            # so the controller holds no more than that of any stream (BDP probing would grow it)
            ("grpc.http2.bdp_probe", 0),
        ]
        self._connect_seconds = connect_seconds

    def _admit(self, context: grpc.ServicerContext) -> None:
        """Take one of the MAX_STREAMS places until the call ends, however it ends (the termination
        callback runs once the status is sent: errors, cancels and deadlines included)."""
        if not self._streams.acquire(blocking=False):
            raise errors.ResourceExhausted(
                f"{self._max_streams} snapshot metadata streams are being relayed at once, the most "
                "the controller serves: retry when one has ended"
            )
        if not context.add_callback(self._streams.release):
            self._streams.release()  # the call has already ended

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        snapshot_id = validate.device_id(request.snapshot_id, "snapshot_id")
        snapshot_metadata_service.check_paging(request.max_results, request.starting_offset)
        self._admit(context)
        dl = interceptor.rpc_deadline(context)
        route = self._router.metadata_route(snapshot_id, deadline=dl, what="snapshot")
        return self._relay(route, "GetMetadataAllocated", request, context, dl)

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        base = validate.device_id(request.base_snapshot_id, "base_snapshot_id")
        target = validate.device_id(request.target_snapshot_id, "target_snapshot_id")
        snapshot_metadata_service.check_paging(request.max_results, request.starting_offset)
        self._admit(context)
        dl = interceptor.rpc_deadline(context)
        b = self._router.metadata_route(base, deadline=dl, what="base snapshot")
        t = self._router.metadata_route(target, deadline=dl, what="target snapshot")
        if b.source_volume != t.source_volume:
            # the node's words (csi_thin.pool.engine.PoolEngine.delta); they may be on two nodes
            raise errors.InvalidArgument(
                f"base snapshot {base!r} is of volume {b.source_volume!r}, target snapshot {target!r} "
                f"of {t.source_volume!r}: a delta is between two snapshots of the same volume"
            )
        return self._relay(t, "GetMetadataDelta", request, context, dl)

    def _relay(
        self,
        route: crengine.MetadataRoute,
        method: str,
        request: csi_pb2.GetMetadataAllocatedRequest | csi_pb2.GetMetadataDeltaRequest,
        context: grpc.ServicerContext,
        dl: deadline_mod.Deadline,
    ) -> Iterator[Any]:
        """Connect (every error so far is raised by the call itself), then stream lazily."""
        channel = grpc.secure_channel(_dialable(route), self._credentials, options=self._options)
        wait = min(self._connect_seconds, dl.remaining())
        try:
            grpc.channel_ready_future(channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            channel.close()
            raise errors.Unavailable(
                f"node {route.node!r} does not answer on its snapshot metadata endpoint {route.endpoint} "
                f"(no TLS connection within {wait:.1f} s): is its node agent running, the address "
                "reachable from the controller, and its certificate from the chart's CA?"
            ) from None
        stub = csi_pb2_grpc.SnapshotMetadataStub(channel)
        # the sidecar's own time (its --max-streaming-duration; none if it gave none), not `dl`: that
        # is capped as a unary call's (interceptor.MAX_RPC_SECONDS), and a backup tool that copies each
        # message's blocks before reading the next reads for far longer. The node still bounds its
        # own reading of the map by that cap, as standalone does; a node that goes silent is found by
        # the keepalive (PING_SECONDS)
        call = getattr(stub, method)(request, timeout=_callers_time(context))
        # the sidecar cancelled or its deadline passed while we wait for the node's next message:
        # cancel the node's call, which ends its stream (and our wait); if that happened already
        # (during the lookup or the connect), there is no callback to come: cancel it now
        if not context.add_callback(call.cancel):
            call.cancel()
        return self._messages(route, call, channel)

    @staticmethod
    def _messages(
        route: crengine.MetadataRoute,
        call: Any,  # grpc's streaming call: an iterator of responses, and a grpc.Call
        channel: grpc.Channel,
    ) -> Iterator[Any]:
        try:
            yield from call  # one message at a time: nothing of the map is held here
        except grpc.RpcError as exc:
            raise _relayed(route, exc) from None
        finally:
            call.cancel()  # a no-op after the end; else ends the node's stream
            channel.close()
