"""`helm install`, `helm upgrade` and `helm uninstall` of the chart against a real kube-apiserver of its
own (helm refuses to take over objects another test created, so not the session's), with the
VolumeSnapshot API served as a cluster with snapshot-controller has it. What the README promises:
helm checks the server's version against kubeVersion and renders the VolumeSnapshotClass because the
API is there; an upgrade rolls a changed pool config into the node pods; an uninstall deletes the
driver and nothing of the data: the CRDs, the node-isolation policy and every ThinVolume stay."""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
import yaml

from tests import conftest, helmchart, kubecrds, kubeenv

pytestmark = pytest.mark.tools

NS = "csi-thin"
G, V = "csi-thin.io", "v1alpha1"
#: changed-block tracking on (the cluster serves the SnapshotMetadataService API): its TLS Secrets
CBT = ("--set", "snapshotMetadata.enabled=true")
CBT_SECRETS = tuple(f"csi-thin-snapshot-metadata-{x}" for x in ("controller", "node", "server"))


class Helm:
    def __init__(self, env: kubeenv.KubeEnv, work: pathlib.Path) -> None:
        self.kubeconfig = env.write_kubeconfig(work / "kubeconfig")
        # helm's caches and config stay in the test's dir, not the user's home
        self.env = {
            **os.environ,
            **{f"HELM_{k}_HOME": str(work / k.lower()) for k in ("CACHE", "CONFIG", "DATA")},
            # and client-go's discovery cache (else ~/.kube/cache/discovery/127.0.0.1_<port> per run)
            "KUBECACHEDIR": str(work / "kube-cache"),
        }

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(conftest.tool("helm")), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=self.env,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[kubeenv.KubeEnv, Helm]]:
    conftest.tool("kube-apiserver")
    conftest.tool("etcd")
    snapshot = sorted((conftest.BIN / "crds" / "snapshot").glob("*.yaml"))
    assert snapshot, "bin/crds/snapshot is empty: run `tools/build.sh snapshot-crds`"
    cbt = sorted((conftest.BIN / "crds" / "snapshot-metadata").glob("*.yaml"))
    assert cbt, "bin/crds/snapshot-metadata is empty: run `tools/build.sh snapshot-metadata-crds`"
    snapshot += cbt
    with kubeenv.running(conftest.BIN) as env:
        api = env.api_client()
        ext = kubernetes.client.ApiextensionsV1Api(api)
        for path in snapshot:
            crd = yaml.safe_load(path.read_text())
            ext.create_custom_resource_definition(crd)
            kubecrds.established(ext, crd["metadata"]["name"])
        yield env, Helm(env, tmp_path_factory.mktemp("helm"))


def _exists(read: Any, *args: str) -> bool:
    try:
        read(*args)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_install_upgrade_uninstall_keeps_the_data(cluster: tuple[kubeenv.KubeEnv, Helm]) -> None:
    env, helm = cluster
    api = env.api_client()
    apps = kubernetes.client.AppsV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    ext = kubernetes.client.ApiextensionsV1Api(api)
    adm = kubernetes.client.AdmissionregistrationV1Api(api)

    out = helm("install", "csi-thin", str(helmchart.CHART), "--namespace", NS, "--create-namespace", *CBT)
    assert out.returncode == 0, out.stderr
    assert "kubectl get thinpools" in out.stdout  # the NOTES
    core = kubernetes.client.CoreV1Api(api)
    tls = {name: core.read_namespaced_secret(name, NS).data for name in CBT_SECRETS}
    # the SnapshotMetadataService names the sidecar's Service and the CA of its certificate
    sms = custom.get_cluster_custom_object(
        "cbt.storage.k8s.io", "v1alpha1", "snapshotmetadataservices", "csi-thin.io"
    )
    assert sms["spec"]["address"] == f"csi-thin-snapshot-metadata.{NS}:50051"
    assert sms["spec"]["caCert"] == tls["csi-thin-snapshot-metadata-server"]["ca.crt"]
    assert len({t["ca.crt"] for t in tls.values()}) == 1 and len({t["tls.key"] for t in tls.values()}) == 3
    assert "No VolumeSnapshotClass was created" not in out.stdout
    # helm saw the snapshot API on the server and rendered the class
    snap_class = custom.get_cluster_custom_object(
        "snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", "csi-thin"
    )
    assert snap_class["driver"] == "csi-thin.io"
    assert _exists(apps.read_namespaced_daemon_set, "csi-thin-node", NS)
    policy = adm.read_validating_admission_policy("csi-thin-node-isolation")  # crds/ holds it too
    assert policy.spec.failure_policy == "Fail"

    # an upgrade with another pool config rolls the node pods (the config's checksum is in the pod)
    before = apps.read_namespaced_daemon_set("csi-thin-node", NS).spec.template.metadata.annotations
    out = helm(
        "upgrade",
        "csi-thin",
        str(helmchart.CHART),
        "--namespace",
        NS,
        "--set",
        "pool.thresholds.data=0.9",
        *CBT,
    )
    assert out.returncode == 0, out.stderr
    # the certificates are kept: the nodes, the controller and backup tools' CA go on agreeing
    assert {name: core.read_namespaced_secret(name, NS).data for name in CBT_SECRETS} == tls
    after = apps.read_namespaced_daemon_set("csi-thin-node", NS).spec.template.metadata.annotations
    assert after["checksum/pool-config"] != before["checksum/pool-config"]
    pool_yaml = (
        kubernetes.client.CoreV1Api(api).read_namespaced_config_map("csi-thin-pool", NS).data["pool.yaml"]
    )
    assert yaml.safe_load(pool_yaml)["thresholds"]["data"] == 0.9

    # the processes read their certificates at start only: certificates made anew (a Secret was
    # lost) must restart the controller and every node together, or the restarted ones (the new CA)
    # and the others (the old) refuse each other until someone restarts them by hand
    def tls_checksums() -> tuple[str, str]:
        pods = (
            apps.read_namespaced_deployment("csi-thin-controller", NS),
            apps.read_namespaced_daemon_set("csi-thin-node", NS),
        )
        return tuple(p.spec.template.metadata.annotations["checksum/snapshot-metadata-tls"] for p in pods)  # type: ignore[return-value]

    kept = tls_checksums()
    out = helm("upgrade", "csi-thin", str(helmchart.CHART), "--namespace", NS, "--reuse-values", *CBT)
    assert out.returncode == 0, out.stderr
    assert tls_checksums() == kept  # certificates kept: no restart for them
    core.delete_namespaced_secret("csi-thin-snapshot-metadata-node", NS)
    out = helm("upgrade", "csi-thin", str(helmchart.CHART), "--namespace", NS, "--reuse-values", *CBT)
    assert out.returncode == 0, out.stderr
    remade = {name: core.read_namespaced_secret(name, NS).data for name in CBT_SECRETS}
    assert (
        remade["csi-thin-snapshot-metadata-controller"]["ca.crt"]
        != tls["csi-thin-snapshot-metadata-controller"]["ca.crt"]
    )
    assert all(new != old for new, old in zip(tls_checksums(), kept, strict=True)), (tls_checksums(), kept)

    # a volume the driver made, as the controller writes it
    volume = {
        "apiVersion": f"{G}/{V}",
        "kind": "ThinVolume",
        "metadata": {"name": "v-pvc-kept"},
        "spec": {"nodeName": "node-a", "pool": "pool", "sizeBytes": 1 << 30, "accessType": "mount"},
    }
    custom.create_cluster_custom_object(G, V, "thinvolumes", volume)

    out = helm("uninstall", "csi-thin", "--namespace", NS)
    assert out.returncode == 0, out.stderr
    # the driver is gone ...
    assert not _exists(apps.read_namespaced_daemon_set, "csi-thin-node", NS)
    assert not _exists(apps.read_namespaced_deployment, "csi-thin-controller", NS)
    assert not _exists(kubernetes.client.StorageV1Api(api).read_csi_driver, "csi-thin.io")
    # ... and nothing of the data: the CRDs, the policy and the volume's object stay
    for plural in ("thinvolumes", "thinsnapshots", "thinpools"):
        assert _exists(ext.read_custom_resource_definition, f"{plural}.{G}")
    assert _exists(adm.read_validating_admission_policy, "csi-thin-node-isolation")
    kept = custom.get_cluster_custom_object(G, V, "thinvolumes", "v-pvc-kept")
    assert kept["spec"]["sizeBytes"] == 1 << 30

    # installing again finds them in place (helm does not touch existing crds/ objects)
    out = helm("install", "csi-thin", str(helmchart.CHART), "--namespace", NS)
    assert out.returncode == 0, out.stderr
    assert _exists(apps.read_namespaced_daemon_set, "csi-thin-node", NS)
