"""The CRDs as the chart ships them, applied to the real kube-apiserver: their structural schemas and
CEL rules refuse bad objects (a bad name, a missing field, a changed nodeName or source, a shrink),
the status subresource keeps spec writers off the status, and the field selector on spec.nodeName
(selectableFields) lists one node's objects only."""

from __future__ import annotations

import uuid
from typing import Any

import kubernetes
import pytest

from tests import kubeenv

G, V = "csi-thin.io", "v1alpha1"


def _api(env: kubeenv.KubeEnv) -> Any:
    return kubernetes.client.CustomObjectsApi(env.api_client())


def _volume(name: str, node: str, size: int = 1 << 26, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "ThinVolume",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "pool": "p", "sizeBytes": size, "accessType": "mount", **spec},
    }


def _refused(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(kubernetes.client.exceptions.ApiException) as info:
        fn(*args, **kwargs)
    assert info.value.status == 422, info.value.body
    return str(info.value.body)


def _name(prefix: str = "v") -> str:
    return f"{prefix}-pvc-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (_volume("v-bad-size", "n", size=0), "sizeBytes"),
        (_volume("Not-A-Volume-Id", "n"), "metadata.name"),
        (_volume("v-no-such-access", "n", accessType="tape"), "accessType"),
        (_volume("v-two-sources", "n", source={"snapshot": "s-a", "volume": "v-b"}), "source"),
        (_volume("v-block-fs", "n", accessType="block", fsType="ext4"), "block volume has no fsType"),
        ({"apiVersion": f"{G}/{V}", "kind": "ThinVolume", "metadata": {"name": "v-nospec"}}, "spec"),
    ],
)
def test_bad_objects_are_refused(crds: kubeenv.KubeEnv, body: dict[str, Any], says: str) -> None:
    assert says in _refused(_api(crds).create_cluster_custom_object, G, V, "thinvolumes", body)


def test_size_only_grows_and_node_and_source_are_immutable(crds: kubeenv.KubeEnv) -> None:
    api = _api(crds)
    name = _name()
    api.create_cluster_custom_object(G, V, "thinvolumes", _volume(name, "node-a", source={"snapshot": "s-x"}))
    patch = api.patch_cluster_custom_object
    assert "sizeBytes may only grow" in _refused(
        patch, G, V, "thinvolumes", name, {"spec": {"sizeBytes": 1 << 25}}
    )
    assert "nodeName is immutable" in _refused(patch, G, V, "thinvolumes", name, {"spec": {"nodeName": "b"}})
    assert "source is immutable" in _refused(
        patch, G, V, "thinvolumes", name, {"spec": {"source": {"snapshot": "s-y"}}}
    )
    grown = patch(G, V, "thinvolumes", name, {"spec": {"sizeBytes": 1 << 27}})
    assert grown["spec"]["sizeBytes"] == 1 << 27
    assert grown["metadata"]["generation"] == 2
    api.delete_cluster_custom_object(G, V, "thinvolumes", name)


def test_status_is_a_subresource(crds: kubeenv.KubeEnv) -> None:
    api = _api(crds)
    name = _name()
    api.create_cluster_custom_object(G, V, "thinvolumes", _volume(name, "node-a"))
    # a spec writer cannot set status through the main resource ...
    got = api.patch_cluster_custom_object(G, V, "thinvolumes", name, {"status": {"phase": "Ready"}})
    assert "status" not in got
    # ... the status subresource can, and it leaves the generation alone
    got = api.patch_cluster_custom_object_status(
        G, V, "thinvolumes", name, {"status": {"phase": "Ready", "deviceId": 7}}
    )
    assert got["status"]["phase"] == "Ready"
    assert got["metadata"]["generation"] == 1
    assert "phase" in _refused(
        api.patch_cluster_custom_object_status, G, V, "thinvolumes", name, {"status": {"phase": "Fine"}}
    )
    api.delete_cluster_custom_object(G, V, "thinvolumes", name)


def test_field_selector_on_node_name(crds: kubeenv.KubeEnv) -> None:
    api = _api(crds)
    tag = uuid.uuid4().hex[:8]
    names = {f"v-sel-{tag}-{i}": f"sel-{tag}-{'a' if i % 2 else 'b'}" for i in range(6)}
    for name, node in names.items():
        api.create_cluster_custom_object(G, V, "thinvolumes", _volume(name, node))
    listed = api.list_cluster_custom_object(G, V, "thinvolumes", field_selector=f"spec.nodeName=sel-{tag}-a")
    got = sorted(item["metadata"]["name"] for item in listed["items"])
    assert got == sorted(n for n, node in names.items() if node.endswith("-a"))
    with pytest.raises(kubernetes.client.exceptions.ApiException) as info:
        api.list_cluster_custom_object(G, V, "thinvolumes", field_selector="spec.pool=p")
    assert info.value.status == 400  # only the declared selectable field selects
    for name in names:
        api.delete_cluster_custom_object(G, V, "thinvolumes", name)


def test_printer_columns_and_short_names(crds: kubeenv.KubeEnv) -> None:
    ext = kubernetes.client.ApiextensionsV1Api(crds.api_client())
    for plural, short, columns in (
        ("thinvolumes", "tv", {"Node", "Size", "Phase", "Code", "Age"}),
        ("thinsnapshots", "ts", {"Node", "Source", "Ready", "Size"}),
        ("thingroupsnapshots", "tgs", {"Node", "Ready", "Code", "Age"}),
        ("thinpools", "tp", {"Node", "Pool", "Health", "Data Used", "Data Total"}),
    ):
        crd = ext.read_custom_resource_definition(f"{plural}.{G}")
        assert crd.spec.names.short_names == [short]
        version = crd.spec.versions[0]
        assert columns <= {c.name for c in version.additional_printer_columns}
        assert [f.json_path for f in version.selectable_fields] == [".spec.nodeName"]
        assert version.subresources.status is not None
