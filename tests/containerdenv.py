"""A private containerd for tests (root): its own root, state and socket in a temp dir, stopped
and removed afterwards with every container, shim, cgroup and mount it made. Used by the image tier
(tests/root/test_image.py) and the containerd snapshotter tests (tests/root/test_ctrd_containerd.py)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def containerd(extra_config: str = "") -> Iterator[list[str]]:
    """A private containerd; yields the ctr argv prefix that talks to it. Everything it made (its
    root, state, runc state, fifos, mounts) lives in one temp dir, gone afterwards. `extra_config`:
    more TOML for its config (e.g. a [proxy_plugins] table)."""
    # short: unix socket paths hold 107 bytes
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    run_containerd_existed = os.path.exists("/run/containerd")
    sock = tmp / "c.sock"
    (tmp / "config.toml").write_text(
        "version = 2\n"
        f'root = "{tmp}/root"\nstate = "{tmp}/state"\n'
        # no Kubernetes here: the CRI plugin would set up networking it does not need; the opt
        # plugin would make /opt/containerd/{bin,lib} on the host (for binaries nobody installs)
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n' + extra_config
    )
    log = (tmp / "containerd.log").open("wb")
    proc = subprocess.Popen(
        ["containerd", "--config", str(tmp / "config.toml")], stdout=log, stderr=subprocess.STDOUT
    )
    ctr = ["ctr", "--address", str(sock), "--namespace", f"csi-thin-test-{uuid.uuid4().hex[:6]}"]
    try:
        end = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], check=False, capture_output=True).returncode != 0:
            assert proc.poll() is None, (tmp / "containerd.log").read_text()
            assert time.monotonic() < end, "containerd did not answer in 30 s"
            time.sleep(0.1)  # process start-up: nothing to watch until its socket answers
        yield ctr
    finally:
        if proc.poll() is None:
            remove_containers(ctr)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        # a shim whose containerd could not remove its task (containerd died or hung): by force
        kill_shims(str(sock))
        # runc removes a container's cgroup, not the namespace's one above it
        for cgroup in cgroups_of(ctr[-1]):
            for path, _dirs, _files in os.walk(cgroup, topdown=False):
                with contextlib.suppress(OSError):  # busy: the assertion below names it
                    os.rmdir(path)
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            ours = [line.split()[4] for line in f if line.split()[4].startswith(str(tmp))]
        for mountpoint in sorted(ours, reverse=True):
            subprocess.run(["umount", mountpoint], check=True)
        shutil.rmtree(tmp)
        # containerd 1.6 keeps shim sockets in /run/containerd/s whatever its state dir: ours are
        # gone with their shims; the directories go too unless someone else's containerd uses them
        if not run_containerd_existed:
            for d in ("/run/containerd/s", "/run/containerd/fifo", "/run/containerd"):
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rmdir(d)
        assert not ours, f"containerd left mounts behind: {ours}"
        assert not cgroups_of(ctr[-1]), f"cgroups left behind: {cgroups_of(ctr[-1])}"


def remove_containers(ctr: list[str]) -> None:
    """Kill and delete every container in our namespace. Needed on a failure path (a `ctr run`
    timed out, its `--rm` never ran): a shim and its container outlive their containerd by design,
    and the task's rootfs stays mounted. A containerd that does not answer is not waited for (this
    runs before it is stopped): its shims are killed afterwards (kill_shims)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        listed = subprocess.run(
            [*ctr, "containers", "ls", "-q"], capture_output=True, text=True, timeout=30, check=False
        )
        for cid in listed.stdout.split():
            # --force: SIGKILL the task and wait for it, then delete it (its shim exits, its rootfs goes)
            subprocess.run(
                [*ctr, "tasks", "delete", "--force", cid], capture_output=True, timeout=60, check=False
            )
            subprocess.run([*ctr, "containers", "delete", cid], capture_output=True, timeout=60, check=False)


def kill_shims(address: str) -> None:
    """SIGKILL the shims serving `address` (only ours: the address is in a temp dir of ours) and
    their children (the containers' init processes, which would outlive their shim)."""
    for proc in pathlib.Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if not argv[0].endswith(b"containerd-shim-runc-v2") or address.encode() not in argv:
            continue
        with contextlib.suppress(OSError):
            for task in (proc / "task").iterdir():
                for child in (task / "children").read_text().split():
                    os.kill(int(child), signal.SIGKILL)
            os.kill(int(proc.name), signal.SIGKILL)


def cgroups_of(namespace: str) -> list[pathlib.Path]:
    """The cgroup directories of a containerd namespace (cgroup v2, or each v1 hierarchy)."""
    top = pathlib.Path("/sys/fs/cgroup")
    return [d for d in (top / namespace, *top.glob(f"*/{namespace}")) if d.is_dir()]


def processes_naming(text: str) -> list[str]:
    """The processes whose command line holds `text` (pid: command line)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found
