"""The integration tier's API server is real: it serves discovery, RBAC and CRUD backed by etcd."""

from __future__ import annotations

import json

import lightkube
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Namespace

from tests import kubeenv


def test_readyz_and_version(kube: kubeenv.KubeEnv) -> None:
    status, body = kube.get("/version")
    assert status == 200
    assert json.loads(body)["gitVersion"].startswith("v1.36.")


def test_lightkube_round_trip_through_etcd(kube: kubeenv.KubeEnv) -> None:
    client = lightkube.Client(lightkube.KubeConfig.from_dict(kube.kubeconfig_dict()))
    assert any(ns.metadata and ns.metadata.name == "default" for ns in client.list(Namespace))
    cm = ConfigMap(metadata=ObjectMeta(name="probe", namespace="default"), data={"k": "v"})
    client.create(cm)
    got = client.get(ConfigMap, "probe", namespace="default")
    assert got.data == {"k": "v"}
    client.delete(ConfigMap, "probe", namespace="default")
