"""The backend-neutral engine suite (tests/enginesuite.py) on the reflink backend: ReflinkBackend on
a loop-mounted XFS (reflink=1) or btrfs image in the test's temp dir, natively as root. Each test gets its
own pool; every mount and loop device under the temp dir is removed after it, even on failure."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
from collections.abc import Iterator

import pytest

from csi_thin import config, errors, model
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import engine as engine_mod
from csi_thin.pool import reflink
from tests import blockio, enginesuite
from tests.enginesuite import *  # noqa: F403 - the suite's tests run here
from tests.enginesuite import (
    test_group_snapshot_holds_data_of_one_instant,  # noqa: F401 - backends with block devices
    test_group_snapshot_killed_while_held_is_let_go_at_start,  # noqa: F401 - ditto
)
from tests.root import test_reflink


class ReflinkHarness(enginesuite.Harness):
    has_block_devices = True

    def __init__(self, root: pathlib.Path, fs_type: str) -> None:
        super().__init__(str(root / "state"))
        self.label = f"reflink on {fs_type}"
        self.cfg = config.PoolConfig(
            name="engine",
            backend=config.BackendKind.REFLINK,
            state_dir=self.state_dir,
            reflink=config.ReflinkConfig(
                directory=str(root / "pool"),
                image_file=str(root / "pool.img"),
                image_size=512 * model.MiB,
                fs_type=fs_type,
                block_size=self.block_size,
            ),
        )

    def make_backend(self) -> backend_mod.Backend:
        return reflink.ReflinkBackend(self.cfg)

    def _devices(self) -> pathlib.Path:
        assert self.cfg.reflink is not None
        return pathlib.Path(self.cfg.reflink.directory) / "devices"

    def kernel_sizes(self, engine: engine_mod.PoolEngine) -> dict[int, int]:
        """Each device file's length; an attached loop device must show the same size."""
        out = {}
        for f in self._devices().iterdir():
            if f.suffix == ".img" and f.stem.isdigit():
                out[int(f.stem)] = f.stat().st_size
        for dev_id in engine.backend.active_ids(deadline=enginesuite.dl()):
            dev = engine.backend.device_path(dev_id)
            assert blockio.device_size(dev) == out[dev_id], (dev_id, dev)
        return out

    def leftovers(self, engine: engine_mod.PoolEngine) -> list[str]:
        """Temp files of a step (assemble sweeps them after a crash; a step that fails removes its own)."""
        assert self.cfg.reflink is not None
        folders = (self._devices(), pathlib.Path(self.cfg.reflink.directory))
        return [str(f) for folder in folders for f in folder.iterdir() if f.name.startswith(".tmp-")]


@pytest.fixture(params=["xfs", "btrfs"])
def harness(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[enginesuite.Harness]:
    h = ReflinkHarness(tmp_path, request.param)
    try:
        yield h
    finally:
        h.shutdown()
        try:
            reflink.ReflinkBackend(h.cfg).destroy(deadline=enginesuite.dl())
        finally:
            test_reflink.cleanup_under(tmp_path)


def test_group_snapshot_of_a_filesystem_someone_else_froze(harness: enginesuite.Harness) -> None:
    """An origin whose filesystem an operator froze (fsfreeze): the group is refused (UNAVAILABLE,
    retry later), nothing is made, the other origin is let go, and the operator's freeze is theirs
    to end (not thawed by the refusal's undo)."""
    e = harness.open()
    mounts = []
    for name in ("a", "b"):
        dev = e.activate(
            e.create_volume(name, 32 * model.MiB, deadline=enginesuite.dl()).name, deadline=enginesuite.dl()
        )
        assert dev.path is not None
        mounts.append(harness.mount_new_fs(dev.path))
    before = enginesuite.committed(e)
    fd = os.open(mounts[1], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, enginesuite.FIFREEZE, 0)
        try:
            with pytest.raises(errors.Unavailable, match="already frozen by someone else"):
                e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=enginesuite.dl())
            assert harness.leftovers(e) == []
            assert harness.frozen_mounts() == [mounts[1]], "the operator's freeze must stay, the other go"
        finally:
            fcntl.ioctl(fd, enginesuite.FITHAW, 0)
    finally:
        os.close(fd)
    assert e.get_group("g") == []
    enginesuite.check_consistent(e, before=before)
    assert len(e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=enginesuite.dl())) == 2


def test_group_snapshot_of_two_raw_block_origins_is_refused(harness: enginesuite.Harness) -> None:
    """A loop device in use without a filesystem mounted from it (a raw block volume) cannot be held:
    nothing blocks its writes, the hold only flushes it. With two such origins in a group, a writer
    goes on between the two clones, and the members are of two instants: a database that wrote its
    log on `a` (after `a` was cloned) and then, that write durable, its data on `b` (before `b` was)
    restores with the data and without the log it depends on. The spec: a group snapshot MUST give a
    write-order consistency guarantee or fail. With at most one such origin and every other one
    frozen it holds (nothing else changes while the one unheld origin is cloned): that is made."""
    e = harness.open()
    raw = []
    for name in ("a", "b"):
        dev = e.activate(
            e.create_volume(name, 32 * model.MiB, deadline=enginesuite.dl()).name, deadline=enginesuite.dl()
        )
        assert dev.path is not None
        blockio.write_at(dev.path, 0, b"one")
        raw.append(dev.path)
    before = enginesuite.committed(e)
    clones: list[str] = []

    def writer(point: str) -> None:  # the database, right after the first member was cloned
        if point == "reflink:create_snap/cloned" and not clones:
            clones.append(point)
            blockio.write_at(raw[0], 0, b"two")  # the log
            blockio.write_at(raw[1], 0, b"two")  # the data that needs it, written once it is durable

    with enginesuite.hooked(writer):
        try:
            g = e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=enginesuite.dl())
        except errors.FailedPrecondition as exc:
            assert "cannot be held" in str(exc)
            g = []
    if g:  # made: show what it holds
        got = []
        for member in g:
            clone = e.activate(
                e.clone(f"{member.name}-r", member.name, 32 * model.MiB, deadline=enginesuite.dl()).name,
                deadline=enginesuite.dl(),
            )
            assert clone.path is not None
            got.append(blockio.read_at(clone.path, 0, 3))
        pytest.fail(f"a group of two raw block origins was made, of two instants: a={got[0]!r} b={got[1]!r}")
    assert clones == [] and e.get_group("g") == [] and harness.leftovers(e) == []
    enginesuite.check_consistent(e, before=before)
    # one raw origin beside a mounted one: held at one instant, made
    dev = e.activate(
        e.create_volume("c", 32 * model.MiB, deadline=enginesuite.dl()).name, deadline=enginesuite.dl()
    )
    assert dev.path is not None
    harness.mount_new_fs(dev.path)
    made = e.create_group_snapshot("h", [("h-c", "c"), ("h-a", "a")], deadline=enginesuite.dl())
    assert [d.name for d in made] == ["h-c", "h-a"] and harness.frozen_mounts() == []


def test_a_stale_group_resolved_later_keeps_a_freeze_someone_made_since(
    harness: enginesuite.Harness,
) -> None:
    """A group whose undo failed after it had let go (a member's delete failed) stays open, and the
    next fenced call resolves it. Its origins were thawed long ago; an operator has frozen one since
    (fsfreeze, for a backup of their own). Resolving the group must not end that freeze: the backend
    lets go only of what it holds, or failed to let go of (a restart's assemble thaws the rest)."""
    e = harness.open()
    mounts = []
    for name in ("a", "b"):
        dev = e.activate(
            e.create_volume(name, 32 * model.MiB, deadline=enginesuite.dl()).name, deadline=enginesuite.dl()
        )
        assert dev.path is not None
        mounts.append(harness.mount_new_fs(dev.path))
    failed: list[str] = []

    def fail(point: str) -> None:
        if (
            point in ("create_group_snapshot/fence", "create_group_snapshot/undo:create_snap")
            and point not in failed
        ):
            failed.append(point)
            raise enginesuite.InjectedFault(point)

    with enginesuite.hooked(fail), pytest.raises(enginesuite.InjectedFault):
        e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=enginesuite.dl())
    assert [i.op for i in e.intents()] == ["create_group_snapshot"], "the failed undo leaves it open"
    assert harness.frozen_mounts() == []
    fd = os.open(mounts[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, enginesuite.FIFREEZE, 0)
        try:
            e.create_volume("c", 2 * model.MiB, deadline=enginesuite.dl())  # resolves the group first
            assert e.intents() == [] and e.get_group("g") == []
            assert harness.frozen_mounts() == [mounts[0]], "the operator's freeze was ended"
        finally:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, enginesuite.FITHAW, 0)
    finally:
        os.close(fd)


def test_a_filesystem_thawed_by_someone_else_during_the_hold_fails_the_group(
    harness: enginesuite.Harness,
) -> None:
    """A mount we do not own: someone else may end our freeze (`fsfreeze -u`, or a backup tool whose
    own freeze failed EBUSY cleaning up) while the group holds it; the kernel keeps no count of who
    froze. Writes then go on between the freeze and the clone, and the member is not of the group's
    instant: the group must fail (and be undone), not be reported as one instant."""
    e = harness.open()
    mounts = []
    for name in ("a", "b"):
        dev = e.activate(
            e.create_volume(name, 32 * model.MiB, deadline=enginesuite.dl()).name, deadline=enginesuite.dl()
        )
        assert dev.path is not None
        mounts.append(harness.mount_new_fs(dev.path))
    before = enginesuite.committed(e)
    thawed: list[str] = []

    def thaw_and_write(point: str) -> None:  # right before the first member's clone
        if point == "reflink:create_snap/frozen" and not thawed:
            thawed.append(point)
            fd = os.open(mounts[0], os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.ioctl(fd, enginesuite.FITHAW, 0)
            finally:
                os.close(fd)
            with open(os.path.join(mounts[0], "after"), "wb") as f:
                f.write(b"written while the group held")
                os.fsync(f.fileno())

    with (
        enginesuite.hooked(thaw_and_write),
        pytest.raises(errors.Unavailable, match="thawed by someone else"),
    ):
        e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=enginesuite.dl())
    assert thawed and e.get_group("g") == [] and harness.frozen_mounts() == []
    enginesuite.check_consistent(e, before=before)
