"""The pool config the chart renders into the node's ConfigMap builds a real pool: its reflink layout
under pool.stateDir (store, image, mount point) is created by `csi-thin pool create` from nothing, and
`pool destroy` leaves no mount or loop device behind. (dm-thin on loop files needs device-mapper: the
same config's dm-thin form is checked by csi_thin.config in tests/integration/test_chart.py.)"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import yaml

from tests import helmchart as hc

pytestmark = pytest.mark.tools


def _csi_thin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi_thin.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _leftovers(state: pathlib.Path) -> list[str]:
    mounts = [
        line for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines() if str(state) in line
    ]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return mounts + [line for line in loops.splitlines() if str(state) in line]


def test_rendered_reflink_pool_builds_from_nothing(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"  # does not exist: the DaemonSet's hostPath is DirectoryOrCreate
    values = {"pool": {"backend": "reflink", "stateDir": str(state), "reflink": {"imageSize": "512MiB"}}}
    docs = hc.render(tmp_path, values)
    conf = tmp_path / "pool.yaml"
    conf.write_text(hc.one(docs, "ConfigMap", "csi-thin-pool")["data"]["pool.yaml"])
    state.mkdir()
    try:
        out = _csi_thin("pool", "create", "--config", str(conf), "--json")
        assert out.returncode == 0, out.stderr
        status = yaml.safe_load(out.stdout)["status"]
        assert status["healthy"] and status["backend"] == "reflink"
        assert status["data_total_bytes"] > 256 << 20
        made = {p.relative_to(state).as_posix() for p in state.glob("*/*")}
        assert {"pool/store", "pool/pool.img", "pool/mnt"} <= made
    finally:
        out = _csi_thin("pool", "destroy", "--config", str(conf), "--yes")
    assert out.returncode == 0, out.stderr
    assert _leftovers(state) == []
