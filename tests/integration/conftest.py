from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import conftest, kubecrds, kubeenv


@pytest.fixture(scope="session")
def kube() -> Iterator[kubeenv.KubeEnv]:
    """A real kube-apiserver + etcd for the whole session (fails when the tools are not built)."""
    conftest.tool("kube-apiserver")
    conftest.tool("etcd")
    with kubeenv.running(conftest.BIN) as env:
        yield env


@pytest.fixture(scope="session")
def crds(kube: kubeenv.KubeEnv) -> kubeenv.KubeEnv:
    """The API server with the chart's CRDs and node-isolation policy installed."""
    kubecrds.install(kube)
    return kube
