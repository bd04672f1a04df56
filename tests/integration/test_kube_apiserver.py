"""The integration tier's API server is real: it serves discovery, RBAC and CRUD backed by etcd."""

from __future__ import annotations

import json

import kubernetes

from tests import kubeenv


def test_readyz_and_version(kube: kubeenv.KubeEnv) -> None:
    status, body = kube.get("/version")
    assert status == 200
    assert json.loads(body)["gitVersion"].startswith("v1.36.")


def test_kubernetes_client_round_trip_through_etcd(kube: kubeenv.KubeEnv) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client())
    assert any(ns.metadata.name == "default" for ns in core.list_namespace().items)
    cm = kubernetes.client.V1ConfigMap(metadata=kubernetes.client.V1ObjectMeta(name="probe"), data={"k": "v"})
    core.create_namespaced_config_map("default", cm)
    assert core.read_namespaced_config_map("probe", "default").data == {"k": "v"}
    core.delete_namespaced_config_map("probe", "default")
