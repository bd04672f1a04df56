"""The pinned Go test tools are built (`make tools`) and are the versions go.mod pins."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests import conftest

pytestmark = pytest.mark.tools


def _pinned(module_dir: str, module: str) -> str:
    out = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Version}}", module],
        cwd=conftest.ROOT / "tools" / module_dir,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("tool", "args", "module_dir", "module"),
    [
        ("csi-sanity", ["--version"], "csi", "github.com/kubernetes-csi/csi-test/v5"),
        ("kube-apiserver", ["--version"], "kube", "k8s.io/kubernetes"),
        ("etcd", ["--version"], "etcd", "go.etcd.io/etcd/server/v3"),
        ("helm", ["version"], "helm", "helm.sh/helm/v3"),
        ("promtool", ["--version"], "promtool", "github.com/prometheus/prometheus"),
    ],
)
def test_tool_prints_pinned_version(tool: str, args: list[str], module_dir: str, module: str) -> None:
    path = conftest.tool(tool)
    out = subprocess.run([str(path), *args], capture_output=True, text=True, check=True, timeout=60)
    version = _pinned(module_dir, module)
    print(f"{tool}: {out.stdout.strip().splitlines()[0]}")
    assert re.search(re.escape(version.lstrip("v")), out.stdout), out.stdout
