"""containerd's own snapshotter conformance suite (core/snapshots/testsuite of the pinned
containerd v2 module, built by tools/build.sh as bin/ctrd-suite from tools/ctrd-suite) against
`csi-thin snapshotter` on a reflink pool, through containerd's proxy client: each case gets a fresh
pool in a root of its own (an XFS image on a loop device, its LMDB beside it), a snapshotter process
serving it, and mounts the returned mounts for real. Every case must pass; none is deselected
(DESELECTED says which and why if one ever is, and the README repeats it)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest

from tests import conftest, containerdenv, snapshotterenv

pytestmark = pytest.mark.tools

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

#: the pool each case's snapshotter serves (the Go side fills in @ROOT@ and @ID@): 64 MiB ext4 layers
POOL = snapshotterenv.reflink_pool(pathlib.PurePath("@ROOT@"), name="suite-@ID@")

_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): TestSnapshotterSuite/(\S+) \(")


@pytest.mark.timeout(1800)
def test_containerd_snapshotter_suite(tmp_path_factory: pytest.TempPathFactory) -> None:
    suite = conftest.tool("ctrd-suite")
    # short: each case's socket is <tmp>/snapshot-suite-csi-thin-<digits>/root/s.sock (107 bytes max)
    tmp = tmp_path_factory.mktemp("cs")
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "CSI_THIN_SUITE_CMD": json.dumps(snapshotterenv.csi_thin()),
        "CSI_THIN_SUITE_POOL": POOL,
    }
    argv = [str(suite), "-test.v", "-test.run", "^TestSnapshotterSuite$", "-test.timeout", "25m"]
    # two cases at a time: each runs a snapshotter process of its own, on a 2-core machine
    argv += ["-test.parallel", "2"]
    if DESELECTED:
        argv += ["-test.skip", "^TestSnapshotterSuite$/^(" + "|".join(map(re.escape, DESELECTED)) + ")$"]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1700, check=False)
    results = {}
    for line in run.stdout.splitlines():
        m = _RESULT.match(line)
        if m:
            results[m.group(2)] = m.group(1)
    try:
        assert set(results) == set(CASES) - set(DESELECTED), (
            f"the suite's cases are not the listed ones: ran {sorted(results)}\n{run.stdout[-8000:]}"
        )
        failed = sorted(case for case, result in results.items() if result != "PASS")
        # the failing cases' output (their t.Log lines and the snapshotter's log) is in stdout
        assert not failed and run.returncode == 0, (
            f"failed or skipped: {failed} (exit {run.returncode})\n"
            f"{run.stdout[-20000:]}\n{run.stderr[-4000:]}"
        )
    finally:
        # every case's cleanup stopped its snapshotter and destroyed its pool: nothing of it is left
        assert not snapshotterenv.mounts_under(tmp), f"mounts left: {snapshotterenv.mounts_under(tmp)}"
        assert not snapshotterenv.loops_backed_under(tmp), (
            f"loop devices left: {snapshotterenv.loops_backed_under(tmp)}"
        )
        assert not containerdenv.processes_naming(str(tmp)), containerdenv.processes_naming(str(tmp))
    deselected = "; ".join(f"{case}: {why}" for case, why in DESELECTED.items()) or "none"
    conftest.report(
        f"containerd snapshotter suite ({VERSION}): {len(results)} of {len(CASES)} cases passed, "
        f"deselected: {deselected}"
    )
