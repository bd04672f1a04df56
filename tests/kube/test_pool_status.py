"""The ThinPool status as the controller reads it: it follows a create within the publish interval
(not the 30 s refresh), and capacity follows each node's own thresholds from its ThinPool status,
never the controller's defaults."""

from __future__ import annotations

import time

import grpc

from csi_thin import deadline as deadline_mod
from csi_thin import model
from csi_thin.csi.pb import csi_pb2
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.kube import watch
from csi_thin.node import agent as agent_mod
from tests.kube.conftest import Cluster, MiB
from tests.kube.test_kube_mode import capacity, code_of, create_req


def _expected_available(status: dict[str, int], *, data_threshold: float, provisioned: int) -> int:
    """GetCapacity as the controller computes it (overprovision ratio 10, 1 MiB blocks)."""
    total = status["dataTotalBytes"]
    logical = (10 * total - provisioned) // MiB * MiB
    physical = int(total * data_threshold) - status["dataUsedBytes"]
    return max(0, min(logical, physical)) // MiB * MiB


def test_the_thinpool_status_follows_a_create_promptly(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["a"].name
    api = client_mod.Client(c.env.api_client())
    before = c.pool("a")["status"]
    assert before["volumes"] == 0
    vol = c.controller().CreateVolume(create_req("pvc-prompt", 64 * MiB, requisite=[a], preferred=[a])).volume
    created = time.monotonic()
    got = watch.wait_for(
        api,
        res.ThinPool,
        res.pool_object_name(a, "p"),
        lambda o: o is not None and o.status.volumes == 1,
        deadline=deadline_mod.Deadline.after(agent_mod.REFRESH_SECONDS / 2),
        what="the create in the ThinPool status",
    )
    seen = time.monotonic() - created
    assert got is not None and got.status.provisioned_bytes == 64 * MiB
    # the agent marked the status dirty before the volume was Ready: published within the interval
    # of that (plus slack for API round trips on a loaded machine), long before the periodic refresh
    # (30 s after the agent's start, seconds ago)
    assert seen < agent_mod.PUBLISH_INTERVAL + 5.0 < agent_mod.REFRESH_SECONDS / 2, seen
    # what GetCapacity says now is computed from that status
    status = c.pool("a")["status"]
    assert status["lastUpdated"] >= before["lastUpdated"] and status["volumes"] == 1
    cap = capacity(c, a)
    assert cap.available_capacity == _expected_available(
        status, data_threshold=model.Thresholds().data, provisioned=64 * MiB
    )
    c.controller().DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    gone = watch.wait_for(
        api,
        res.ThinPool,
        res.pool_object_name(a, "p"),
        lambda o: o is not None and o.status.volumes == 0,
        deadline=deadline_mod.Deadline.after(agent_mod.REFRESH_SECONDS / 2),
        what="the delete in the ThinPool status",
    )
    assert gone is not None and gone.status.provisioned_bytes == 0


def test_capacity_follows_each_nodes_own_thresholds(cluster: Cluster) -> None:
    """Node a configured with a data threshold of 50%: less capacity than the controller's default
    (95%) would give. Node b configured below what its pool already uses: no capacity, creates there
    refused, its volume's condition abnormal."""
    c = cluster
    a, b = c.nodes["a"].name, c.nodes["b"].name
    ctl = c.controller()
    vb = ctl.CreateVolume(create_req("pvc-b", 64 * MiB, requisite=[b], preferred=[b])).volume
    default_a = capacity(c, a).available_capacity
    for key, data in (("a", 0.5), ("b", 0.001)):
        node = c.nodes[key]
        node.proc.stop()
        node.config.write_text(node.config.read_text() + f"thresholds:\n  data: {data}\n  metadata: 0.8\n")
        node.proc.start()

    st_a = c.pool("a")["status"]
    assert st_a["thresholds"]["data"] == "0.5"
    cap_a = capacity(c, a)
    assert cap_a.available_capacity == _expected_available(st_a, data_threshold=0.5, provisioned=0)
    assert 0 < cap_a.available_capacity < default_a
    # the largest volume is bounded by the thin headroom only (lazily allocated)
    assert cap_a.maximum_volume_size.value == 10 * st_a["dataTotalBytes"] // MiB * MiB

    st_b = c.pool("b")["status"]
    assert st_b["thresholds"]["data"] == "0.001" and st_b["dataUsedBytes"] > 0.001 * st_b["dataTotalBytes"]
    cap_b = capacity(c, b)
    assert cap_b.available_capacity == 0 and cap_b.maximum_volume_size.value == 0
    assert (
        code_of(lambda: ctl.CreateVolume(create_req("pvc-b2", 64 * MiB, requisite=[b], preferred=[b])))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    got = ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vb.volume_id))
    # abnormal at a few percent used: only node b's own threshold says so
    cond = got.status.volume_condition
    assert cond.abnormal and "thin pool data" in cond.message and "writes may fail soon" in cond.message
    # deletes still run above the threshold
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vb.volume_id))
    assert c.devices("b") == []
