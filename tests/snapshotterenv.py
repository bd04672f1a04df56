"""`csi-thin snapshotter` (containerd's proxy snapshotter) as a child process on a pool of its own,
for tests and benches: the pool config, start-up until the socket answers, and on the way out a
SIGTERM, `csi-thin pool destroy`, and a check that nothing of it is left (mounts, loop devices)."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Protocol

import yaml

from tests import snapshotter_client

#: the config section containerd's snapshotter reads, beside the pool's (README: "containerd")
SNAPSHOTTER_SECTION = "snapshotter:\n  base_image_size: {size}\n  fs_type: {fs}\n"


class PoolMaker(Protocol):
    """reflink_pool or dmthin_pool: a pool config whose files all lie under `workdir`."""

    def __call__(self, workdir: pathlib.PurePath, *, name: str, base_image_size: str = ...) -> str: ...


def reflink_pool(workdir: pathlib.PurePath, *, name: str, base_image_size: str = "64MiB") -> str:
    """A reflink pool on an XFS image file under `workdir` (loop-mounted by the pool itself)."""
    return (
        f"name: {name}\nbackend: reflink\nstate_dir: {workdir}/state\n"
        f"reflink:\n  directory: {workdir}/pool\n  image_file: {workdir}/pool.img\n"
        "  image_size: 2GiB\n  fs_type: xfs\n"
    ) + SNAPSHOTTER_SECTION.format(size=base_image_size, fs="ext4")


def dmthin_pool(workdir: pathlib.PurePath, *, name: str, base_image_size: str = "64MiB") -> str:
    """A dm-thin pool on loop files under `workdir` (real dm-thin: the VM)."""
    return (
        f"name: {name}\nbackend: dmthin\nstate_dir: {workdir}/state\n"
        f"dmthin:\n  data_file: {workdir}/data.img\n  data_size: 2GiB\n"
        f"  metadata_file: {workdir}/meta.img\n  block_size: 64KiB\n"
    ) + SNAPSHOTTER_SECTION.format(size=base_image_size, fs="ext4")


def csi_thin(*args: str) -> list[str]:
    return [sys.executable, "-m", "csi_thin.cli", *args]


def mounts_under(directory: pathlib.Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(f"{directory}/")]


def loops_backed_under(directory: pathlib.Path) -> list[str]:
    """Loop devices whose backing file is under `directory` (from sysfs)."""
    found = []
    for backing in pathlib.Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:  # detached meanwhile
            continue
        if path.startswith(f"{directory}/"):
            found.append(f"{backing.parts[3]}: {path}")
    return found


def dm_devices(prefix: str) -> list[str]:
    """Device-mapper devices whose name starts with `prefix` (none where there is no device-mapper)."""
    found = []
    for name in pathlib.Path("/sys/block").glob("dm-*/dm/name"):
        with contextlib.suppress(OSError):  # removed meanwhile
            text = name.read_text().strip()
            if text.startswith(prefix):
                found.append(text)
    return sorted(found)


def layer_devices(workdir: pathlib.Path, pool_name: str) -> list[str]:
    """The kernel devices that hold a layer of the pool under `workdir` now: loop devices of its
    images (reflink: <workdir>/pool/...), thin devices csi-thin-<pool>-<id> (dm-thin)."""
    thin = [d for d in dm_devices(f"csi-thin-{pool_name}-") if d.rsplit("-", 1)[1].isdigit()]
    return loops_backed_under(workdir / "pool") + thin


@contextlib.contextmanager
def snapshotter(workdir: pathlib.Path, pool: str) -> Iterator[pathlib.Path]:
    """Serve `pool` (a pool config whose files are all under `workdir`) with `csi-thin snapshotter`
    (tests/snapshotter_client.py runs the process); yields its socket. Afterwards the process is
    stopped, the pool destroyed, and nothing of it may be left (asserted: a leak fails the caller)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "pool.yaml"
    config.write_text(pool)
    sock = workdir / "s.sock"
    try:
        with snapshotter_client.snapshotter(config, sock) as proc:
            yield sock
        log = (workdir / "snapshotter.log").read_text()
        assert proc.returncode in (0, -signal.SIGTERM), (
            f"snapshotter exited {proc.returncode}:\n{log[-8000:]}"
        )
    finally:
        destroy = subprocess.run(
            csi_thin("pool", "destroy", "--config", str(config), "--yes"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert destroy.returncode == 0, f"pool destroy: {destroy.stderr}"
        assert not mounts_under(workdir), f"mounts left: {mounts_under(workdir)}"
        assert not loops_backed_under(workdir), f"loop devices left: {loops_backed_under(workdir)}"
        name = yaml.safe_load(pool)["name"]
        assert not dm_devices(f"csi-thin-{name}-"), f"dm devices left: {dm_devices(f'csi-thin-{name}-')}"
