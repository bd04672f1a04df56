"""The trim schedule and runs (csi_thin.node.trim) with a fake clock, a fake engine and a fake fstrim:
jitter bounds, the next run, never two at once, a failure logged and counted in the metric."""

from __future__ import annotations

import logging
import os
import pathlib
import random
import threading
from collections.abc import Callable

import pytest

from csi_thin import config, errors, metrics, model
from csi_thin import deadline as deadline_mod
from csi_thin.node import mountinfo, trim, volumes
from tests.unit import fake_engine

H = 3600.0
T0 = 1_800_000_000.0  # wall-clock seconds at the fake clock's start
MiB = model.MiB


class FakeClock:
    """Time moves only when the scheduler waits; every wait is recorded."""

    def __init__(self, now: float = T0) -> None:
        self.t = now
        self.waits: list[float] = []
        self.stopped = False

    def now(self) -> float:
        return self.t

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        if self.stopped:  # like the real one: a stopped clock returns at once
            return True
        self.t += max(0.0, seconds)
        return False

    def stop(self) -> None:
        self.stopped = True


class FakeFs:
    """fstrim of fake filesystems: each gives `per_fs` bytes back to the engine's pool."""

    def __init__(self, engine: fake_engine.FakeEngine, *, per_fs: int = 50 * MiB) -> None:
        self.engine = engine
        self.per_fs = per_fs
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.inside = 0
        self.most_inside = 0
        self.gate: threading.Event | None = None  # set: a trim blocks until it is set
        self.entered = threading.Event()

    def __call__(self, mount_point: str, device: str, *, deadline: deadline_mod.Deadline) -> int:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(10)
            self.calls.append(mount_point)
            if mount_point in self.fail:
                raise errors.CommandFailed(
                    ["fstrim", "-v", mount_point], 1, "the discard operation is not supported"
                )
            self.engine.data_used -= self.per_fs
            return self.per_fs * 2  # a filesystem discards more than the pool had mapped
        finally:
            self.inside -= 1


def _staged(names: list[str]) -> object:
    return lambda _engine: [
        trim.Staged(volume=n, mount_point=f"/staging/{n}", device=f"/dev/fake-{n}") for n in names
    ]


def _trimmer(
    tmp_path: pathlib.Path,
    engine: fake_engine.FakeEngine,
    fs: Callable[..., int],
    mounts: list[str],
    clock: FakeClock,
    *,
    gone: frozenset[str] = frozenset(),
    claims: volumes.Claims | None = None,
) -> trim.Trimmer:
    return trim.Trimmer(
        engine=engine,
        pool="p1",
        state_dir=str(tmp_path / "state"),
        fstrim=fs,
        filesystems=_staged(mounts),  # type: ignore[arg-type]
        now=clock.now,
        still_mounted=lambda fs: fs.mount_point not in gone,
        claim=claims.claim if claims else None,
    )


@pytest.fixture
def engine() -> fake_engine.FakeEngine:
    e = fake_engine.FakeEngine()
    e.data_used = 1000 * MiB
    return e


CFG = config.TrimConfig(interval_seconds=24 * H, jitter_seconds=1 * H)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_the_first_run_comes_an_interval_after_the_start_plus_a_share_of_the_jitter(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine, share: float
) -> None:
    clock = FakeClock()
    fs = FakeFs(engine)
    sched = trim.Scheduler(
        _trimmer(tmp_path, engine, fs, ["a"], clock),
        CFG,
        clock=clock,
        uniform=lambda lo, hi: lo + share * (hi - lo),
    )
    result = sched.step()
    assert clock.waits == [24 * H + share * H]
    assert result is not None and result.started_at == T0 + 24 * H + share * H
    assert fs.calls == ["/staging/a"]


def test_jitter_stays_within_its_bounds(tmp_path: pathlib.Path, engine: fake_engine.FakeEngine) -> None:
    """With the real random source: every plan falls in [interval, interval + jitter] after the last
    run, and the spread is real (nodes do not all trim at the same minute)."""
    clock = FakeClock()
    rng = random.Random(12)
    sched = trim.Scheduler(
        _trimmer(tmp_path, engine, FakeFs(engine), [], clock), CFG, clock=clock, uniform=rng.uniform
    )
    last = model.TrimStats(runs=1, last_finished_at=T0)
    plans = [sched.next_at(last) - T0 for _ in range(500)]
    assert all(24 * H <= p <= 25 * H for p in plans)
    assert max(plans) - min(plans) > 0.9 * H


def test_the_next_run_follows_the_last_and_a_restart_keeps_the_plan(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine
) -> None:
    clock = FakeClock()
    fs = FakeFs(engine)
    trimmer = _trimmer(tmp_path, engine, fs, ["a"], clock)
    half = trim.Scheduler(trimmer, CFG, clock=clock, uniform=lambda lo, hi: (lo + hi) / 2)
    first = half.step()
    assert first is not None
    # the plan is recorded for `pool status`, and from the run's end
    half.stop()
    assert half.step() is None  # stopped while waiting: no run
    planned = trimmer.stats().next_at
    assert planned == first.finished_at + 24 * H + 0.5 * H
    # a manual run (`pool trim`) meanwhile leaves the schedule's plan as it is
    trimmer.run(deadline=deadline_mod.Deadline.after(5))
    assert trimmer.stats().next_at == planned and trimmer.stats().runs == 2
    # a restarted process (another scheduler, another share) keeps the recorded plan
    clock.stopped = False
    again = trim.Scheduler(trimmer, CFG, clock=clock, uniform=lambda lo, hi: hi)
    assert again.next_at(trimmer.stats()) == planned
    # overdue (the node was down when it was due): only a share of the jitter from now
    clock.t = planned + 5 * H
    assert again.next_at(trimmer.stats()) == clock.t + H
    second = again.step()
    assert second is not None and second.started_at == planned + 6 * H
    assert trimmer.stats().runs == 3


def test_a_run_adds_what_the_pool_gave_back_to_the_totals(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine
) -> None:
    clock = FakeClock()
    fs = FakeFs(engine, per_fs=30 * MiB)
    trimmer = _trimmer(tmp_path, engine, fs, ["a", "b"], clock)
    for _ in range(2):
        result = trimmer.run(deadline=deadline_mod.Deadline.after(5))
        assert result.ok and result.filesystems == 2
        assert result.reclaimed_bytes == 60 * MiB and result.trimmed_bytes == 120 * MiB
    stats = trim.read_stats(str(tmp_path / "state"))
    assert (stats.runs, stats.failed_runs, stats.reclaimed_bytes, stats.trimmed_bytes) == (
        2,
        0,
        120 * MiB,
        240 * MiB,
    )
    assert stats.last_reclaimed_bytes == 60 * MiB and stats.last_filesystems == 2


def test_a_pool_that_fills_meanwhile_is_no_negative_reclaim(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine
) -> None:
    clock = FakeClock()
    fs = FakeFs(engine, per_fs=-10 * MiB)  # another writer outgrew what the trim gave back
    result = _trimmer(tmp_path, engine, fs, ["a"], clock).run(deadline=deadline_mod.Deadline.after(5))
    assert result.reclaimed_bytes == 0


def test_never_two_at_once_on_one_pool(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A manual trim runs (its fstrim blocked); a second trimmer of the same pool (another process's,
    or the schedule) is refused and its fstrim never entered; the schedule skips its turn."""
    clock = FakeClock()
    fs = FakeFs(engine)
    fs.gate = threading.Event()
    manual = _trimmer(tmp_path, engine, fs, ["a"], clock)
    other = _trimmer(tmp_path, engine, fs, ["a"], clock)
    results: list[trim.Result] = []
    runner = threading.Thread(
        target=lambda: results.append(manual.run(deadline=deadline_mod.Deadline.after(10)))
    )
    runner.start()
    try:
        assert fs.entered.wait(10)
        with pytest.raises(errors.OperationPending, match="already running"):
            other.run(deadline=deadline_mod.Deadline.after(5))
        sched = trim.Scheduler(other, CFG, clock=clock, uniform=lambda lo, hi: lo)
        with caplog.at_level(logging.INFO, logger="csi_thin.node.trim"):
            assert sched.step() is None
        assert "event=trim-skipped" in caplog.text
    finally:
        fs.gate.set()
        runner.join(10)
    assert fs.most_inside == 1 and fs.calls == ["/staging/a"]
    assert len(results) == 1 and manual.stats().runs == 1
    # the lock is let go: the next run goes ahead
    assert other.run(deadline=deadline_mod.Deadline.after(5)).ok


def test_a_failed_filesystem_is_logged_counted_and_the_others_still_trimmed(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    fs = FakeFs(engine)
    fs.fail.add("/staging/b")
    trimmer = _trimmer(tmp_path, engine, fs, ["a", "b", "c"], clock)
    m = metrics.Metrics()
    m.attach_trim("p1", trimmer.stats)
    sched = trim.Scheduler(trimmer, CFG, clock=clock, uniform=lambda lo, hi: lo)
    with caplog.at_level(logging.WARNING, logger="csi_thin.node.trim"):
        result = sched.step()
    assert result is not None and not result.ok
    assert fs.calls == ["/staging/a", "/staging/b", "/staging/c"]
    assert len(result.failures) == 1 and result.failures[0].startswith("/staging/b: ")
    assert "the discard operation is not supported" in result.failures[0]
    assert "event=trim-failed pool=p1 mount=/staging/b" in caplog.text
    assert result.reclaimed_bytes == 100 * MiB
    assert (
        m.registry.get_sample_value("csi_thin_pool_trim_runs_total", {"pool": "p1", "result": "failed"}) == 1
    )
    assert m.registry.get_sample_value("csi_thin_pool_trim_runs_total", {"pool": "p1", "result": "ok"}) == 0
    assert m.registry.get_sample_value("csi_thin_pool_reclaimed_bytes_total", {"pool": "p1"}) == 100 * MiB
    assert trimmer.stats().last_error.startswith("/staging/b: ")
    # the next run comes at the usual time, not sooner: no retry storm against a device that cannot discard
    fs.fail.clear()
    assert sched.step() is not None
    assert clock.waits[-1] == pytest.approx(24 * H)
    assert m.registry.get_sample_value("csi_thin_pool_trim_runs_total", {"pool": "p1", "result": "ok"}) == 1
    assert (
        m.registry.get_sample_value("csi_thin_pool_trim_last_run_timestamp_seconds", {"pool": "p1"})
        == clock.t
    )


def test_a_pool_that_cannot_report_is_a_failed_run(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine
) -> None:
    clock = FakeClock()
    fs = FakeFs(engine)
    trimmer = _trimmer(tmp_path, engine, fs, ["a"], clock)

    def gone(*, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        raise errors.Unavailable("pool p1 is not assembled")

    engine.status = gone  # type: ignore[method-assign]
    sched = trim.Scheduler(trimmer, CFG, clock=clock, uniform=lambda lo, hi: lo)
    assert sched.step() is None
    stats = trimmer.stats()
    assert stats.runs == 1 and stats.failed_runs == 1 and "not assembled" in stats.last_error
    assert fs.calls == []


def test_stop_ends_the_schedule_promptly(tmp_path: pathlib.Path, engine: fake_engine.FakeEngine) -> None:
    trimmer = _trimmer(tmp_path, engine, FakeFs(engine), ["a"], FakeClock())
    sched = trim.Scheduler(trimmer, CFG)  # the real clock: the first run is a day away
    sched.start()
    sched.stop()
    assert sched._thread is not None and not sched._thread.is_alive()
    assert trimmer.stats().runs == 0 and trimmer.stats().next_at is not None


def _mount(line_dev: str, mount_point: str, opts: str = "rw") -> mountinfo.Mount:
    return mountinfo.parse_line(f"36 25 {line_dev} / {mount_point} {opts},relatime shared:1 - ext4 /dev/x rw")


def test_staged_filesystems_one_read_write_mount_per_active_volume() -> None:
    """/dev/null stands in for an active volume's device node (1:3)."""
    dev = model.Device(
        name="v1",
        dev_id=1,
        kind=model.DeviceKind.VOLUME,
        state=model.DeviceState.READY,
        size_bytes=MiB,
        origin=None,
        created_at=0.0,
        active=True,
        path="/dev/null",
    )
    inactive = model.Device(**{**dev.__dict__, "name": "v2", "active": False})
    snap = model.Device(**{**dev.__dict__, "name": "s1", "kind": model.DeviceKind.SNAPSHOT})
    mounts = [
        _mount("1:3", "/ro-first", "ro"),
        _mount("1:3", "/staging/v1"),
        _mount("1:3", "/pods/p/volume"),  # a publish: a bind of the same filesystem
        _mount("8:1", "/other"),
    ]
    assert trim.staged_filesystems([dev, inactive, snap], mounts) == [
        trim.Staged(volume="v1", mount_point="/staging/v1", device="/dev/null")
    ]
    assert trim.staged_filesystems([dev], [_mount("1:3", "/ro", "ro")]) == []


@pytest.mark.parametrize("super_options", ["ro,errors=remount-ro", "rw,errors=remount-ro,emergency_ro"])
def test_a_filesystem_that_went_read_only_by_itself_is_not_trimmed(super_options: str) -> None:
    """ext4 with errors=remount-ro that hit an error keeps its mount "rw" and marks only its
    superblock read-only (6.18: `emergency_ro`); fstrim still discards there (seen: 181.9 MiB
    trimmed after /sys/fs/ext4/<dev>/trigger_fs_error), guided by the block bitmaps of a filesystem
    that has just reported itself corrupt. Its blocks are fsck's to judge, not discard's."""
    dev = model.Device(
        name="v1",
        dev_id=1,
        kind=model.DeviceKind.VOLUME,
        state=model.DeviceState.READY,
        size_bytes=MiB,
        origin=None,
        created_at=0.0,
        active=True,
        path="/dev/null",
    )
    broken = mountinfo.parse_line(
        f"36 25 1:3 / /staging/v1 rw,relatime shared:1 - ext4 /dev/x {super_options}"
    )
    assert trim.staged_filesystems([dev], [broken]) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, config.TrimConfig()),
        (
            {"interval": "12h", "jitter": "30m"},
            config.TrimConfig(interval_seconds=12 * H, jitter_seconds=1800),
        ),
        ({"enabled": False}, config.TrimConfig(enabled=False)),
    ],
)
def test_trim_config(raw: dict[str, object] | None, expected: config.TrimConfig) -> None:
    base: dict[str, object] = {
        "name": "p1",
        "backend": "reflink",
        "state_dir": "/s",
        "reflink": {"directory": "/d"},
    }
    if raw is not None:
        base["trim"] = raw
    assert config.pool_from_dict(base).trim == expected


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"interval": "10s"}, "at least 60s"),
        ({"interval": "1h", "jitter": "2h"}, "must not exceed"),
        ({"every": "1h"}, "unknown trim keys"),
        ({"enabled": "no"}, "true or false"),
        ("daily", "expected a mapping"),
        ({"interval": "soon"}, "duration"),
    ],
)
def test_trim_config_rejects(raw: object, needle: str) -> None:
    base = {
        "name": "p1",
        "backend": "reflink",
        "state_dir": "/s",
        "reflink": {"directory": "/d"},
        "trim": raw,
    }
    with pytest.raises(errors.InvalidArgument, match=needle):
        config.pool_from_dict(base)


def test_unreadable_totals_are_reported(tmp_path: pathlib.Path) -> None:
    (tmp_path / trim.STATS_FILE).write_text('{"v": 99}')
    with pytest.raises(errors.Internal, match="not a version 1"):
        trim.read_stats(str(tmp_path))
    assert trim.read_stats(str(tmp_path / "none")) == model.TrimStats()


def test_a_volume_being_staged_or_unstaged_is_left_to_the_next_run(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine
) -> None:
    """The node service's claim: a volume it works on is skipped (not a failure); a volume unstaged
    between the look and the claim is not trimmed (fstrim there would trim the filesystem under the
    empty staging directory); while a trim holds a volume, the node service's call is ABORTED."""
    claims = volumes.Claims()
    fs = FakeFs(engine)
    inside: list[str] = []

    def fstrim(mount_point: str, device: str, *, deadline: deadline_mod.Deadline) -> int:
        with pytest.raises(errors.OperationPending), claims.claim(mount_point.rsplit("/", 1)[1]):
            pass  # an unstage now is told to retry
        inside.append(mount_point)
        return fs(mount_point, device, deadline=deadline)

    trimmer = _trimmer(
        tmp_path, engine, fstrim, ["a", "b", "c"], FakeClock(), gone=frozenset({"/staging/c"}), claims=claims
    )
    with claims.claim("b"):  # an unstage of b runs
        result = trimmer.run(deadline=deadline_mod.Deadline.after(5))
    assert result.ok and result.filesystems == 1
    assert inside == ["/staging/a"]
    with claims.claim("a"):
        pass  # let go after the trim


def test_unreadable_totals_do_not_stop_the_schedule(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine
) -> None:
    """A trim.json this version cannot read (a newer driver's, a damaged one) is reported by `pool
    status`, but the pool's space matters more than the count: the run still comes at its time,
    and the totals start again from this run."""
    clock = FakeClock()
    fs = FakeFs(engine)
    trimmer = _trimmer(tmp_path, engine, fs, ["a"], clock)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / trim.STATS_FILE).write_text('{"v": 99}')
    sched = trim.Scheduler(trimmer, CFG, clock=clock, uniform=lambda lo, hi: lo)
    result = sched.step()
    assert result is not None and fs.calls == ["/staging/a"]
    stats = trimmer.stats()
    assert stats.runs == 1 and stats.reclaimed_bytes == 50 * MiB


def test_totals_that_cannot_be_written_neither_stop_the_schedule_nor_repeat_the_run(
    tmp_path: pathlib.Path, engine: fake_engine.FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state dir's filesystem is full (on reflink it may be the pool's own, which a trim would
    relieve): the run still trims, its result is returned, and the next run comes an interval
    later, not at once: what the schedule did is kept in memory when it cannot be written."""

    def full(state_dir: str, stats: model.TrimStats) -> None:
        raise OSError(28, "No space left on device")

    clock = FakeClock()
    fs = FakeFs(engine)
    trimmer = _trimmer(tmp_path, engine, fs, ["a"], clock)
    monkeypatch.setattr(trim, "_write_stats", full)
    sched = trim.Scheduler(trimmer, CFG, clock=clock, uniform=lambda lo, hi: lo)
    first = sched.step()
    assert first is not None and fs.calls == ["/staging/a"]
    second = sched.step()
    assert second is not None and second.started_at == first.finished_at + 24 * H
    assert clock.waits[-1] == 24 * H


def test_a_short_write_of_the_totals_leaves_the_old_record(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a nearly full filesystem write(2) writes part of the body and returns its count, without
    an error: the rest must be written (and fail with ENOSPC), never renamed into place torn."""
    state = str(tmp_path)
    trim._write_stats(state, model.TrimStats(runs=3))
    real_write = os.write
    calls = 0

    def nearly_full(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, bytes(data)[: len(data) // 2])

    monkeypatch.setattr(os, "write", nearly_full)
    with pytest.raises(OSError):
        trim._write_stats(state, model.TrimStats(runs=4))
    monkeypatch.undo()
    assert trim.read_stats(state).runs == 3
    # and nothing half-written stays behind (`pool destroy` removes the state dir only when empty)
    assert sorted(os.listdir(state)) == [trim.STATS_FILE]


def test_a_block_volume_is_the_workloads_to_trim() -> None:
    """A raw block volume whose filesystem the workload made and mounted where the node plugin
    sees it (a privileged pod's mount propagated to the host, an operator looking into it): not
    the driver's to fstrim, nor to hold busy while it does."""
    dev = model.Device(
        name="v1",
        dev_id=1,
        kind=model.DeviceKind.VOLUME,
        state=model.DeviceState.READY,
        size_bytes=MiB,
        origin=None,
        created_at=0.0,
        active=True,
        path="/dev/null",
        attributes=model.attributes({model.ATTR_ACCESS_TYPE: "block"}),
    )
    assert trim.staged_filesystems([dev], [_mount("1:3", "/var/lib/kubelet/pods/p/mnt")]) == []
