"""Real containerd (Debian's) with csi-thin as its proxy snapshotter, on a reflink pool: containerd
imports a busybox image into it, runs a container that writes to its root filesystem, commits that
container's snapshot, runs a second container from the same image, and removes it all. Afterwards
the pool holds no layer, and no loop device, mount or process of it is left (tests/snapshotterenv.py,
tests/containerdenv.py)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import uuid

import pytest

from tests import containerdenv, snapshotterenv
from tests.e2e import images

IMAGE = "localhost/csi-thin-test/busybox:1"
#: what the README shows, with the socket filled in
PROXY = '[proxy_plugins]\n  [proxy_plugins.csi-thin]\n    type = "snapshot"\n    address = "{socket}"\n'


def _ok(argv: list[str], timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def _layers(config: pathlib.Path) -> list[dict[str, object]]:
    """The pool's layer devices as `csi-thin pool list` shows them."""
    return json.loads(
        _ok(snapshotterenv.csi_thin("pool", "list", "--kind", "layer", "--json", "--config", str(config)))
    )


def test_containerd_runs_containers_on_csi_thin_layers(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("cc")  # short: the socket's path holds 107 bytes
    archive = images.busybox_image(tmp / "busybox.tar", ref=IMAGE, busybox=pathlib.Path("/bin/busybox"))
    work = tmp / "sn"
    pool = snapshotterenv.reflink_pool(work, name=f"ctrd-{uuid.uuid4().hex[:6]}")
    with (
        snapshotterenv.snapshotter(work, pool) as sock,
        containerdenv.containerd(PROXY.format(socket=sock)) as ctr,
    ):
        plugins = _ok([*ctr, "plugins", "ls"])
        assert any(row.split()[:2] == ["io.containerd.snapshotter.v1", "csi-thin"] and row.split()[-1] == "ok"
                   for row in plugins.splitlines()), plugins  # fmt: skip
        snaps = [*ctr, "snapshots", "--snapshotter", "csi-thin"]

        # the image's one layer unpacked into csi-thin: a committed layer, inactive
        _ok([*ctr, "images", "import", "--snapshotter", "csi-thin", str(archive)], timeout=300)
        listed = _ok([*snaps, "ls"]).splitlines()[1:]
        assert [row.split()[-1] for row in listed] == ["Committed"], listed
        config = work / "pool.yaml"
        assert len(_layers(config)) == 1, _layers(config)
        own = [str(work / "pool.img")]  # the pool's own image: the only loop device while nothing runs
        assert [loop.split(": ")[1] for loop in snapshotterenv.loops_backed_under(work)] == own

        # a container writing to its root fs; kept (no --rm) so that its snapshot can be committed
        run = [*ctr, "run", "--snapshotter", "csi-thin", "--runc-root", str(tmp / "runc"),
               "--fifo-dir", str(tmp / "fifo")]  # fmt: skip
        out = _ok([*run, IMAGE, "c1", "sh", "-c", "echo from-c1 > /written && cat /written"])
        assert out.strip() == "from-c1"
        _ok([*snaps, "commit", "c1-layer", "c1"])
        # committing deactivated it: the pool's image is again the only loop device
        assert [loop.split(": ")[1] for loop in snapshotterenv.loops_backed_under(work)] == own
        info = _ok([*snaps, "info", "c1-layer"])
        assert '"Kind": "Committed"' in info, info

        # the committed layer holds what c1 wrote: a read-only view of it, mounted here
        # (containerd's mount.Mount as JSON: Go's field names)
        (mount,) = json.loads(_ok([*snaps, "view", "--mounts", "c1-view", "c1-layer"]))
        assert "ro" in mount["Options"], mount
        view = tmp / "view"
        view.mkdir()
        _ok(["mount", "-t", mount["Type"], "-o", ",".join(mount["Options"]), mount["Source"], str(view)])
        try:
            assert (view / "written").read_text() == "from-c1\n"
        finally:
            _ok(["umount", str(view)])
        _ok([*snaps, "rm", "c1-view"])

        # a second container from the same image: a fresh snapshot of the image's layer
        out = _ok([*run, "--rm", IMAGE, "c2", "sh", "-c", "test ! -e /written && echo clean"])
        assert out.strip() == "clean"

        # remove everything: c1 (its snapshot is c1-layer now), the layer, the image and its layer
        _ok([*ctr, "containers", "rm", "--keep-snapshot", "c1"])
        _ok([*snaps, "rm", "c1-layer"])
        _ok([*ctr, "images", "rm", "--sync", IMAGE])
        assert _ok([*snaps, "ls"]).splitlines()[1:] == []
        # the pool forgot them too (Remove, then containerd's Cleanup after its garbage collection)
        assert _layers(config) == []
        assert [loop.split(": ")[1] for loop in snapshotterenv.loops_backed_under(work)] == own
    # snapshotter() and containerd() asserted on the way out: no mount, loop device, cgroup left
