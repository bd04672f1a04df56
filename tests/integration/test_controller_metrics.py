"""A running `csi-thin controller` process (real kube-apiserver + etcd, real gRPC over a unix socket)
scraped over HTTP on 127.0.0.1: RPC latency and codes, and how long each call waited for the node
agent's verdict on its CR (cr_wait_seconds), by operation and outcome.

No node agent runs here: the test plays the node, writing the ThinPool status and each CR's status
through the API server as a node agent would, so every outcome can be had on demand.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import kubernetes
import pytest

from csi_thin.controller import naming
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from tests import conftest, kubeenv, scrape

G, V = "csi-thin.io", "v1alpha1"
TOPOLOGY_KEY = "csi-thin.io/node"
MiB = 1024 * 1024
GiB = 1024 * MiB
_ADDRESS = re.compile(r"msg=serving http \(/healthz, /metrics\) address=(\S+)")


@contextlib.contextmanager
def controller(kube: kubeenv.KubeEnv, tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    """The controller process; yields (its HTTP address, its CSI socket). Stopped by SIGTERM."""
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    sock = tmp_path / "controller.sock"
    log = tmp_path / "controller.log"
    argv = [sys.executable, "-m", "csi_thin.cli", "controller", "--endpoint", f"unix://{sock}"]
    argv += ["--kubeconfig", str(kubeconfig), "--http-endpoint", "127.0.0.1:0", "--grace", "5"]
    env = {**os.environ, "PYTHONPATH": str(conftest.ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        address = ""
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:
            found = _ADDRESS.search(log.read_text(errors="replace"))
            if found and sock.is_socket():
                address = found.group(1)
                break
            time.sleep(0.1)  # process start-up: nothing to watch until it logs its address
        assert address, f"controller not serving (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        yield address, sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"controller exited {proc.returncode}:\n{log.read_text()[-3000:]}"


def _answer(api: Any, plural: str, csi_name: str, status: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Play the node agent for the CR of one CSI name: once it exists, write the status `status(obj)`."""
    name = naming.device_name(csi_name, naming.IdKind.VOLUME)
    w = kubernetes.watch.Watch()
    for event in w.stream(
        api.list_cluster_custom_object,
        G,
        V,
        plural,
        field_selector=f"metadata.name={name}",
        timeout_seconds=60,
    ):
        if event["type"] in ("ADDED", "MODIFIED"):
            obj = event["object"]
            api.patch_cluster_custom_object_status(G, V, plural, name, {"status": status(obj)})
            w.stop()
            return


def _volume_ready(obj: dict[str, Any]) -> dict[str, Any]:
    gen = obj["metadata"]["generation"]
    return {"phase": "Ready", "sizeBytes": obj["spec"]["sizeBytes"], "deviceId": 1, "observedGeneration": gen}


def _volume_failed(obj: dict[str, Any]) -> dict[str, Any]:
    gen = obj["metadata"]["generation"]
    return {
        "phase": "Failed",
        "code": "RESOURCE_EXHAUSTED",
        "message": "pool full",
        "observedGeneration": gen,
    }


def _request(name: str, node: str) -> csi_pb2.CreateVolumeRequest:
    topo = csi_pb2.Topology(segments={TOPOLOGY_KEY: node})
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[
            csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            )
        ],
        accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[topo], preferred=[topo]),
    )


@pytest.fixture
def node(crds: kubeenv.KubeEnv) -> Iterator[str]:
    """A node name of this test's own, with a healthy ThinPool (as its agent would report it)."""
    api = kubernetes.client.CustomObjectsApi(crds.api_client())
    name = f"m-{uuid.uuid4().hex[:6]}"
    pool = f"{name}.p"
    body = {"apiVersion": f"{G}/{V}", "kind": "ThinPool", "metadata": {"name": pool}}
    api.create_cluster_custom_object(G, V, "thinpools", {**body, "spec": {"nodeName": name, "pool": "p"}})
    status = {
        "health": "Healthy",
        "mode": "rw",
        "blockSizeBytes": 64 * 1024,
        "dataUsedBytes": 0,
        "dataTotalBytes": 10 * GiB,
        "metadataUsedBytes": 0,
        "metadataTotalBytes": 64 * MiB,
        "provisionedBytes": 0,
        "overprovisionRatio": "10.0",
        "thresholds": {"data": "0.9", "metadata": "0.8"},
    }
    api.patch_cluster_custom_object_status(G, V, "thinpools", pool, {"status": status})
    yield name
    for plural in ("thinvolumes", "thinpools"):
        for obj in api.list_cluster_custom_object(G, V, plural, field_selector=f"spec.nodeName={name}")[
            "items"
        ]:
            api.delete_cluster_custom_object(G, V, plural, obj["metadata"]["name"])


def test_a_running_controller_exports_rpc_codes_and_cr_wait_times(
    crds: kubeenv.KubeEnv, node: str, tmp_path: pathlib.Path
) -> None:
    api = kubernetes.client.CustomObjectsApi(crds.api_client())
    with controller(crds, tmp_path) as (address, sock), grpc.insecure_channel(f"unix://{sock}") as ch:
        stub = csi_pb2_grpc.ControllerStub(ch)
        assert scrape.get(address, "/healthz").body == "ok\n"
        before = scrape.metrics(address)
        assert before["csi_thin_cr_wait_seconds"].type == "histogram"
        assert not [s for s in before["csi_thin_cr_wait_seconds"].samples], "no wait before any call"

        # ok: the "node" reports Ready
        answer = threading.Thread(
            target=_answer, args=(api, "thinvolumes", "pvc-ok", _volume_ready), daemon=True
        )
        answer.start()
        vol = stub.CreateVolume(_request("pvc-ok", node), timeout=30).volume
        answer.join(timeout=30)
        assert vol.capacity_bytes == 64 * MiB

        # failed: the node reports RESOURCE_EXHAUSTED, which the controller passes on
        answer = threading.Thread(
            target=_answer, args=(api, "thinvolumes", "pvc-full", _volume_failed), daemon=True
        )
        answer.start()
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateVolume(_request("pvc-full", node), timeout=30)
        answer.join(timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # timeout: nobody answers. The wait ends at the RPC's own deadline (a little short of the
        # client's), so the client gets the controller's answer, not only its own timer's
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateVolume(_request("pvc-silent", node), timeout=6)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "not done within the deadline" in (err.value.details() or ""), err.value.details()

        # ok: a delete of a CR without the node's finalizer is done as soon as it is gone
        stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=30)

        fams = scrape.metrics(address)
        count = "csi_thin_cr_wait_seconds_count"
        assert scrape.value(fams, count, operation="create_volume", outcome="ok") == 1
        assert scrape.value(fams, count, operation="create_volume", outcome="failed") == 1
        assert scrape.value(fams, count, operation="create_volume", outcome="timeout") == 1
        assert scrape.value(fams, count, operation="delete", outcome="ok") == 1
        assert (
            scrape.value(fams, "csi_thin_cr_wait_seconds_sum", operation="create_volume", outcome="timeout")
            > 1
        )
        waits = fams["csi_thin_cr_wait_seconds"].samples
        assert {(s.labels["operation"], s.labels["outcome"]) for s in waits} == {
            ("create_volume", "ok"),
            ("create_volume", "failed"),
            ("create_volume", "timeout"),
            ("delete", "ok"),
        }

        rpc = "csi_thin_operation_duration_seconds_count"
        assert scrape.value(fams, rpc, operation="CreateVolume", grpc_code="OK") == 1
        assert scrape.value(fams, rpc, operation="CreateVolume", grpc_code="RESOURCE_EXHAUSTED") == 1
        # the interceptor answers a little before the client's deadline, with the wait's own verdict
        assert scrape.value(fams, rpc, operation="CreateVolume", grpc_code="DEADLINE_EXCEEDED") == 1
        assert scrape.value(fams, rpc, operation="DeleteVolume", grpc_code="OK") == 1
        assert "csi_thin_pool_data_used_bytes" not in fams, "a controller owns no pool"
        labels = [s.labels for f in fams.values() for s in f.samples]
        assert not any(vol.volume_id in label.values() for label in labels), "no volume names as labels"
