"""Running Kubernetes-mode node and controller processes scraped over HTTP on 127.0.0.1: in
Kubernetes mode the pool's creates, snapshots, grows and deletes come through CRs, not through the
node's gRPC edge, so their latency and codes are the node agent's pool_operation_duration_seconds
(the pool gauges are the same as standalone's); the controller times its wait for each verdict."""

from __future__ import annotations

import re

from csi_thin.csi.pb import csi_pb2
from tests import scrape
from tests.kube.conftest import Cluster, MiB, Proc
from tests.kube.test_kube_mode import create_req

_ADDRESS = re.compile(r"msg=serving http \(/healthz, /metrics\) address=(\S+)")


def _address(proc: Proc) -> str:
    found = _ADDRESS.search(proc.log.read_text(errors="replace"))
    assert found, f"{proc.argv[3]} logged no HTTP address:\n{proc.tail()}"
    return found.group(1)


def test_a_node_exports_its_pool_and_the_operations_it_ran_for_crs(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["a"].name
    ctl = c.controller()
    address = _address(c.nodes["a"].proc)
    before = scrape.metrics(address)
    assert before["csi_thin_pool_operation_duration_seconds"].type == "histogram"
    assert not before["csi_thin_pool_operation_duration_seconds"].samples

    vol = ctl.CreateVolume(create_req("pvc-m", 64 * MiB, requisite=[a], preferred=[a])).volume
    snap = ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-m", source_volume_id=vol.volume_id)
    ).snapshot
    ctl.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)
        )
    )
    ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))

    fams = scrape.metrics(address)
    ops = "csi_thin_pool_operation_duration_seconds_count"
    for op in ("create_volume", "create_snapshot", "grow"):
        assert scrape.value(fams, ops, operation=op, grpc_code="OK") == 1, op
    assert scrape.value(fams, ops, operation="delete", grpc_code="OK") == 2
    pool = "p"  # tests/kube/conftest.py names every pool p
    assert scrape.value(fams, "csi_thin_pool_status_ok", pool=pool) == 1
    assert scrape.value(fams, "csi_thin_pool_data_capacity_bytes", pool=pool) > 0
    assert scrape.value(fams, "csi_thin_pool_devices", pool=pool, kind="volume", state="ready") == 0
    for resource in ("thinvolume", "thinsnapshot", "thingroupsnapshot", "thinpool"):
        assert scrape.value(fams, "csi_thin_reconcile_errors_total", resource=resource) == 0
    # the node process runs the pool's trim schedule (planned at start, the first run a day away)
    # and exports its totals
    assert "event=trim-planned" in c.nodes["a"].proc.log.read_text(errors="replace")
    assert scrape.value(fams, "csi_thin_pool_trim_runs_total", pool=pool, result="ok") == 0
    assert scrape.value(fams, "csi_thin_pool_reclaimed_bytes_total", pool=pool) == 0
    labels = [s.labels for f in fams.values() for s in f.samples]
    assert not any(vol.volume_id in label.values() for label in labels), "no volume names as labels"

    # the controller's side of the same calls: each waited for node a's verdict on its CR
    ctl_fams = scrape.metrics(_address(c.controller_proc))
    waits = "csi_thin_cr_wait_seconds_count"
    for op in ("create_volume", "create_snapshot", "expand"):
        assert scrape.value(ctl_fams, waits, operation=op, outcome="ok") == 1, op
    assert scrape.value(ctl_fams, waits, operation="delete", outcome="ok") == 2
    rpc = "csi_thin_operation_duration_seconds_count"
    assert scrape.value(ctl_fams, rpc, operation="ControllerExpandVolume", grpc_code="OK") == 1
