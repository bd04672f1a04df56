"""The cluster's teardown itself, on daemons that stand in for the real ones (no cluster needed):
whatever goes wrong in its gentle part, the daemons are stopped."""

from __future__ import annotations

import pathlib

import pytest

from tests.e2e import cluster as cluster_mod

DAEMONS = ("etcd", "apiserver", "containerd", "kubelet")


def test_a_second_ctrl_c_during_teardown_still_stops_every_daemon(tmp_path: pathlib.Path) -> None:
    """A user who finds the teardown's pod deletion slow presses Ctrl-C again: the rest of the
    teardown still runs (kubelet, containerd, apiserver, etcd stopped), then the interrupt goes on."""
    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    bin_dir.mkdir()
    (root / "logs").mkdir(parents=True)
    # the kubectl of the teardown's pod deletion: the user interrupts pytest (its parent) meanwhile
    kubectl = bin_dir / "kubectl"
    kubectl.write_text("#!/bin/sh\nkill -INT $PPID\nexec sleep 60\n")
    kubectl.chmod(0o755)
    c = cluster_mod.Cluster(root=root, bin=bin_dir)
    for name in DAEMONS:
        c._start(name, ["sleep", "600"])
    try:
        with pytest.raises(KeyboardInterrupt):
            c.stop()
        running = [name for name, proc in c.procs.items() if proc.poll() is None]
        assert not running, f"still running after the teardown: {running}"
    finally:
        for proc in c.procs.values():
            proc.kill()
            proc.wait()
