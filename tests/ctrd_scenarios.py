"""containerd on csi-thin, the scenarios both backends run (tests/root on reflink, tests/vm on
dm-thin):

- snapshotter_suite: containerd's own snapshotter conformance suite (core/snapshots/testsuite of the
  pinned containerd v2 module, built by tools/build.sh as bin/ctrd-suite from tools/ctrd-suite)
  against `csi-thin snapshotter`, through containerd's proxy client: each case gets a fresh pool in
  a root of its own, a snapshotter process serving it, and mounts the returned mounts for real.
  Every case must pass; none is deselected (DESELECTED says which and why if one ever is, and the
  README repeats it).
- containerd_lifecycle: real containerd (Debian's) with csi-thin as its proxy snapshotter imports a
  busybox image into it, runs a container that writes to its root filesystem, commits that
  container's snapshot, runs a second container from the same image, and removes it all. Afterwards
  the pool holds no layer, and no device, mount or process of it is left (tests/snapshotterenv.py,
  tests/containerdenv.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import time
import uuid

from tests import conftest, containerdenv, snapshotterenv
from tests.e2e import images

#: the pinned containerd module the suite is built from
VERSION = re.search(
    r"github.com/containerd/containerd/v2 (\S+)", (conftest.ROOT / "tools/ctrd-suite/go.mod").read_text()
)[1]  # type: ignore[index]
#: the suite's cases (testsuite.SnapshotterSuite of containerd v2.4.2, typos theirs): a case the
#: pinned suite adds or renames fails the test below until it is listed here
CASES = (
    "Basic", "StatActive", "StatComitted", "TransitivityTest", "PreareViewFailingtest", "Update",
    "Remove", "Walk", "LayerFileupdate", "RemoveDirectoryInLowerLayer", "Chown",
    "DirectoryPermissionOnCommit", "RemoveIntermediateSnapshot", "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer", "ViewReadonly", "StatInWalk", "CloseTwice", "RootPermission", "Rename",
    "128LayersMount",
)  # fmt: skip
#: case -> why it is not run (passed to the suite as -test.skip, reported, and in the README)
DESELECTED: dict[str, str] = {}

_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): TestSnapshotterSuite/(\S+) \(")
#: go test -v names the case whose lines follow (cases run in parallel, their output interleaves)
_HEADER = re.compile(r"^=== (?:RUN|CONT|NAME|PAUSE)\s+TestSnapshotterSuite/(\S+)$")


def _output_by_case(stdout: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    case = ""
    for line in stdout.splitlines():
        m = _HEADER.match(line)
        if m:
            case = m.group(1)
        elif case:
            lines.setdefault(case, []).append(line)
    return lines


def snapshotter_suite(tmp: pathlib.Path, make_pool: snapshotterenv.PoolMaker, *, backend: str) -> None:
    """containerd's suite, every case on a pool of its own made by `make_pool` under the case's root.
    `tmp`: a short directory (each case's socket is <tmp>/snapshot-suite-csi-thin-<digits>/root/s.sock,
    and a unix socket's path holds 107 bytes)."""
    suite = conftest.tool("ctrd-suite")
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "CSI_THIN_SUITE_CMD": json.dumps(snapshotterenv.csi_thin()),
        # the Go side fills in @ROOT@ and @ID@ per case
        "CSI_THIN_SUITE_POOL": make_pool(pathlib.PurePath("@ROOT@"), name="suite-@ID@"),
    }
    argv = [str(suite), "-test.v", "-test.run", "^TestSnapshotterSuite$", "-test.timeout", "50m"]
    # two cases at a time: each runs a snapshotter process of its own, on a 2-core machine
    argv += ["-test.parallel", "2"]
    if DESELECTED:
        argv += ["-test.skip", "^TestSnapshotterSuite$/^(" + "|".join(map(re.escape, DESELECTED)) + ")$"]
    try:
        run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3300, check=False)
    finally:
        # every case's cleanup stopped its snapshotter and destroyed its pool: nothing may be left.
        # A suite that timed out ran no cleanup at all: what it left is named, then taken down.
        left = _suite_leftovers(tmp)
        if left:
            _tear_down_suite(tmp)
    results = {}
    for line in run.stdout.splitlines():
        m = _RESULT.match(line)
        if m:
            results[m.group(2)] = m.group(1)
    assert set(results) == set(CASES) - set(DESELECTED), (
        f"the suite's cases are not the listed ones: ran {sorted(results)}\n{run.stdout[-8000:]}"
    )
    failed = sorted(case for case, result in results.items() if result != "PASS")
    # each failing case's output: its t.Log lines, its snapshotter's log
    output = _output_by_case(run.stdout)
    # (the snapshotter's log comes as one logrus field: its line breaks escaped)
    shown = "".join(
        f"\n--- {case}:\n" + "\n".join(output.get(case, [])).replace("\\n", "\n")[-12000:] for case in failed
    )
    assert not failed and not left and run.returncode == 0, (
        f"failed or skipped: {failed} (exit {run.returncode}); left behind (now removed): {left}"
        f"{shown}\n{run.stderr[-4000:]}"
    )
    deselected = "; ".join(f"{case}: {why}" for case, why in DESELECTED.items()) or "none"
    conftest.report(
        f"containerd snapshotter suite ({VERSION}) on {backend}: {len(results)} of {len(CASES)} cases "
        f"passed, deselected: {deselected}"
    )


def _suite_leftovers(tmp: pathlib.Path) -> list[str]:
    return (
        snapshotterenv.mounts_under(tmp)
        + snapshotterenv.loops_backed_under(tmp)
        + snapshotterenv.dm_devices("csi-thin-suite-")
        + containerdenv.processes_naming(str(tmp))
    )


def _tear_down_suite(tmp: pathlib.Path) -> None:
    """Undo what an interrupted suite left under `tmp`: its snapshotter processes (their command line
    names their pool config under `tmp`), the mounts of its cases, then each case's pool."""
    procs = [int(line.split(":")[0]) for line in containerdenv.processes_naming(str(tmp))]
    for pid in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 30
    while containerdenv.processes_naming(str(tmp)) and time.monotonic() < end:
        time.sleep(0.2)  # their own SIGTERM handling: nothing to wait on but the process table
    for pid in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pools = {str(config.parent / "pool") for config in tmp.glob("*/root/pool.yaml")}
    for mountpoint in sorted(snapshotterenv.mounts_under(tmp), reverse=True):
        if mountpoint not in pools:  # a pool's own mount: `pool destroy` takes it down
            subprocess.run(["umount", mountpoint], capture_output=True, check=False)
    for config in tmp.glob("*/root/pool.yaml"):
        destroy = snapshotterenv.csi_thin("pool", "destroy", "--config", str(config), "--yes")
        subprocess.run(destroy, capture_output=True, timeout=120, check=False)


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


def containerd_lifecycle(tmp: pathlib.Path, make_pool: snapshotterenv.PoolMaker) -> None:
    """The whole life of an image and its containers in containerd on a pool `make_pool` makes.
    `tmp`: a short directory (the snapshotter's socket is under it)."""
    archive = images.busybox_image(tmp / "busybox.tar", ref=IMAGE, busybox=pathlib.Path("/bin/busybox"))
    work = tmp / "sn"
    name = f"ctrd-{uuid.uuid4().hex[:6]}"
    pool = make_pool(work, name=name)
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
        # a committed layer is inactive: no device holds one while nothing runs
        assert snapshotterenv.layer_devices(work, name) == []

        # a container writing to its root fs; kept (no --rm) so that its snapshot can be committed
        run = [*ctr, "run", "--snapshotter", "csi-thin", "--runc-root", str(tmp / "runc"),
               "--fifo-dir", str(tmp / "fifo")]  # fmt: skip
        out = _ok([*run, IMAGE, "c1", "sh", "-c", "echo from-c1 > /written && cat /written"])
        assert out.strip() == "from-c1"
        _ok([*snaps, "commit", "c1-layer", "c1"])
        # committing deactivated it
        assert snapshotterenv.layer_devices(work, name) == []
        info = _ok([*snaps, "info", "c1-layer"])
        assert '"Kind": "Committed"' in info, info

        # the committed layer holds what c1 wrote: a read-only view of it, mounted here
        # (containerd's mount.Mount as JSON: Go's field names)
        (mount,) = json.loads(_ok([*snaps, "view", "--mounts", "c1-view", "c1-layer"]))
        assert "ro" in mount["Options"], mount
        # the view's device is active (what the checks for none above would see)
        assert len(snapshotterenv.layer_devices(work, name)) == 1, snapshotterenv.layer_devices(work, name)
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
        assert snapshotterenv.layer_devices(work, name) == []
    # snapshotter() and containerd() asserted on the way out: no mount, loop device, cgroup left
