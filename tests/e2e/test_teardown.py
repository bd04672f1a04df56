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


def test_another_kubelets_cgroups_are_refused_and_left_alone(tmp_path: pathlib.Path) -> None:
    """kubelet's pod cgroups exist already (another kubelet on this host): the cluster does not
    start, and its teardown removes none of them."""
    made = []
    if not cluster_mod._kubepods():  # else this session's own cluster runs: its cgroups stand in
        made.append(pathlib.Path("/sys/fs/cgroup/pids/kubepods"))
        made[0].mkdir()
    try:
        before = cluster_mod._kubepods()
        c = cluster_mod.Cluster(root=tmp_path / "root", bin=tmp_path / "bin")
        with pytest.raises(RuntimeError, match="another kubelet"):
            c.start()
        assert c.stop() == []
        assert cluster_mod._kubepods() == before, "the teardown removed kubelet cgroups it did not make"
    finally:
        for d in made:
            d.rmdir()
