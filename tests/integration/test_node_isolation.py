"""Security as the chart ships it, against the real API server with impersonation: the RBAC roles
(least privilege per service account) and the node-isolation ValidatingAdmissionPolicy (a caller
whose token is bound to node-a cannot change node-b's objects, nor any spec)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from tests import kubecrds, kubeenv

G, V = "csi-thin.io", "v1alpha1"
NS = "csi-thin"
NODE_SA = f"system:serviceaccount:{NS}:csi-thin-node"
CONTROLLER_SA = f"system:serviceaccount:{NS}:csi-thin-controller"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"


@pytest.fixture(scope="module")
def env(crds: kubeenv.KubeEnv, tmp_path_factory: pytest.TempPathFactory) -> kubeenv.KubeEnv:
    kubecrds.install_rbac(crds, tmp_path_factory.mktemp("rbac"), NS)
    return crds


def _as(env: kubeenv.KubeEnv, user: str = "", node: str = "") -> Any:
    extra = {NODE_NAME_KEY: node} if node else None
    return kubernetes.client.CustomObjectsApi(env.api_client(impersonate=user, extra=extra))


def _volume(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "ThinVolume",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "pool": "p", "sizeBytes": 1 << 26, "accessType": "mount"},
    }


def _denied(fn: Any, *args: Any) -> str:
    with pytest.raises(kubernetes.client.exceptions.ApiException) as info:
        fn(*args)
    assert info.value.status == 403, info.value.body
    return str(info.value.body)


def test_a_node_cannot_modify_another_nodes_volume(env: kubeenv.KubeEnv) -> None:
    admin = _as(env)
    tag = uuid.uuid4().hex[:8]
    a, b = f"iso-a-{tag}", f"iso-b-{tag}"
    va, vb = f"v-iso-{tag}-a", f"v-iso-{tag}-b"
    admin.create_cluster_custom_object(G, V, "thinvolumes", _volume(va, a))
    admin.create_cluster_custom_object(G, V, "thinvolumes", _volume(vb, b))
    node_a = _as(env, NODE_SA, node=a)

    # its own: status and finalizers, yes
    got = node_a.patch_cluster_custom_object_status(G, V, "thinvolumes", va, {"status": {"phase": "Ready"}})
    assert got["status"]["phase"] == "Ready"
    node_a.patch_cluster_custom_object(G, V, "thinvolumes", va, {"metadata": {"finalizers": ["x.io/f"]}})
    # another node's: refused by the policy, naming both nodes
    body = _denied(
        node_a.patch_cluster_custom_object_status, G, V, "thinvolumes", vb, {"status": {"phase": "Lost"}}
    )
    assert "csi-thin-node-isolation" in body and a in body and b in body
    _denied(node_a.patch_cluster_custom_object, G, V, "thinvolumes", vb, {"metadata": {"finalizers": ["x"]}})
    assert "status" not in admin.get_cluster_custom_object(G, V, "thinvolumes", vb)
    # not even its own spec
    body = _denied(
        node_a.patch_cluster_custom_object, G, V, "thinvolumes", va, {"spec": {"sizeBytes": 1 << 27}}
    )
    assert "never their spec" in body
    # and RBAC: a node neither creates nor deletes volumes
    _denied(node_a.create_cluster_custom_object, G, V, "thinvolumes", _volume(f"v-iso-{tag}-c", a))
    _denied(node_a.delete_cluster_custom_object, G, V, "thinvolumes", va)

    # a ThinPool: its own yes, another node's no
    pool = {"apiVersion": f"{G}/{V}", "kind": "ThinPool", "metadata": {"name": f"{a}.p"}}
    node_a.create_cluster_custom_object(G, V, "thinpools", {**pool, "spec": {"nodeName": a, "pool": "p"}})
    other = {**pool, "metadata": {"name": f"{b}.p"}, "spec": {"nodeName": b, "pool": "p"}}
    _denied(node_a.create_cluster_custom_object, G, V, "thinpools", other)

    admin.patch_cluster_custom_object(G, V, "thinvolumes", va, {"metadata": {"finalizers": None}})
    for name in (va, vb):
        admin.delete_cluster_custom_object(G, V, "thinvolumes", name)
    admin.delete_cluster_custom_object(G, V, "thinpools", f"{a}.p")


def test_controller_writes_specs_but_no_status(env: kubeenv.KubeEnv) -> None:
    admin = _as(env)
    tag = uuid.uuid4().hex[:8]
    name, node = f"v-ctl-{tag}", f"ctl-{tag}"
    # in a pod, the controller's token is node-bound too (to the node it runs on, not the volume's)
    controller = _as(env, CONTROLLER_SA, node=f"elsewhere-{tag}")
    controller.create_cluster_custom_object(G, V, "thinvolumes", _volume(name, node))
    controller.patch_cluster_custom_object(G, V, "thinvolumes", name, {"spec": {"sizeBytes": 1 << 27}})
    _denied(
        controller.patch_cluster_custom_object_status,
        G,
        V,
        "thinvolumes",
        name,
        {"status": {"phase": "Ready"}},
    )
    pool = {"apiVersion": f"{G}/{V}", "kind": "ThinPool", "metadata": {"name": f"{node}.p"}}
    admin.create_cluster_custom_object(G, V, "thinpools", {**pool, "spec": {"nodeName": node, "pool": "p"}})
    assert controller.list_cluster_custom_object(G, V, "thinpools", field_selector=f"spec.nodeName={node}")[
        "items"
    ]
    _denied(
        controller.patch_cluster_custom_object_status,
        G,
        V,
        "thinpools",
        f"{node}.p",
        {"status": {"mode": "rw"}},
    )
    _denied(controller.create_cluster_custom_object, G, V, "thinpools", {**pool, "metadata": {"name": "x.p"}})
    controller.delete_cluster_custom_object(G, V, "thinvolumes", name)
    admin.delete_cluster_custom_object(G, V, "thinpools", f"{node}.p")


def test_a_node_account_without_a_node_bound_token_is_refused(env: kubeenv.KubeEnv) -> None:
    """The node's service account with a token that names no node (a legacy Secret token, a token not
    bound to a pod, a cluster without the node-name claim) must not escape the policy: refused, not
    let through to every node's objects."""
    admin = _as(env)
    tag = uuid.uuid4().hex[:8]
    name = f"v-iso-{tag}-nn"
    admin.create_cluster_custom_object(G, V, "thinvolumes", _volume(name, f"iso-b-{tag}"))
    unbound = _as(env, NODE_SA)
    body = _denied(
        unbound.patch_cluster_custom_object_status, G, V, "thinvolumes", name, {"status": {"phase": "Lost"}}
    )
    assert "csi-thin-node-isolation" in body and "names no node" in body
    _denied(
        unbound.patch_cluster_custom_object, G, V, "thinvolumes", name, {"metadata": {"finalizers": ["x"]}}
    )
    assert "status" not in admin.get_cluster_custom_object(G, V, "thinvolumes", name)
    admin.delete_cluster_custom_object(G, V, "thinvolumes", name)


def test_a_node_cannot_take_another_nodes_pool_name(env: kubeenv.KubeEnv) -> None:
    """A ThinPool's name is <node>.<pool>: a node creating the name of another node's pool (with
    itself as nodeName) would keep that node's agent from ever writing its pool status."""
    tag = uuid.uuid4().hex[:8]
    a, b = f"iso-a-{tag}", f"iso-b-{tag}"
    node_a = _as(env, NODE_SA, node=a)
    squat = {
        "apiVersion": f"{G}/{V}",
        "kind": "ThinPool",
        "metadata": {"name": f"{b}.p"},
        "spec": {"nodeName": a, "pool": "p"},
    }
    try:
        assert "name is" in _denied(node_a.create_cluster_custom_object, G, V, "thinpools", squat)
    finally:
        with contextlib.suppress(kubernetes.client.exceptions.ApiException):
            _as(env).delete_cluster_custom_object(G, V, "thinpools", f"{b}.p")


@contextlib.contextmanager
def _pod_token(env: kubeenv.KubeEnv, account: str, node: str) -> Iterator[Any]:
    """A client holding the token kubelet gives a pod of `account` running on `node`: a real
    TokenRequest bound to a real Pod object (no impersonation). The API server puts the pod's node
    into every such token (ServiceAccountTokenPodNodeInfo), whichever service account it is."""
    admin = env.api_client()
    core = kubernetes.client.CoreV1Api(admin)
    pod = core.create_namespaced_pod(
        NS,
        {
            "metadata": {"generateName": f"{account}-"},
            "spec": {
                "serviceAccountName": account,
                "nodeName": node,
                "containers": [{"name": "c", "image": "none"}],
            },
        },
    )
    try:
        ref = {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid}
        token = core.create_namespaced_service_account_token(
            account, NS, {"spec": {"audiences": [], "expirationSeconds": 600, "boundObjectRef": ref}}
        ).status.token
        review = kubernetes.client.AuthenticationV1Api(admin).create_token_review({"spec": {"token": token}})
        assert review.status.user.extra[NODE_NAME_KEY] == [node], review.status.user
        cfg = kubernetes.client.Configuration()
        cfg.host, cfg.ssl_ca_cert = env.server, env.ca_file
        cfg.api_key = {"authorization": f"Bearer {token}"}
        yield kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(cfg))
    finally:
        core.delete_namespaced_pod(pod.metadata.name, NS, grace_period_seconds=0)


def test_the_controller_pod_token_names_its_node_and_still_writes_every_nodes_specs(
    env: kubeenv.KubeEnv,
) -> None:
    """The controller runs in a pod too, and its token names the node it runs on. It must still
    create, resize and delete the volumes of every other node: the policy confines the node plugin's
    account, not every pod-bound identity."""
    tag = uuid.uuid4().hex[:8]
    name, other = f"v-ctl-pod-{tag}", f"ctl-other-{tag}"
    with _pod_token(env, "csi-thin-controller", f"ctl-home-{tag}") as controller:
        controller.create_cluster_custom_object(G, V, "thinvolumes", _volume(name, other))
        controller.patch_cluster_custom_object(G, V, "thinvolumes", name, {"spec": {"sizeBytes": 1 << 27}})
        assert _as(env).get_cluster_custom_object(G, V, "thinvolumes", name)["spec"]["sizeBytes"] == 1 << 27
        controller.delete_cluster_custom_object(G, V, "thinvolumes", name)


def test_the_node_pod_token_is_confined_to_its_node(env: kubeenv.KubeEnv) -> None:
    """The same with the node plugin's real pod-bound token: its own volume's status, yes; another
    node's, no; a spec, no."""
    admin = _as(env)
    tag = uuid.uuid4().hex[:8]
    a, b = f"iso-pa-{tag}", f"iso-pb-{tag}"
    va, vb = f"v-iso-{tag}-pa", f"v-iso-{tag}-pb"
    admin.create_cluster_custom_object(G, V, "thinvolumes", _volume(va, a))
    admin.create_cluster_custom_object(G, V, "thinvolumes", _volume(vb, b))
    with _pod_token(env, "csi-thin-node", a) as node_a:
        node_a.patch_cluster_custom_object_status(G, V, "thinvolumes", va, {"status": {"phase": "Ready"}})
        _denied(
            node_a.patch_cluster_custom_object_status, G, V, "thinvolumes", vb, {"status": {"phase": "Ready"}}
        )
        _denied(node_a.patch_cluster_custom_object, G, V, "thinvolumes", va, {"spec": {"sizeBytes": 1 << 27}})
    for n in (va, vb):
        admin.delete_cluster_custom_object(G, V, "thinvolumes", n)
