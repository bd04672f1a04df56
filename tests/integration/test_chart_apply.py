"""Every object the chart renders, applied to the real kube-apiserver (server-side apply, CRDs first:
the chart's own, and the pinned VolumeSnapshot and Prometheus Operator CRDs from bin/crds/), and its
RBAC checked with SubjectAccessReviews: what the controller's service account (the driver and its
three sidecars) and the node's can do, and what they cannot."""

from __future__ import annotations

import json
import pathlib
import ssl
import urllib.error
import urllib.request
from typing import Any

import kubernetes
import pytest
import yaml

from tests import conftest, kubecrds, kubeenv
from tests import helmchart as chart

pytestmark = pytest.mark.tools

#: the namespace test_node_isolation installs the same RBAC into: the cluster-scoped bindings name it
NS = chart.NS
CONTROLLER = f"system:serviceaccount:{NS}:csi-thin-controller"
NODE = f"system:serviceaccount:{NS}:csi-thin-node"
CRD_DIRS = ("snapshot", "monitoring", "snapshot-metadata")

#: kind -> (plural, namespaced) of the built-in kinds the chart renders; the CRDs add their own
BUILTIN: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "ServiceAccount": ("serviceaccounts", True),
    "ConfigMap": ("configmaps", True),
    "Secret": ("secrets", True),
    "Service": ("services", True),
    "Deployment": ("deployments", True),
    "DaemonSet": ("daemonsets", True),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "CSIDriver": ("csidrivers", False),
    "StorageClass": ("storageclasses", False),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "ValidatingAdmissionPolicy": ("validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": ("validatingadmissionpolicybindings", False),
}


class Applier:
    """Server-side apply over the API server's REST interface, one field manager for the test."""

    def __init__(self, env: kubeenv.KubeEnv) -> None:
        self.env = env
        self.kinds = dict(BUILTIN)
        self.ssl = ssl.create_default_context(cafile=env.ca_file)

    def learn(self, crd: dict[str, Any]) -> None:
        names = crd["spec"]["names"]
        self.kinds[names["kind"]] = (names["plural"], crd["spec"]["scope"] == "Namespaced")

    def path(self, obj: dict[str, Any]) -> str:
        kind = obj["kind"]
        assert kind in self.kinds, f"the chart renders a {kind}: add it to BUILTIN"
        plural, namespaced = self.kinds[kind]
        api = obj["apiVersion"]
        base = "/api/v1" if api == "v1" else f"/apis/{api}"
        ns = f"/namespaces/{obj['metadata'].get('namespace') or NS}" if namespaced else ""
        return f"{base}{ns}/{plural}/{obj['metadata']['name']}"

    def apply(self, obj: dict[str, Any], *, force: bool = False) -> tuple[int, dict[str, Any]]:
        query = "fieldManager=csi-thin-chart-test" + ("&force=true" if force else "")
        req = urllib.request.Request(
            f"{self.env.server}{self.path(obj)}?{query}",
            data=json.dumps(obj).encode(),
            method="PATCH",
            headers={
                "Authorization": f"Bearer {self.env.token}",
                "Content-Type": "application/apply-patch+yaml",
            },
        )
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=30) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read() or b"{}")

    def apply_ok(self, obj: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        status, body = self.apply(obj, force=force)
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        assert status in (200, 201), f"{what} refused ({status}): {body.get('message', body)}"
        return body


def _crds_from(directory: pathlib.Path) -> list[dict[str, Any]]:
    files = sorted(directory.glob("*.yaml"))
    assert files, f"{directory} is empty: run `tools/build.sh snapshot-crds monitoring-crds`"
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


@pytest.fixture(scope="module")
def applied(crds: kubeenv.KubeEnv, tmp_path_factory: pytest.TempPathFactory) -> Applier:
    """The fullest rendering (snapshot and monitoring APIs served, every option on) applied, CRDs
    first; then the other renderings of the matrix over it (the same objects, other settings)."""
    for name in CRD_DIRS:
        conftest.tool(f"crds/{name}")
    tmp = tmp_path_factory.mktemp("chart-apply")
    values, apis = chart.MATRIX["monitoring-on-api-present"]
    values, apis = {**values, **chart.CBT_ON}, (*apis, chart.CBT_API)
    docs = chart.render(tmp, values, apis, "--include-crds")
    applier = Applier(crds)
    ext = kubernetes.client.ApiextensionsV1Api(crds.api_client())
    first = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    first += [d for name in CRD_DIRS for d in _crds_from(conftest.BIN / "crds" / name)]
    # The session's `crds` fixture created the chart's crds/ objects with another field manager, and
    # the server filled in their defaults: an apply of the same file conflicts on atomic fields (the
    # policy's matchConstraints) and takes them over, as `kubectl apply --server-side
    # --force-conflicts` would. Nothing else is forced.
    for crd in first:
        applier.apply_ok(crd, force=True)
        applier.learn(crd)
    for crd in first:
        kubecrds.established(ext, crd["metadata"]["name"])
    applier.apply_ok({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    chart_crds_dir = [d for d in docs if d["kind"].startswith("ValidatingAdmissionPolicy")]
    for doc in chart_crds_dir:
        applier.apply_ok(doc, force=True)
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition" and d not in chart_crds_dir]
    assert {d["kind"] for d in rest} >= {
        "VolumeSnapshotClass",
        "ServiceMonitor",
        "PrometheusRule",
        "SnapshotMetadataService",
    }
    for doc in rest:
        applier.apply_ok(doc)
    for case in ("defaults", "dmthin-devices", "reflink-directory", "e2e-cluster"):
        values, apis = chart.MATRIX[case]
        # a StorageClass's parameters are immutable (an fsType change is a new class): each its own
        values = {**values, "storageClass": {**values.get("storageClass", {}), "name": f"csi-thin-{case}"}}
        for doc in chart.render(tmp, values, apis):
            applier.apply_ok(doc)
    return applier


def test_every_rendered_object_is_accepted(applied: Applier) -> None:
    """Read back from the server: what was applied last (the e2e cluster's settings) is what is stored."""
    apps = kubernetes.client.AppsV1Api(applied.env.api_client())
    ds = apps.read_namespaced_daemon_set("csi-thin-node", NS)
    assert ds.spec.template.spec.host_network is True
    (c,) = ds.spec.template.spec.containers
    assert c.volume_mounts[0].mount_propagation == "Bidirectional"
    dep = apps.read_namespaced_deployment("csi-thin-controller", NS)
    assert [c.name for c in dep.spec.template.spec.containers] == [
        "csi-thin",
        "csi-provisioner",
        "csi-snapshotter",
        "csi-resizer",
    ]
    custom = kubernetes.client.CustomObjectsApi(applied.env.api_client())
    rule = custom.get_namespaced_custom_object(
        "monitoring.coreos.com", "v1", NS, "prometheusrules", "csi-thin"
    )
    assert rule["spec"]["groups"], "the PrometheusRule kept its rule groups"


def test_the_server_does_refuse_a_bad_object(applied: Applier) -> None:
    """The apply path can fail: the snapshot CRD's schema refuses an unknown deletionPolicy."""
    status, body = applied.apply(
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotClass",
            "metadata": {"name": "csi-thin-bad"},
            "driver": "csi-thin.io",
            "deletionPolicy": "Sometimes",
        }
    )
    assert status == 422, body
    assert "deletionPolicy" in body["message"]


# (user, verb, group, resource, subresource, namespace, allowed)
ACCESS: list[tuple[str, str, str, str, str, str, bool]] = [
    # the driver's controller: ThinVolume/ThinSnapshot specs, ThinPools read-only, no status
    (CONTROLLER, "create", "csi-thin.io", "thinvolumes", "", "", True),
    (CONTROLLER, "delete", "csi-thin.io", "thinsnapshots", "", "", True),
    (CONTROLLER, "create", "csi-thin.io", "thingroupsnapshots", "", "", True),
    (CONTROLLER, "delete", "csi-thin.io", "thingroupsnapshots", "", "", True),
    (CONTROLLER, "patch", "csi-thin.io", "thingroupsnapshots", "status", "", False),
    (CONTROLLER, "watch", "csi-thin.io", "thinpools", "", "", True),
    (CONTROLLER, "patch", "csi-thin.io", "thinvolumes", "status", "", False),
    (CONTROLLER, "update", "csi-thin.io", "thinpools", "", "", False),
    # the provisioner
    (CONTROLLER, "create", "", "persistentvolumes", "", "", True),
    (CONTROLLER, "delete", "", "persistentvolumes", "", "", True),
    (CONTROLLER, "update", "", "persistentvolumeclaims", "", NS, True),
    (CONTROLLER, "watch", "storage.k8s.io", "storageclasses", "", "", True),
    (CONTROLLER, "list", "storage.k8s.io", "csinodes", "", "", True),
    (CONTROLLER, "get", "", "nodes", "", "", True),
    (CONTROLLER, "create", "", "events", "", "default", True),
    (CONTROLLER, "get", "snapshot.storage.k8s.io", "volumesnapshots", "", "default", True),
    (CONTROLLER, "create", "storage.k8s.io", "csistoragecapacities", "", NS, True),
    (CONTROLLER, "get", "apps", "replicasets", "", NS, True),
    (CONTROLLER, "update", "coordination.k8s.io", "leases", "", NS, True),
    # the snapshotter
    (CONTROLLER, "get", "snapshot.storage.k8s.io", "volumesnapshotclasses", "", "", True),
    (CONTROLLER, "patch", "snapshot.storage.k8s.io", "volumesnapshotcontents", "", "", True),
    (CONTROLLER, "update", "snapshot.storage.k8s.io", "volumesnapshotcontents", "status", "", True),
    # ... and its group snapshots (upstream's RBAC for v8.7.0)
    (CONTROLLER, "watch", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "", "", True),
    (CONTROLLER, "patch", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "", "", True),
    (CONTROLLER, "update", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "status", "", True),
    (CONTROLLER, "create", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "", "", False),
    # the resizer
    (CONTROLLER, "patch", "", "persistentvolumes", "", "", True),
    (CONTROLLER, "patch", "", "persistentvolumeclaims", "status", "default", True),
    (CONTROLLER, "list", "", "pods", "", "default", True),
    # the snapshot-metadata sidecar, as upstream's role: its SnapshotMetadataService, each backup
    # tool's token and access checked, VolumeSnapshots resolved to their contents
    # (its SnapshotMetadataService: get by name only, test_snapshot_metadata_service_access)
    (CONTROLLER, "list", "cbt.storage.k8s.io", "snapshotmetadataservices", "", "", False),
    (CONTROLLER, "create", "cbt.storage.k8s.io", "snapshotmetadataservices", "", "", False),
    (CONTROLLER, "create", "authentication.k8s.io", "tokenreviews", "", "", True),
    (CONTROLLER, "create", "authorization.k8s.io", "subjectaccessreviews", "", "", True),
    (CONTROLLER, "list", "snapshot.storage.k8s.io", "volumesnapshots", "", "default", True),
    (CONTROLLER, "get", "snapshot.storage.k8s.io", "volumesnapshotcontents", "", "", True),
    # and nothing more: no secrets, no pods made, no users' objects deleted, leases and
    # capacities only in its own namespace, nodes read-only
    (CONTROLLER, "get", "", "secrets", "", NS, False),
    (CONTROLLER, "create", "", "pods", "", NS, False),
    (CONTROLLER, "delete", "", "persistentvolumeclaims", "", "default", False),
    (CONTROLLER, "create", "snapshot.storage.k8s.io", "volumesnapshots", "", "default", False),
    (CONTROLLER, "update", "coordination.k8s.io", "leases", "", "kube-system", False),
    (CONTROLLER, "create", "storage.k8s.io", "csistoragecapacities", "", "default", False),
    (CONTROLLER, "update", "", "nodes", "", "", False),
    (CONTROLLER, "get", "apps", "replicasets", "", "default", False),
    # the node plugin: its CRs' status and finalizers, its ThinPool, Events; nothing of the sidecars'
    (NODE, "patch", "csi-thin.io", "thinvolumes", "status", "", True),
    (NODE, "patch", "csi-thin.io", "thinsnapshots", "", "", True),
    (NODE, "patch", "csi-thin.io", "thingroupsnapshots", "status", "", True),
    (NODE, "watch", "csi-thin.io", "thingroupsnapshots", "", "", True),
    (NODE, "create", "csi-thin.io", "thingroupsnapshots", "", "", False),
    (NODE, "create", "csi-thin.io", "thinsnapshots", "", "", False),
    (NODE, "create", "csi-thin.io", "thinpools", "", "", True),
    (NODE, "patch", "csi-thin.io", "thinpools", "status", "", True),
    (NODE, "create", "events.k8s.io", "events", "", "default", True),
    # its Events go to `default` (csi_thin.kube.client.Client.event), nowhere else
    (NODE, "create", "events.k8s.io", "events", "", "kube-system", False),
    (NODE, "patch", "events.k8s.io", "events", "", NS, False),
    (NODE, "create", "csi-thin.io", "thinvolumes", "", "", False),
    (NODE, "delete", "csi-thin.io", "thinvolumes", "", "", False),
    (NODE, "create", "", "persistentvolumes", "", "", False),
    (NODE, "list", "", "persistentvolumeclaims", "", "default", False),
    (NODE, "get", "", "secrets", "", NS, False),
    (NODE, "update", "coordination.k8s.io", "leases", "", NS, False),
    (NODE, "get", "", "nodes", "", "", False),
    # the node serves snapshot metadata to the controller; it authenticates no one through the API
    (NODE, "get", "cbt.storage.k8s.io", "snapshotmetadataservices", "", "", False),
    (NODE, "create", "authentication.k8s.io", "tokenreviews", "", "", False),
    (NODE, "get", "snapshot.storage.k8s.io", "volumesnapshotcontents", "", "", False),
]


def _access_id(access: tuple[str, str, str, str, str, str, bool]) -> str:
    user, verb, _, resource, sub, namespace, _ = access
    where = f"@{namespace}" if namespace else ""
    return f"{user.rsplit(':', 1)[1]}-{verb}-{resource}{'/' + sub if sub else ''}{where}"


@pytest.mark.parametrize("access", ACCESS, ids=_access_id)
def test_service_account_access(applied: Applier, access: tuple[str, str, str, str, str, str, bool]) -> None:
    user, verb, group, resource, sub, namespace, allowed = access
    authz = kubernetes.client.AuthorizationV1Api(applied.env.api_client())
    attrs = {"verb": verb, "group": group, "resource": resource, "subresource": sub, "namespace": namespace}
    review = authz.create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NS}", "system:authenticated"],
                "resourceAttributes": attrs,
            },
        }
    )
    assert review.status.allowed is allowed, f"{user} {attrs}: {review.status.reason or 'no rule'}"


@pytest.mark.parametrize(
    ("verb", "name", "allowed"),
    [
        ("get", "csi-thin.io", True),
        ("get", "other-driver.example.com", False),
        ("update", "csi-thin.io", False),
        ("patch", "other-driver.example.com", False),
        ("delete", "other-driver.example.com", False),
    ],
)
def test_snapshot_metadata_service_access(applied: Applier, verb: str, name: str, allowed: bool) -> None:
    """The sidecar reads its own SnapshotMetadataService and nothing else. Upstream's sample role also
    lets it create, change and delete every driver's: a controller pod taken over could then point
    another driver's backup tools (address, caCert, token audience) at itself and collect their
    tokens (found: the chart granted all of that)."""
    authz = kubernetes.client.AuthorizationV1Api(applied.env.api_client())
    attrs = {
        "verb": verb,
        "group": "cbt.storage.k8s.io",
        "resource": "snapshotmetadataservices",
        "name": name,
    }
    review = authz.create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": CONTROLLER,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NS}", "system:authenticated"],
                "resourceAttributes": attrs,
            },
        }
    )
    assert review.status.allowed is allowed, f"{attrs}: {review.status.reason or 'no rule'}"
