"""The pool config the chart renders into the node's ConfigMap builds a real pool: its reflink layout
under pool.stateDir (store, image, mount point) is created by `csi-thin pool create` from nothing, and
`pool destroy` leaves no mount or loop device behind; and the pool outlives its node pod, started
again in a fresh mount namespace with the DaemonSet's mount propagation, with a volume in use (a
rolling update). (dm-thin on loop files needs device-mapper: the same config's dm-thin form is checked
by csi_thin.config in tests/integration/test_chart.py.)"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import yaml

from csi_thin.dm import loop
from tests import helmchart as hc
from tests.root import test_reflink

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


#: what a container runtime makes of a volumeMount's mountPropagation (the CRI's rprivate default)
_PROPAGATION = {
    None: "--make-rprivate",
    "HostToContainer": "--make-rslave",
    "Bidirectional": "--make-rshared",
}

_ACTIVATE = """
import json, sys
from csi_thin import app, config, deadline
from csi_thin.dm import loop
with app.open_engine(config.load_pool(sys.argv[1])) as eng:
    if sys.argv[2] == "first":
        eng.create_volume("v1", 64 << 20, deadline=deadline.default())
        eng.activate("v1", deadline=deadline.default())
    dev = eng.get("v1")
    print(json.dumps({"path": dev.path, "active": dev.active, "identity": loop.identity(dev.path)}))
"""


def _in_pod(state: pathlib.Path, propagation: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run python in a mount namespace of its own whose view of the state dir propagates as the node
    container's would: the namespace, and whatever was mounted only in it, goes when it exits."""
    script = f'mount {propagation} "$0" && exec "$@"'
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "unchanged",
        "sh",
        "-c",
        script,
        str(state),
        sys.executable,
        "-c",
        _ACTIVATE,
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def test_reflink_image_pool_survives_a_node_pod_restart_with_a_volume_in_use(tmp_path: pathlib.Path) -> None:
    """A rolling update: the node pod goes (its mount namespace with it) while a volume is active and
    the next one assembles the same pool. The pool image's mount must be the host's, not the dead
    pod's: mounted only in the pod it vanishes with it, its filesystem lives on hidden (the volume's
    loop device holds it), and the next pod finds a live log on the image and refuses to start."""
    state = tmp_path / "state"
    values = {"pool": {"backend": "reflink", "stateDir": str(state), "reflink": {"imageSize": "512MiB"}}}
    docs = hc.render(tmp_path, values)
    conf = tmp_path / "pool.yaml"
    conf.write_text(hc.one(docs, "ConfigMap", "csi-thin-pool")["data"]["pool.yaml"])
    pod = hc.one(docs, "DaemonSet", "csi-thin-node")["spec"]["template"]["spec"]
    (vol,) = [v["name"] for v in pod["volumes"] if v.get("hostPath", {}).get("path") == str(state)]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == vol]
    propagation = _PROPAGATION[mount.get("mountPropagation")]
    state.mkdir()
    volume_loop: dict[str, Any] = {}
    try:
        # the host's /var/lib is a shared mount on a kubelet node (systemd's default)
        subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
        subprocess.run(["mount", "--make-shared", str(state)], check=True)
        first = _in_pod(state, propagation, str(conf), "first")
        assert first.returncode == 0, first.stderr[-2000:]
        volume_loop = json.loads(first.stdout.splitlines()[-1])
        assert volume_loop["active"]
        second = _in_pod(state, propagation, str(conf), "again")
        assert second.returncode == 0, second.stderr[-2000:]
        again = json.loads(second.stdout.splitlines()[-1])
        assert again == volume_loop  # the same volume, still on the same loop device
    finally:
        # the volume's loop first (on a hidden filesystem its path is not under tmp_path any more),
        # and only while it is still the one this test attached
        dev, ident = volume_loop.get("path"), volume_loop.get("identity")
        if isinstance(dev, str) and ident is not None:
            with contextlib.suppress(loop.Unreadable):
                if loop.identity(dev) == tuple(ident):
                    loop.detach(dev)
        test_reflink.cleanup_under(tmp_path)
        # the image's loop was attached through the pod's view of the state dir: sysfs shows its path
        # relative to that gone mount ("/pool/pool.img"); find() confirms it by the file's identity
        image = loop.find(str(state / "pool" / "pool.img"))
        if image is not None:
            loop.detach(image)
