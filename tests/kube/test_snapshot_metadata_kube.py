"""Changed-block tracking in Kubernetes mode: the controller serves CSI SnapshotMetadata on its socket
(where the external-snapshot-metadata sidecar calls it) by relaying each stream to the snapshot's
node over mutual TLS (csi_thin.csi.snapshot_metadata_link).

Real processes: the controller and two node agents on reflink pools, a real API server. Node "a" has
a certificate from the chart's CA; node "b" one from another CA, which the controller must not trust.
A backup client reads the ranges through the controller, copies only them from restored volumes, and
gets byte-identical snapshots; every stream equals, message for message, the node's own servicer's
(the standalone one) read directly; errors keep the node's codes and messages.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import re
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from csi_thin.csi import snapshot_metadata_link as link
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from tests import blockio, cbt_scenarios, kubeenv, tlscerts
from tests import csi_harness as h
from tests.kube.conftest import TOPOLOGY_KEY, Cluster, MiB, make_cluster

KiB = 1024
S = grpc.StatusCode
VOLUME = 64 * MiB


@dataclasses.dataclass
class Cbt:
    c: Cluster
    ca: pathlib.Path
    controller_cert: tlscerts.Leaf
    node_cert: tlscerts.Leaf
    rogue_ca: pathlib.Path
    channels: list[grpc.Channel]

    def via_controller(self) -> csi_pb2_grpc.SnapshotMetadataStub:
        ch = grpc.insecure_channel(
            f"unix://{self.c.controller_proc.socket}", options=[("grpc.http2.bdp_probe", 0)]
        )
        self.channels.append(ch)
        return csi_pb2_grpc.SnapshotMetadataStub(ch)

    def endpoint(self, key: str) -> str:
        return str(self.c.pool(key)["status"]["snapshotMetadataEndpoint"])

    def direct(self, key: str, client: tlscerts.Leaf | None = None) -> csi_pb2_grpc.SnapshotMetadataStub:
        """Node `key`'s listener, as the controller (or as `client`) dials it."""
        who = client or self.controller_cert
        cert, key_pem, _ = who.read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(), private_key=key_pem, certificate_chain=cert
        )
        ch = grpc.secure_channel(
            self.endpoint(key), creds, options=[("grpc.ssl_target_name_override", link.NODE_NAME)]
        )
        self.channels.append(ch)
        return csi_pb2_grpc.SnapshotMetadataStub(ch)


def _tls_args(leaf: tlscerts.Leaf) -> list[str]:
    return [
        "--snapshot-metadata-tls-cert",
        str(leaf.cert),
        "--snapshot-metadata-tls-key",
        str(leaf.key),
        "--snapshot-metadata-tls-ca",
        str(leaf.ca),
    ]


@pytest.fixture
def cbt(kube: kubeenv.KubeEnv, tmp_path: pathlib.Path) -> Iterator[Cbt]:
    ca = tlscerts.ca(tmp_path / "tls", "csi-thin-ca")
    rogue = tlscerts.ca(tmp_path / "tls", "rogue-ca")
    controller_cert = tlscerts.leaf(ca, link.CONTROLLER_NAME)
    node_cert = tlscerts.leaf(ca, link.NODE_NAME)
    rogue_node = tlscerts.leaf(rogue, link.NODE_NAME)

    def node_args(key: str) -> list[str]:
        # node b: the right name, the wrong CA (it trusts the controller's CA, so only the
        # controller's verification can refuse it)
        leaf = node_cert if key == "a" else dataclasses.replace(rogue_node, ca=ca)
        return ["--snapshot-metadata-listen", "127.0.0.1:0", *_tls_args(leaf)]

    with make_cluster(kube, tmp_path, node_args=node_args, controller_args=_tls_args(controller_cert)) as c:
        t = Cbt(c, ca, controller_cert, node_cert, rogue, [])
        try:
            yield t
        finally:
            for ch in t.channels:
                ch.close()


def _create(c: Cluster, name: str, key: str, *, snapshot: str = "") -> csi_pb2.Volume:
    node = c.nodes[key].name
    top = [csi_pb2.Topology(segments={TOPOLOGY_KEY: node})]
    source = (
        csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot))
        if snapshot
        else None
    )
    req = csi_pb2.CreateVolumeRequest(
        name=f"{name}-{c.tag}",
        capacity_range=csi_pb2.CapacityRange(required_bytes=VOLUME),
        volume_capabilities=[h.block_cap()],
        accessibility_requirements=csi_pb2.TopologyRequirement(requisite=top, preferred=top),
        volume_content_source=source,
    )
    return c.controller().CreateVolume(req, timeout=60).volume


def _snapshot(c: Cluster, name: str, vol: csi_pb2.Volume) -> str:
    req = csi_pb2.CreateSnapshotRequest(name=f"{name}-{c.tag}", source_volume_id=vol.volume_id)
    return str(c.controller().CreateSnapshot(req, timeout=60).snapshot.snapshot_id)


class _Published:
    """A block volume published on node `key`: its device file, released on exit."""

    def __init__(self, c: Cluster, key: str, vol: csi_pb2.Volume, where: pathlib.Path) -> None:
        self._d, self._vol, self._where = c.node(key), vol, where

    def __enter__(self) -> str:
        stage, target = self._where / "stage", self._where / "target"
        self._where.mkdir(parents=True, exist_ok=True)
        self._d.stage(self._vol, h.block_cap(), stage)
        self._d.publish(self._vol, h.block_cap(), stage, target)
        return str(target)

    def __exit__(self, *exc: object) -> None:
        self._d.release(self._vol.volume_id, self._where / "stage", self._where / "target")


def _write(
    c: Cluster, key: str, vol: csi_pb2.Volume, where: pathlib.Path, writes: list[tuple[int, bytes]]
) -> None:
    with _Published(c, key, vol, where) as dev:
        for offset, data in writes:
            blockio.write_at(dev, offset, data)


def _restored_bytes(c: Cluster, key: str, snap: str, name: str, where: pathlib.Path) -> bytes:
    """The snapshot's bytes, read from a volume restored from it."""
    vol = _create(c, name, key, snapshot=snap)
    with _Published(c, key, vol, where) as dev:
        return blockio.read_direct(dev, 0, VOLUME)


def _messages(responses: Iterator[object]) -> list[bytes]:
    return [r.SerializeToString() for r in responses]  # type: ignore[attr-defined]


def _apply(ranges: list[tuple[int, int]], source: bytes, onto: bytes) -> bytes:
    out = bytearray(onto)
    for off, size in ranges:
        out[off : off + size] = source[off : off + size]
    return bytes(out)


def test_backup_through_the_controller_is_byte_identical(cbt: Cbt, tmp_path: pathlib.Path) -> None:
    c = cbt.c
    caps = csi_pb2_grpc.IdentityStub(grpc.insecure_channel(f"unix://{c.controller_proc.socket}"))
    services = [
        cap.service.type
        for cap in caps.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    ]
    assert csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in services
    # the node publishes the address it bound, and only that one
    assert re.fullmatch(r"127\.0\.0\.1:[0-9]+", cbt.endpoint("a")), cbt.endpoint("a")

    rnd = random.Random(7)
    vol = _create(c, "cbt-vol", "a")
    first = [(0, 1 * MiB), (8 * MiB, 192 * KiB), (40 * MiB, 64 * KiB)]
    _write(c, "a", vol, tmp_path / "w1", [(off, rnd.randbytes(n)) for off, n in first])
    s1 = _snapshot(c, "cbt-s1", vol)
    second = [(8 * MiB + 64 * KiB, 64 * KiB), (20 * MiB, 128 * KiB), (VOLUME - 1 * MiB, 1 * MiB)]
    _write(c, "a", vol, tmp_path / "w2", [(off, rnd.randbytes(n)) for off, n in second])
    s2 = _snapshot(c, "cbt-s2", vol)

    stub, node = cbt.via_controller(), cbt.direct("a")
    alloc_req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=s1, max_results=2)
    delta_req = csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=s1, target_snapshot_id=s2)
    # what the sidecar gets is what the node's (standalone) servicer sends, message for message
    for method, req in (("GetMetadataAllocated", alloc_req), ("GetMetadataDelta", delta_req)):
        relayed = _messages(getattr(stub, method)(req, timeout=60))
        assert relayed == _messages(getattr(node, method)(req, timeout=60)), method
        assert relayed, method

    full = cbt_scenarios.allocated(stub, s1, max_results=2)
    assert full.capacity == VOLUME and full.messages == -(-len(full.ranges) // 2)
    written = cbt_scenarios.total([(0, n) for _, n in first])
    assert written <= cbt_scenarios.total(full.ranges) <= written + 2 * MiB, full.ranges
    inc = cbt_scenarios.delta(stub, s1, s2)
    changed = cbt_scenarios.total([(0, n) for _, n in second])
    assert changed <= cbt_scenarios.total(inc.ranges) <= changed + 2 * MiB, inc.ranges
    assert not cbt_scenarios.overlaps(inc.ranges, 0, 1 * MiB), "an unchanged region is in the delta"

    s1_bytes = _restored_bytes(c, "a", s1, "cbt-r1", tmp_path / "r1")
    s2_bytes = _restored_bytes(c, "a", s2, "cbt-r2", tmp_path / "r2")
    assert s1_bytes != s2_bytes
    assert _apply(full.ranges, s1_bytes, bytes(VOLUME)) == s1_bytes  # full backup onto zeros
    assert _apply(inc.ranges, s2_bytes, s1_bytes) == s2_bytes  # incremental onto the base

    # resuming: every range that ends after starting_offset, as the node says
    resumed = cbt_scenarios.allocated(stub, s1, starting_offset=8 * MiB + 1)
    assert resumed.ranges == [r for r in full.ranges if r[0] + r[1] > 8 * MiB + 1]


def _status(fn: object) -> tuple[S, str]:
    try:
        fn()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details()  # type: ignore[no-any-return]
    return S.OK, ""


def _drain(call: object) -> object:
    return lambda: list(call)  # type: ignore[call-overload]


def test_errors_are_the_nodes(cbt: Cbt, tmp_path: pathlib.Path) -> None:
    c = cbt.c
    stub, node = cbt.via_controller(), cbt.direct("a")
    va = _create(c, "cbt-ea", "a")
    sa = _snapshot(c, "cbt-sa", va)
    sa2 = _snapshot(c, "cbt-sa2", _create(c, "cbt-ea2", "a"))
    sb = _snapshot(c, "cbt-sb", _create(c, "cbt-eb", "b"))
    A, D = csi_pb2.GetMetadataAllocatedRequest, csi_pb2.GetMetadataDeltaRequest
    same_as_node = [
        ("GetMetadataAllocated", A(snapshot_id=f"snap-nothing-{c.tag}"), S.NOT_FOUND),
        ("GetMetadataAllocated", A(snapshot_id=""), S.INVALID_ARGUMENT),
        ("GetMetadataAllocated", A(snapshot_id=sa, max_results=-1), S.INVALID_ARGUMENT),
        ("GetMetadataAllocated", A(snapshot_id=sa, starting_offset=-1), S.OUT_OF_RANGE),
        ("GetMetadataAllocated", A(snapshot_id=sa, starting_offset=VOLUME + 1), S.OUT_OF_RANGE),
        ("GetMetadataDelta", D(base_snapshot_id=sa, target_snapshot_id=f"snap-no-{c.tag}"), S.NOT_FOUND),
        ("GetMetadataDelta", D(base_snapshot_id=sa, target_snapshot_id=sa2), S.INVALID_ARGUMENT),
    ]
    for method, req, code in same_as_node:
        got = _status(_drain(getattr(stub, method)(req, timeout=30)))
        assert got[0] == code, (method, req, got)
        assert got == _status(_drain(getattr(node, method)(req, timeout=30))), (method, req)

    # two snapshots on two nodes: different volumes, refused before any node is asked
    code, msg = _status(
        _drain(stub.GetMetadataDelta(D(base_snapshot_id=sa, target_snapshot_id=sb), timeout=30))
    )
    assert code == S.INVALID_ARGUMENT and "same volume" in msg, msg

    # node b's certificate is not from the controller's CA: the controller does not talk to it
    code, msg = _status(_drain(stub.GetMetadataAllocated(A(snapshot_id=sb), timeout=30)))
    assert code == S.UNAVAILABLE and c.nodes["b"].name in msg and cbt.endpoint("b") in msg, msg

    # node a silent (stopped, not dead: the kernel still accepts its connections, nothing answers
    # the TLS handshake): UNAVAILABLE within the connect bound, not at the caller's deadline
    popen = c.nodes["a"].proc.popen
    assert popen is not None
    popen.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        code, msg = _status(_drain(stub.GetMetadataAllocated(A(snapshot_id=sa), timeout=60)))
        assert code == S.UNAVAILABLE and "no TLS connection" in msg and c.nodes["a"].name in msg, msg
        assert time.monotonic() - t0 < link.CONNECT_SECONDS + 5
    finally:
        popen.send_signal(signal.SIGCONT)

    # node a gone: UNAVAILABLE naming it, within the connect bound, not at the caller's deadline
    c.nodes["a"].proc.stop()
    t0 = time.monotonic()
    code, msg = _status(_drain(stub.GetMetadataAllocated(A(snapshot_id=sa), timeout=60)))
    assert code == S.UNAVAILABLE and c.nodes["a"].name in msg, msg
    assert time.monotonic() - t0 < link.CONNECT_SECONDS + 5


def test_only_the_controller_is_served(cbt: Cbt) -> None:
    """The node's listener: a certificate of another CA, or none, fails the handshake; one of the
    chart's CA but not the controller's name (a node's) is PERMISSION_DENIED."""
    c = cbt.c
    sa = _snapshot(c, "cbt-pa", _create(c, "cbt-pv", "a"))
    req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=sa)
    assert _status(_drain(cbt.direct("a").GetMetadataAllocated(req, timeout=30)))[0] == S.OK

    code, msg = _status(_drain(cbt.direct("a", client=cbt.node_cert).GetMetadataAllocated(req, timeout=30)))
    assert code == S.PERMISSION_DENIED and link.CONTROLLER_NAME in msg, msg

    stranger = tlscerts.leaf(cbt.rogue_ca, link.CONTROLLER_NAME)
    code, _ = _status(_drain(cbt.direct("a", client=stranger).GetMetadataAllocated(req, timeout=10)))
    assert code == S.UNAVAILABLE

    no_cert = grpc.secure_channel(
        cbt.endpoint("a"),
        grpc.ssl_channel_credentials(root_certificates=cbt.ca.read_bytes()),
        options=[("grpc.ssl_target_name_override", link.NODE_NAME)],
    )
    cbt.channels.append(no_cert)
    stub = csi_pb2_grpc.SnapshotMetadataStub(no_cert)
    assert _status(_drain(stub.GetMetadataAllocated(req, timeout=10)))[0] == S.UNAVAILABLE
    # none of the three reached the servicer with a snapshot read
    log = c.nodes["a"].proc.log.read_text()
    assert len(re.findall(r"rpc=/csi.v1.SnapshotMetadata/GetMetadataAllocated code=OK", log)) == 1


def _node_ended(c: Cluster, code: str) -> int:
    log = c.nodes["a"].proc.log.read_text(errors="replace")
    return len(re.findall(rf"rpc=/csi.v1.SnapshotMetadata/GetMetadataAllocated code={code}\b", log))


def _wait_node_ended(c: Cluster, code: str, count: int) -> None:
    """The node logs one line when its stream ends (csi_thin.csi.interceptor): wait (bounded) for it."""
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if _node_ended(c, code) == count:
            return
        time.sleep(0.1)  # a log file: nothing to watch
    ends = {x: _node_ended(c, x) for x in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE")}
    raise AssertionError(f"node a's stream did not end {code} ({count}): {ends}")


def test_cancel_and_deadline_end_the_node_stream(cbt: Cbt, tmp_path: pathlib.Path) -> None:
    """A stream far longer than the two hops' flow-control windows: the node runs ahead of the
    sidecar by no more than those; the sidecar's cancel, and its deadline, end the node's stream."""
    c = cbt.c
    vol = _create(c, "cbt-many", "a")
    # every other 4 KiB block of 64 MiB: 8192 extents, 8192 messages of one range each
    _write(c, "a", vol, tmp_path / "w", [(off, b"d" * 4096) for off in range(0, VOLUME, 8192)])
    snap = _snapshot(c, "cbt-m", vol)
    req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snap, max_results=1)
    stub = cbt.via_controller()
    assert len(cbt_scenarios.check_stream(stub.GetMetadataAllocated(req, timeout=60)).ranges) == 8192
    _wait_node_ended(c, "OK", 1)

    call = stub.GetMetadataAllocated(req, timeout=60)
    next(call)
    call.cancel()
    assert h.code_of(lambda: list(call)) == S.CANCELLED
    _wait_node_ended(c, "CANCELLED", 1)

    call = stub.GetMetadataAllocated(req, timeout=3)
    next(call)
    time.sleep(3.5)  # the sidecar reads nothing more until its deadline has passed
    assert h.code_of(lambda: list(call)) == S.DEADLINE_EXCEEDED
    _wait_node_ended(c, "DEADLINE_EXCEEDED", 1)
    assert _node_ended(c, "OK") == 1
