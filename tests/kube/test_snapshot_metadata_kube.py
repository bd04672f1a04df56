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

import base64
import contextlib
import dataclasses
import json
import pathlib
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import grpc
import kubernetes
import pytest
import yaml

from csi_thin.csi import snapshot_metadata_link as link
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from tests import blockio, cbt_scenarios, kubecrds, kubeenv, tlscerts
from tests import conftest as conftest_mod
from tests import csi_harness as h
from tests.kube import netns
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


SIDECAR_PORT = 50051
AUDIENCE = "csi-thin-cbt-test"


def _install_crds(c: Cluster) -> None:
    """The VolumeSnapshot and SnapshotMetadataService CRDs (pinned, bin/crds/), once per API server."""
    ext = kubernetes.client.ApiextensionsV1Api(c.env.api_client())
    for directory in ("snapshot", "snapshot-metadata"):
        files = sorted((conftest_mod.BIN / "crds" / directory).glob("*.yaml"))
        assert files, (
            f"bin/crds/{directory} is empty: run `tools/build.sh snapshot-crds snapshot-metadata-crds`"
        )
        for path in files:
            crd = yaml.safe_load(path.read_text())
            with contextlib.suppress(kubernetes.client.exceptions.ApiException):
                ext.create_custom_resource_definition(crd)
            kubecrds.established(ext, crd["metadata"]["name"])


def _volume_snapshot(c: Cluster, ns: str, name: str, handle: str) -> None:
    """A VolumeSnapshot bound to a pre-provisioned content of the CSI snapshot `handle`, both ready
    (as snapshot-controller and csi-snapshotter would leave them)."""
    api = c.api
    content = f"{name}-{c.tag}"
    api.create_cluster_custom_object(
        "snapshot.storage.k8s.io",
        "v1",
        "volumesnapshotcontents",
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": content},
            "spec": {
                "driver": "csi-thin.io",
                "deletionPolicy": "Retain",
                "source": {"snapshotHandle": handle},
                "volumeSnapshotRef": {"namespace": ns, "name": name},
            },
        },
    )
    api.patch_cluster_custom_object_status(
        "snapshot.storage.k8s.io",
        "v1",
        "volumesnapshotcontents",
        content,
        {"status": {"readyToUse": True, "snapshotHandle": handle}},
    )
    api.create_namespaced_custom_object(
        "snapshot.storage.k8s.io",
        "v1",
        ns,
        "volumesnapshots",
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name},
            # the sidecar reads the class (for snapshotter secrets; csi-thin's has none)
            "spec": {
                "source": {"volumeSnapshotContentName": content},
                "volumeSnapshotClassName": f"cbt-{c.tag}",
            },
        },
    )
    api.patch_namespaced_custom_object_status(
        "snapshot.storage.k8s.io",
        "v1",
        ns,
        "volumesnapshots",
        name,
        {"status": {"readyToUse": True, "boundVolumeSnapshotContentName": content}},
    )


def _backup_identity(c: Cluster, ns: str) -> str:
    """A namespace, and a ServiceAccount in it with upstream's backup-client role; its name."""
    client = c.env.api_client()
    core = kubernetes.client.CoreV1Api(client)
    rbac = kubernetes.client.RbacAuthorizationV1Api(client)
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": "backup"}})
    rbac.create_cluster_role(
        {
            "metadata": {"name": f"cbt-client-{c.tag}"},
            "rules": [
                {
                    "apiGroups": ["snapshot.storage.k8s.io"],
                    "resources": ["volumesnapshots", "volumesnapshotcontents"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["cbt.storage.k8s.io"],
                    "resources": ["snapshotmetadataservices"],
                    "verbs": ["get", "list"],
                },
            ],
        }
    )
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": f"cbt-client-{c.tag}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"cbt-client-{c.tag}",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "backup", "namespace": ns}],
        }
    )
    return "backup"


def _lister_ranges(out: str) -> list[tuple[int, int]]:
    records = json.loads(out)
    # Go's protobuf structs leave zero fields out of their JSON (omitempty): an offset of 0 is absent
    ranges = [
        (int(b.get("byte_offset", 0)), int(b["size_bytes"])) for r in records for b in r["block_metadata"]
    ]
    assert {r["volume_capacity_bytes"] for r in records} == {VOLUME}, records
    return ranges


def test_the_upstream_sidecar_serves_a_backup_tool(cbt: Cbt, tmp_path: pathlib.Path) -> None:
    """Kubernetes' own path end to end: upstream's csi-snapshot-metadata sidecar (built from the
    pinned module) on the controller's socket, upstream's example backup client (its Go iterator)
    with a real ServiceAccount token; both in a network namespace of their own (the sidecar binds
    every interface), which reaches only the API server. The ranges the client prints are the
    controller's, which are the node's."""
    c = cbt.c
    sidecar, lister = (
        conftest_mod.tool("csi-snapshot-metadata"),
        conftest_mod.tool("snapshot-metadata-lister"),
    )
    _install_crds(c)
    vol = _create(c, "cbt-up", "a")
    rnd = random.Random(3)
    _write(c, "a", vol, tmp_path / "w1", [(0, rnd.randbytes(256 * KiB)), (32 * MiB, rnd.randbytes(64 * KiB))])
    s1 = _snapshot(c, "cbt-up1", vol)
    _write(c, "a", vol, tmp_path / "w2", [(16 * MiB, rnd.randbytes(128 * KiB))])
    s2 = _snapshot(c, "cbt-up2", vol)

    ns = f"cbt-{c.tag}"
    sa = _backup_identity(c, ns)
    c.api.create_cluster_custom_object(
        "snapshot.storage.k8s.io",
        "v1",
        "volumesnapshotclasses",
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotClass",
            "metadata": {"name": f"cbt-{c.tag}"},
            "driver": "csi-thin.io",
            "deletionPolicy": "Retain",
        },
    )
    _volume_snapshot(c, ns, "vs1", s1)
    _volume_snapshot(c, ns, "vs2", s2)
    server = tlscerts.leaf(cbt.ca, "csi-thin-snapshot-metadata", ip="127.0.0.1")
    c.api.create_cluster_custom_object(
        "cbt.storage.k8s.io",
        "v1alpha1",
        "snapshotmetadataservices",
        {
            "apiVersion": "cbt.storage.k8s.io/v1alpha1",
            "kind": "SnapshotMetadataService",
            "metadata": {"name": "csi-thin.io"},
            "spec": {
                "address": f"127.0.0.1:{SIDECAR_PORT}",
                "caCert": base64.b64encode(cbt.ca.read_bytes()).decode(),
                "audience": AUDIENCE,
            },
        },
    )
    kubeconfig = c.env.write_kubeconfig(tmp_path / "kubeconfig")
    api_port = int(c.env.server.rsplit(":", 1)[1])
    log = tmp_path / "sidecar.log"
    with netns.namespace() as space:
        space.bridge(api_port)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                space.argv(
                    [
                        str(sidecar),
                        f"--csi-address={c.controller_proc.socket}",
                        f"--tls-cert={server.cert}",
                        f"--tls-key={server.key}",
                        f"--port={SIDECAR_PORT}",
                        f"--kubeconfig={kubeconfig}",
                    ]
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            end = time.monotonic() + 60
            while not space.connectable(SIDECAR_PORT):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < end, log.read_text()[-3000:]
                time.sleep(0.2)  # the sidecar's start-up: nothing to watch until its port answers

            def run(*args: str) -> list[tuple[int, int]]:
                argv = [str(lister), "-n", ns, "-o", "json", "--kubeconfig", str(kubeconfig)]
                argv += ["--service-account", sa, "--service-account-namespace", ns, *args]
                done = subprocess.run(
                    space.argv(argv), capture_output=True, text=True, timeout=120, check=False
                )
                assert done.returncode == 0, f"{done.stderr}\n{log.read_text()[-3000:]}"
                return _lister_ranges(done.stdout)

            stub = cbt.via_controller()
            full = run("-s", "vs1", "--max-results", "2")
            assert full == cbt_scenarios.allocated(stub, s1).ranges
            assert cbt_scenarios.overlaps(full, 32 * MiB, 32 * MiB + 64 * KiB)
            inc = run("-s", "vs2", "-p", "vs1")
            assert inc == cbt_scenarios.delta(stub, s1, s2).ranges
            assert cbt_scenarios.overlaps(inc, 16 * MiB, 16 * MiB + 128 * KiB)
            assert not cbt_scenarios.overlaps(inc, 32 * MiB, 32 * MiB + 64 * KiB)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _forget_cbt_objects(c, ns)


def _forget_cbt_objects(c: Cluster, ns: str) -> None:
    """What this test made in the session's API server, besides the CRs the cluster fixture removes."""
    client = c.env.api_client()
    gone = contextlib.suppress(kubernetes.client.exceptions.ApiException)
    with gone:
        c.api.delete_cluster_custom_object(
            "cbt.storage.k8s.io", "v1alpha1", "snapshotmetadataservices", "csi-thin.io"
        )
    for plural, name in (
        ("volumesnapshotclasses", f"cbt-{c.tag}"),
        ("volumesnapshotcontents", f"vs1-{c.tag}"),
        ("volumesnapshotcontents", f"vs2-{c.tag}"),
    ):
        with gone:
            c.api.delete_cluster_custom_object("snapshot.storage.k8s.io", "v1", plural, name)
    rbac = kubernetes.client.RbacAuthorizationV1Api(client)
    with gone:
        rbac.delete_cluster_role_binding(f"cbt-client-{c.tag}")
    with gone:
        rbac.delete_cluster_role(f"cbt-client-{c.tag}")
    with gone:
        kubernetes.client.CoreV1Api(client).delete_namespace(ns)


def test_a_node_silent_mid_stream_is_unavailable(cbt: Cbt, tmp_path: pathlib.Path) -> None:
    """The node stops answering in the middle of a stream (SIGSTOP: its kernel still acknowledges
    TCP, nothing answers HTTP/2): the controller's keepalive ends the relay UNAVAILABLE, naming the
    node, long before the caller's deadline."""
    c = cbt.c
    vol = _create(c, "cbt-mid", "a")
    _write(c, "a", vol, tmp_path / "w", [(off, b"d" * 4096) for off in range(0, VOLUME, 8192)])
    snap = _snapshot(c, "cbt-mid-s", vol)
    req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snap, max_results=1)
    call = cbt.via_controller().GetMetadataAllocated(req, timeout=100)
    next(call)
    popen = c.nodes["a"].proc.popen
    assert popen is not None
    popen.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        code, msg = _status(lambda: list(call))
        assert code == S.UNAVAILABLE and c.nodes["a"].name in msg, (code, msg)
        assert time.monotonic() - t0 < link.PING_SECONDS + link.PING_TIMEOUT_SECONDS + 10
    finally:
        popen.send_signal(signal.SIGCONT)
