"""`csi-thin pool gc --orphans --node-id N` end to end: the command, run as an operator runs it next
to a node agent (`kubectl exec` into the node pod), asks the running agent over its private socket.
Devices whose CRs were removed by force are orphans: reported in the ThinPool status once the agent
starts, kept within the grace period, deleted after it; one whose CR comes back meanwhile is saved.
Exit codes: 0 (also with orphans still waiting), 1 (no agent; another node's agent), 2 (bad input)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

from csi_thin import deadline as deadline_mod
from csi_thin.csi.pb import csi_pb2
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.kube import watch
from tests.kube.conftest import Cluster, G, MiB, V
from tests.kube.test_kube_mode import create_req


def gc(c: Cluster, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "csi_thin.cli", "pool", "gc", "--orphans", "--config"]
    return subprocess.run(
        [*argv, str(c.nodes[key].config), *args], check=False, capture_output=True, text=True, timeout=120
    )


def orphan_gauge(c: Cluster, key: str) -> float:
    """csi_thin_pool_orphan_devices from the node's /metrics (its port, picked by the kernel, is in its
    log's last start-up)."""
    log = c.nodes[key].proc.log.read_text()
    address = re.findall(r"msg=serving http \(/healthz, /metrics\) address=(\S+)", log)[-1]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    (value,) = re.findall(r'^csi_thin_pool_orphan_devices\{pool="p"\} (\S+)$', body, re.MULTILINE)
    return float(value)


def test_orphans_wait_for_their_grace_period_and_a_cr_saves_one(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["a"].name
    ctl = c.controller()
    api = client_mod.Client(c.env.api_client())
    gone = ctl.CreateVolume(create_req("pvc-gone", 64 * MiB, requisite=[a], preferred=[a])).volume
    saved = ctl.CreateVolume(create_req("pvc-saved", 64 * MiB, requisite=[a], preferred=[a])).volume
    kept_spec = c.cr("thinvolumes", saved.volume_id)
    assert kept_spec is not None
    # both CRs removed by force (finalizer stripped) while the agent is down (a running agent puts
    # its finalizer back and deletes the device itself): their devices stay, orphans
    c.nodes["a"].proc.stop()
    for vid in (gone.volume_id, saved.volume_id):
        c.api.patch_cluster_custom_object(G, V, "thinvolumes", vid, {"metadata": {"finalizers": None}})
        c.api.delete_cluster_custom_object(G, V, "thinvolumes", vid)
    c.nodes["a"].proc.start()
    orphans = sorted([gone.volume_id, saved.volume_id])
    assert sorted(c.pool("a")["status"]["orphans"]) == orphans
    assert orphan_gauge(c, "a") == 2.0  # records no CR owns count too, not only ids no record owns

    # within the grace period: kept, and said so; exit 0
    first = gc(c, "a", "--node-id", a, "--grace", "1h", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["deleted"] == [] and report["kept"] == [] and report["failed"] == []
    assert sorted(w["name"] for w in report["waiting"]) == orphans
    assert all(3500 < w["eligible_in_seconds"] <= 3600 for w in report["waiting"])
    human = gc(c, "a", "--node-id", a, "--grace", "1h")
    assert human.returncode == 0 and "deleted 0 orphan(s): none" in human.stdout
    assert f"waiting: {gone.volume_id} (an orphan for" in human.stdout
    assert c.devices("a") == orphans

    # the CR of one comes back (as a restore from a backup would make it): the agent takes the device up
    spec = {k: v for k, v in kept_spec["spec"].items()}
    c.api.create_cluster_custom_object(
        G,
        V,
        "thinvolumes",
        {"apiVersion": f"{G}/{V}", "kind": "ThinVolume", "metadata": {"name": saved.volume_id}, "spec": spec},
    )
    back = watch.wait_for(
        api,
        res.ThinVolume,
        saved.volume_id,
        lambda o: o is not None and o.settled,
        deadline=deadline_mod.Deadline.after(30),
        what="the restored CR",
    )
    assert back is not None and back.status.phase == res.Phase.READY
    assert back.status.device_id == kept_spec["status"]["deviceId"]  # its own device, not a new one

    # after the grace period: the orphan goes, the saved one is no orphan any more
    time.sleep(2.5)
    done = gc(c, "a", "--node-id", a, "--grace", "2s", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"deleted": [gone.volume_id], "waiting": [], "kept": [], "failed": []}
    assert c.devices("a") == [saved.volume_id]
    assert c.pool("a")["status"]["orphans"] == []
    assert orphan_gauge(c, "a") == 0.0
    # again: nothing to do
    again = gc(c, "a", "--node-id", a, "--grace", "0", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["deleted"] == []

    # refusals: another node's id, --force, a standalone gc beside the running agent
    wrong = gc(c, "a", "--node-id", c.nodes["b"].name)
    assert wrong.returncode == 1 and "FAILED_PRECONDITION" in wrong.stderr
    assert gc(c, "a", "--node-id", a, "--force").returncode == 2
    beside = gc(c, "a")
    assert beside.returncode == 1 and "in use by another csi-thin process" in beside.stderr
    # no agent running: nothing to ask, exit 1
    c.nodes["a"].proc.stop()
    down = gc(c, "a", "--node-id", a)
    assert down.returncode == 1 and "no node agent answers" in down.stderr
    c.nodes["a"].proc.start()
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=saved.volume_id))
    assert c.devices("a") == []
