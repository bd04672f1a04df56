"""The cluster's teardown itself, on daemons that stand in for the real ones (no cluster needed):
whatever goes wrong in its gentle part, the daemons are stopped."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from tests import conftest
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


#: a session like the tier's: a cluster fixture (stand-in daemons) and a driver fixture using it,
#: whose teardown the user interrupts with Ctrl-C
INTERRUPTED_SESSION = """
import os, pathlib, signal, time
import pytest
from tests.e2e import cluster as cluster_mod

@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    (root / "logs").mkdir()
    c = cluster_mod.Cluster(root=root, bin=root / "bin")
    for name in ("etcd", "apiserver", "containerd", "kubelet"):
        c._start(name, ["sleep", "600"])
    pathlib.Path(os.environ["PIDS"]).write_text(" ".join(str(p.pid) for p in c.procs.values()))
    with cluster_mod.sigterm_interrupts():
        yield c
        c.stop()

@pytest.fixture(scope="session")
def driver(cluster):
    yield
    with cluster_mod.stopped_on_interrupt(cluster):
        if not os.environ.get("SIGTERM_IN_TEST"):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the (slow) uninstall
            time.sleep(5)

def test_uses_the_driver(driver):
    if os.environ.get("SIGTERM_IN_TEST"):
        os.kill(os.getpid(), signal.SIGTERM)  # a cancelled CI job, `timeout`
        time.sleep(5)
"""


@pytest.mark.parametrize(
    "sigterm_in_test", [False, True], ids=["ctrl-c-in-driver-teardown", "sigterm-in-test"]
)
def test_an_interrupted_session_still_stops_the_cluster(
    tmp_path: pathlib.Path, sigterm_in_test: bool
) -> None:
    """pytest runs no further fixture teardown after a KeyboardInterrupt in one: an interrupted
    driver teardown would skip the cluster's, leaving every daemon running. A SIGTERM to pytest
    (the daemons, in sessions of their own, do not get it) would end it with no teardown at all."""
    (tmp_path / "test_session.py").write_text(textwrap.dedent(INTERRUPTED_SESSION))
    pids_file = tmp_path / "pids"
    env = {**os.environ, "PIDS": str(pids_file), "PYTHONPATH": str(conftest.ROOT)}
    if sigterm_in_test:
        env["SIGTERM_IN_TEST"] = "1"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}",
         str(tmp_path / "test_session.py")],
        cwd=conftest.ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    pids = [int(p) for p in pids_file.read_text().split()]
    try:
        assert len(pids) == 4, res.stdout + res.stderr
        assert res.returncode != 0, res.stdout + res.stderr
        running = [pid for pid in pids if _running(pid)]
        assert not running, f"daemons still running after the interrupted session: {running}"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
