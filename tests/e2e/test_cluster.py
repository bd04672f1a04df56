"""The cluster itself, before any driver: a pod runs on the node, with logs and exec, on host
networking only."""

from __future__ import annotations

import pathlib

from tests.e2e import cluster as cluster_mod

POD = """
apiVersion: v1
kind: Pod
metadata: {name: hello, namespace: default}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: %s
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo hello from the pod; exec sleep 3600"]
"""


def test_a_pod_runs_with_logs_and_exec(cluster: cluster_mod.Cluster) -> None:
    node = cluster.get("node", cluster_mod.NODE)
    assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]
    cluster.apply(POD % cluster_mod.BUSYBOX_IMAGE)
    try:
        cluster.kubectl("wait", "--for=condition=Ready", "pod/hello", "--timeout=120s")
        assert "hello from the pod" in cluster.kubectl("logs", "hello")
        # the container's PID 1 is what its command exec'd
        assert cluster.kubectl("exec", "hello", "--", "cat", "/proc/1/cmdline").split("\0")[:2] == [
            "sleep",
            "3600",
        ]
    finally:
        cluster.kubectl("delete", "pod", "hello", "--wait=true", "--timeout=60s")


def test_clients_leave_no_cache_in_home(cluster: cluster_mod.Cluster) -> None:
    """kubectl and helm keep their discovery cache under the state dir: nothing per run in $HOME."""
    cluster.get("node", cluster_mod.NODE)
    cluster.helm("list", "--all-namespaces")
    home_cache = pathlib.Path.home() / ".kube" / "cache" / "discovery" / f"127.0.0.1_{cluster.api_port}"
    assert not home_cache.exists(), f"{home_cache} left in $HOME"
