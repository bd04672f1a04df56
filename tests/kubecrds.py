"""Install what the chart ships for Kubernetes mode (CRDs, the node-isolation policy, RBAC) into a
test API server, the way `helm install` would: the crds/ files as they are, the RBAC as helm renders it."""

from __future__ import annotations

import pathlib
from typing import Any

import kubernetes
import yaml

from tests import helmchart, kubeenv

CHART = pathlib.Path(__file__).resolve().parent.parent / "charts" / "csi-thin"
CRDS = ("thinvolumes.yaml", "thinsnapshots.yaml", "thingroupsnapshots.yaml", "thinpools.yaml")


def _docs(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def established(ext: Any, name: str) -> None:
    w = kubernetes.watch.Watch()
    for event in w.stream(
        ext.list_custom_resource_definition, field_selector=f"metadata.name={name}", timeout_seconds=60
    ):
        conds = (event["raw_object"].get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conds):
            w.stop()
            return
    raise AssertionError(f"CRD {name} not established within 60s")


def install(env: kubeenv.KubeEnv) -> None:
    """CRDs and the admission policy; idempotent (a session installs them once)."""
    api = env.api_client()
    ext = kubernetes.client.ApiextensionsV1Api(api)
    adm = kubernetes.client.AdmissionregistrationV1Api(api)
    for name in CRDS:
        (crd,) = _docs(CHART / "crds" / name)
        try:
            ext.create_custom_resource_definition(crd)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 409:
                raise
        established(ext, crd["metadata"]["name"])
    policy, binding = _docs(CHART / "crds" / "node-isolation.yaml")
    for create, body in (
        (adm.create_validating_admission_policy, policy),
        (adm.create_validating_admission_policy_binding, binding),
    ):
        try:
            create(body)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 409:
                raise


def install_rbac(env: kubeenv.KubeEnv, workdir: pathlib.Path, namespace: str = "csi-thin") -> None:
    """The chart's RBAC for its own processes (templates/rbac.yaml), rendered by the pinned helm."""
    api = env.api_client()
    core = kubernetes.client.CoreV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": namespace}})
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise
    for doc in helmchart.render(
        workdir, {}, (), "--namespace", namespace, "--show-only", "templates/rbac.yaml"
    ):
        try:
            kubernetes.utils.create_from_dict(api, doc)
        except kubernetes.utils.FailToCreateError as exc:
            if any(e.status != 409 for e in exc.api_exceptions):
                raise
