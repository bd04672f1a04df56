"""The controller -> node relay of CSI SnapshotMetadata (csi_thin.csi.snapshot_metadata_link), in one
process: the controller's CSI server (a unix socket) with the Forwarder, a node's mutual-TLS listener
on 127.0.0.1, real gRPC and TLS (openssl-made certificates) between them; the router (which the kube
tier runs against a real API server) and the pool (the reader) are fakes, as tests.csi_harness's
fake_driver has the backend."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.csi import identity_service, server
from csi_thin.csi import snapshot_metadata_link as link
from csi_thin.csi import snapshot_metadata_service as sms
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.kube import crengine
from tests import tlscerts

S = grpc.StatusCode
#: far more ranges than both hops' flow-control windows hold, one per message: a stream the client
#: does not read stays open, with its node and controller handlers blocked in sending
EXTENTS = 40_000


class _Reader:
    def allocated(
        self, name: str, *, starting_offset: int, deadline: deadline_mod.Deadline
    ) -> model.BlockMap:
        if name == "sbad":
            raise errors.CommandFailed(["thin_dump"], 1, "bad checksum in metadata block 7")
        if name != "s1":
            raise errors.NotFound(f"snapshot {name!r} not found")
        extents = tuple(model.Extent(i * 8192, 4096) for i in range(EXTENTS))
        return model.BlockMap(capacity_bytes=EXTENTS * 8192, extents=extents)

    def delta(
        self, base: str, target: str, *, starting_offset: int, deadline: deadline_mod.Deadline
    ) -> model.BlockMap:
        return self.allocated(target, starting_offset=starting_offset, deadline=deadline)


class _Recording(sms.SnapshotMetadataService):
    """The node's servicer, noting the time each call was given."""

    def __init__(self) -> None:
        super().__init__(reader=_Reader())
        self.remaining: list[float | None] = []
        #: seconds each call waits before reading the map (a big pool's thin_delta), and whether
        #: the call was still wanted after that wait
        self.hold = 0.0
        self.active_after_hold: list[bool] = []

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        self.remaining.append(context.time_remaining())
        if self.hold:
            time.sleep(self.hold)  # the map's reading, which looks at no context
            self.active_after_hold.append(context.is_active())
        return super().GetMetadataAllocated(request, context)


class _Router:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.delay = 0.0  # an API server that answers slowly

    def metadata_route(
        self, name: str, *, deadline: deadline_mod.Deadline, what: str = "snapshot"
    ) -> crengine.MetadataRoute:
        time.sleep(self.delay)
        return crengine.MetadataRoute(snapshot=name, node="n1", source_volume="v1", endpoint=self.endpoint)


class _Link:
    def __init__(self, tmp: pathlib.Path, **forwarder: Any) -> None:
        ca = tlscerts.ca(tmp / "tls", "ca")
        ctl, node = tlscerts.leaf(ca, link.CONTROLLER_NAME), tlscerts.leaf(ca, link.NODE_NAME)
        self.servicer = _Recording()
        self.node = link.NodeServer(
            "127.0.0.1:0",
            self.servicer,
            tls=link.TlsFiles(cert=str(node.cert), key=str(node.key), ca=str(ca)),
        )
        self.router = _Router(self.node.address)
        forward = link.Forwarder(
            router=self.router,
            tls=link.TlsFiles(cert=str(ctl.cert), key=str(ctl.key), ca=str(ca)),
            **forwarder,
        )
        self.socket = tmp / "csi.sock"
        self.controller = server.Server(
            server.Endpoint.parse(f"unix://{self.socket}"),
            server.Services(
                identity=identity_service.IdentityService(ready=lambda _dl: True, snapshot_metadata=True),
                snapshot_metadata=forward,
            ),
        )
        self.channel = grpc.insecure_channel(f"unix://{self.socket}", options=[("grpc.http2.bdp_probe", 0)])
        self.stub = csi_pb2_grpc.SnapshotMetadataStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)

    def __enter__(self) -> _Link:
        self.node.start()
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        self.controller.stop(grace=0)
        self.node.stop(grace=0)


def test_the_node_is_given_the_sidecars_time(tmp_path: pathlib.Path) -> None:
    """The sidecar allows a stream its --max-streaming-duration (10 minutes): a backup tool that copies
    the blocks of each message before reading the next reads for that long. The node's call must get
    that time, as a standalone stream has it, not the 110 s a unary CSI call is held to (found: the
    relay ended every stream DEADLINE_EXCEEDED at 110 s)."""
    with _Link(tmp_path) as t:
        req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id="s1", max_results=4096)
        first = next(iter(t.stub.GetMetadataAllocated(req, timeout=600)))
        assert len(first.block_metadata) == 4096
        (given,) = t.servicer.remaining
        assert given is not None and given > 500, given
        # no deadline from the caller: none on the node's stream either (the standalone stream's)
        assert len(list(t.stub.GetMetadataAllocated(req))) == -(-EXTENTS // 4096)
        assert t.servicer.remaining[1] is None or t.servicer.remaining[1] > 1e6, t.servicer.remaining


def test_open_streams_do_not_starve_the_controller(tmp_path: pathlib.Path) -> None:
    """Every relayed stream holds one of the controller's RPC threads until it ends (up to the
    sidecar's 10 minutes with a slow backup tool). Streams beyond the relay's limit are refused
    RESOURCE_EXHAUSTED at once, so the controller's other calls (the provisioner's, the probes) still
    find threads (found: 16 unread streams left the controller answering nothing); a stream's end
    gives its place back."""
    limit = link.MAX_STREAMS
    with _Link(tmp_path) as t:
        req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id="s1", max_results=1)
        running: list[Any] = []
        extra: list[Any] = []
        try:
            for _ in range(limit):
                running.append(t.stub.GetMetadataAllocated(req, timeout=120))
                next(running[-1])  # streaming, and left unread
            extra = [t.stub.GetMetadataAllocated(req, timeout=20) for _ in range(16 - limit)]
            for c in extra:
                try:
                    next(c)
                except grpc.RpcError as exc:
                    assert exc.code() == S.RESOURCE_EXHAUSTED and "at once" in (exc.details() or ""), exc
                else:
                    raise AssertionError("a stream beyond the limit was relayed")
            t.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
        finally:
            for c in running + extra:
                c.cancel()
        # the places come back as the cancelled streams end (asynchronously: wait, bounded)
        end = time.monotonic() + 15
        again: list[Any] = []
        try:
            while len(again) < limit:
                call: Any = t.stub.GetMetadataAllocated(req, timeout=60)
                try:
                    next(call)
                    again.append(call)
                except grpc.RpcError as exc:
                    assert exc.code() == S.RESOURCE_EXHAUSTED and time.monotonic() < end, exc
                    time.sleep(0.1)  # a cancelled stream's handler is still ending
        finally:
            for c in again:
                c.cancel()


def test_a_cancel_before_the_node_is_called_cancels_the_nodes_call(tmp_path: pathlib.Path) -> None:
    """The sidecar cancels while the controller still looks the snapshot up: the node's call, made
    after that, is cancelled at once (found: it ran on, its map read, until its first message found
    the sidecar gone)."""
    with _Link(tmp_path) as t:
        t.router.delay, t.servicer.hold = 1.0, 2.0
        call: Any = t.stub.GetMetadataAllocated(
            csi_pb2.GetMetadataAllocatedRequest(snapshot_id="s1"), timeout=60
        )
        time.sleep(0.3)  # the controller is in the lookup
        call.cancel()
        # an absence: give the lookup (1 s) and a node call made after it (its hold, 2 s) time
        time.sleep(4.0)
        # the node's handler either never ran (cancelled before it started) or found itself cancelled
        assert True not in t.servicer.active_after_hold, t.servicer.active_after_hold


@pytest.mark.parametrize(
    ("snapshot", "code", "message"),
    [
        ("sbad", S.INTERNAL, "thin_dump exited 1: bad checksum in metadata block 7"),
        ("s9", S.NOT_FOUND, "snapshot 's9' not found"),
    ],
)
def test_the_nodes_own_errors_are_relayed_as_they_are(
    tmp_path: pathlib.Path, snapshot: str, code: S, message: str
) -> None:
    """A status the node's servicer sent, INTERNAL included (a damaged pool), reaches the sidecar
    with its code and message as standalone sends them (found: INTERNAL became UNAVAILABLE, which
    tells a backup tool to retry a failure that retrying does not mend); only a failure of the link
    itself is UNAVAILABLE naming the node."""
    with _Link(tmp_path) as t:
        req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snapshot)
        try:
            list(t.stub.GetMetadataAllocated(req, timeout=30))
        except grpc.RpcError as exc:
            assert (exc.code(), exc.details()) == (code, message)
        else:
            raise AssertionError("no error")


@pytest.mark.parametrize("endpoint", ["unix:///run/x.sock", "dns:///n1:9813", "n1", "n1:port", ":9813"])
def test_only_a_host_and_port_is_dialled(tmp_path: pathlib.Path, endpoint: str) -> None:
    """A node writes its own endpoint (its ThinPool's status): the controller dials nothing but a
    host:port (not a unix socket of its own pod, not another name resolver)."""
    with _Link(tmp_path) as t:
        t.router.endpoint = endpoint
        req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id="s1")
        try:
            list(t.stub.GetMetadataAllocated(req, timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() == S.UNAVAILABLE and "host:port" in (exc.details() or ""), exc.details()
        else:
            raise AssertionError(f"{endpoint!r} was dialled")
