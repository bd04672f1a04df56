"""Space given back to the pool: trim the filesystems staged from it, now or on a schedule.

A thin pool fills up although the filesystems on it are mostly empty: a deleted file's blocks stay
mapped in the thin device (or allocated in the reflink device's file) until the filesystem tells the
block device they are free. `fstrim` does that for every free extent; the layers below turn it into
space: a dm-thin device unmaps the blocks from the pool (and the pool passes the discard down to its
data device when `discard_passdown` is on), a loop device punches holes in its sparse file.

Which filesystems: this pool's active volumes (engine records) whose device is mounted read-write
(/proc/self/mountinfo), one mount point each (a publish is a bind of the staged mount: the same
filesystem). Block volumes are the workload's to trim; read-only mounts have nothing deleted; a
filesystem gone read-only after an error (only its superblock says so) is fsck's, not fstrim's.

Never two at once on one pool: a run holds an flock on `<state_dir>/trim.lock` (across processes,
so `csi-thin pool trim` and the node's schedule exclude each other; flocks on two opens exclude each
other inside one process too); the loser gets OperationPending. The totals (model.TrimStats) live in
`<state_dir>/trim.json`, written only under that lock (write to a temporary file, fsync, rename), so
`pool status` and the metrics read them from any process.

The schedule (`Scheduler`): a run starts `interval` after the last one finished (the first: after
the first start) plus a random share of `jitter` (nodes restarted together spread out). The plan is
recorded, so a restart does not postpone it; an overdue run waits only its share of the jitter.
A failed run (a filesystem fstrim refused) is logged and counted in the totals, and the next run
comes at the usual time: no retry storm against a device that cannot discard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from csi_thin import config, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.node import filesystem, mountinfo

log = logging.getLogger(__name__)

LOCK_FILE = "trim.lock"
STATS_FILE = "trim.json"
#: a scheduled run's budget for all its filesystems (fstrim of a big, fragmented one takes minutes)
RUN_SECONDS = 3600.0
#: how long the node's shutdown waits for a run in flight (its fstrim is killed at the run deadline)
STOP_SECONDS = 10.0
_STATS_VERSION = 1


class Engine(Protocol):
    """The part of `csi_thin.pool.engine.PoolEngine` a trim reads."""

    def list(self, *, kind: model.DeviceKind | None = None) -> list[model.Device]: ...
    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus: ...


@dataclasses.dataclass(frozen=True)
class Result:
    started_at: float
    finished_at: float
    filesystems: int  # trimmed (a volume staged or unstaged right then is left to the next run)
    trimmed_bytes: int
    reclaimed_bytes: int
    failures: tuple[str, ...]  # "<mount point>: <why>", one per filesystem fstrim refused

    @property
    def ok(self) -> bool:
        return not self.failures


# ---- the persisted totals ------------------------------------------------------------------------


def read_stats(state_dir: str) -> model.TrimStats:
    """The totals so far (all zero before the first run). A file this version cannot read is
    reported, not guessed at."""
    try:
        with open(os.path.join(state_dir, STATS_FILE), encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return model.TrimStats()
    except (OSError, ValueError) as exc:
        raise errors.Internal(f"{state_dir}/{STATS_FILE}: unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("v") != _STATS_VERSION:
        raise errors.Internal(f"{state_dir}/{STATS_FILE}: not a version {_STATS_VERSION} trim record")
    names = {f.name for f in dataclasses.fields(model.TrimStats)}
    try:
        return model.TrimStats(**{k: v for k, v in raw.items() if k in names})
    except TypeError as exc:
        raise errors.Internal(f"{state_dir}/{STATS_FILE}: {exc}") from exc


def _write_stats(state_dir: str, stats: model.TrimStats) -> None:
    """Replace the totals atomically: a reader sees the old record or the new one, never half."""
    path = os.path.join(state_dir, STATS_FILE)
    tmp = f"{path}.tmp"
    body: dict[str, Any] = {"v": _STATS_VERSION, **dataclasses.asdict(stats)}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            # a regular file's write(2) may write part and return its count (nearly full): the
            # rest is written too, and fails with ENOSPC, rather than a torn record renamed in
            rest = memoryview(json.dumps(body, sort_keys=True).encode())
            while rest:
                rest = rest[os.write(fd, rest) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        # no half record left behind (`pool destroy` removes the state dir only when it is empty)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _exclusive(state_dir: str, pool: str) -> Iterator[None]:
    """Hold the pool's trim lock, or OperationPending when a trim of this pool runs already."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.OperationPending(f"a trim of pool {pool} is already running") from None
        yield
    finally:
        os.close(fd)


# ---- which filesystems -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Staged:
    volume: str
    mount_point: str
    device: str


def staged_filesystems(devices: list[model.Device], mounts: list[mountinfo.Mount]) -> list[Staged]:
    """One read-write mount point per active volume whose filesystem is mounted (the first in
    mountinfo: the staging mount, publishes are binds of it)."""
    by_dev: dict[int, str] = {}
    for m in mounts:
        # a filesystem that went read-only by itself reported an error: its free-space bitmaps are
        # fsck's to judge, and fstrim would still discard by them (ext4 does)
        if m.writable:
            by_dev.setdefault(m.dev, m.mount_point)
    found: list[Staged] = []
    for d in devices:
        if d.kind != model.DeviceKind.VOLUME or not d.active or not d.path:
            continue
        if dict(d.attributes).get(model.ATTR_ACCESS_TYPE) == "block":
            continue  # a filesystem on it is the workload's, wherever it is mounted
        try:
            rdev = os.stat(d.path).st_rdev
        except FileNotFoundError:
            continue  # deactivated meanwhile
        if rdev in by_dev:
            found.append(Staged(volume=d.name, mount_point=by_dev[rdev], device=d.path))
    return found


def _still_mounted(fs: Staged) -> bool:
    """The staged filesystem is still at its mount point (read again under the volume's claim)."""
    try:
        rdev = os.stat(fs.device).st_rdev
    except FileNotFoundError:
        return False
    m = mountinfo.at(fs.mount_point)
    return m is not None and m.dev == rdev and m.writable


def _staged(engine: Engine) -> list[Staged]:
    return staged_filesystems(engine.list(kind=model.DeviceKind.VOLUME), mountinfo.read())


# ---- one run ---------------------------------------------------------------------------------------


class Trimmer:
    """Trims one pool's staged filesystems and keeps the totals; `run` is the one way to do it."""

    def __init__(
        self,
        *,
        engine: Engine,
        pool: str,
        state_dir: str,
        fstrim: Callable[..., int] = filesystem.trim,
        filesystems: Callable[[Engine], list[Staged]] = _staged,
        now: Callable[[], float] = time.time,
        claim: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
        still_mounted: Callable[[Staged], bool] = _still_mounted,
    ) -> None:
        self._engine = engine
        self._pool = pool
        self._state_dir = state_dir
        self._fstrim = fstrim
        self._filesystems = filesystems
        self._now = now
        #: the node service's per-volume claim (csi_thin.node.volumes.Claims), in the process that
        #: serves CSI: a volume is trimmed only while no stage or unstage runs on it, and the other
        #: way round. A volume claimed meanwhile is skipped (its filesystem may be on its way out:
        #: fstrim on an unmounted staging path would trim the filesystem under it instead).
        self._claim = claim
        self._still_mounted = still_mounted

    @property
    def state_dir(self) -> str:
        return self._state_dir

    def stats(self) -> model.TrimStats:
        return read_stats(self._state_dir)

    def run(
        self,
        *,
        deadline: deadline_mod.Deadline,
        stopping: Callable[[], bool] = lambda: False,
        scheduled: bool = False,
    ) -> Result:
        """Trim every staged filesystem, one after the other; OperationPending when a trim of this
        pool runs already. A filesystem fstrim refuses is a failure of the run (logged, counted),
        not the end of it: the others are still trimmed. `stopping` ends the run between two
        filesystems (the process is shutting down). A `scheduled` run is the planned one: its plan
        is done with; a manual run leaves the schedule's plan as it is."""
        with _exclusive(self._state_dir, self._pool):
            started = self._now()
            try:
                result = self._run(started, deadline=deadline, stopping=stopping)
            except errors.CsiThinError as exc:
                # the pool's status or its records could not be read: a failed run, counted as one
                failed = Result(started, self._now(), 0, 0, 0, (f"pool {self._pool}: {exc.message}",))
                self._record(failed, scheduled=scheduled)
                raise
            self._record(result, scheduled=scheduled)
        log.info(
            "event=trimmed pool=%s filesystems=%d trimmed_bytes=%d reclaimed_bytes=%d failures=%d "
            "seconds=%.3f",
            self._pool,
            result.filesystems,
            result.trimmed_bytes,
            result.reclaimed_bytes,
            len(result.failures),
            result.finished_at - result.started_at,
        )
        return result

    def _run(
        self, started: float, *, deadline: deadline_mod.Deadline, stopping: Callable[[], bool]
    ) -> Result:
        before = self._engine.status(deadline=deadline).data_used_bytes
        mounts = self._filesystems(self._engine)
        done, trimmed, failures = 0, 0, []
        for fs in mounts:
            if stopping():
                failures.append(f"{fs.mount_point}: not trimmed, the node is stopping")
                continue
            try:
                with self._claim(fs.volume) if self._claim else contextlib.nullcontext():
                    if not self._still_mounted(fs):
                        continue  # unstaged between the look and the claim
                    trimmed += self._fstrim(fs.mount_point, fs.device, deadline=deadline)
                    done += 1
            except errors.OperationPending:
                log.info("event=trim-skipped pool=%s volume=%s reason=busy", self._pool, fs.volume)
                continue  # staged or unstaged right now: the next run has it
            except errors.CsiThinError as exc:
                log.warning("event=trim-failed pool=%s mount=%s error=%s", self._pool, fs.mount_point, exc)
                failures.append(f"{fs.mount_point}: {exc.message}")
        after = self._engine.status(deadline=deadline).data_used_bytes
        return Result(
            started_at=started,
            finished_at=self._now(),
            filesystems=done,
            trimmed_bytes=trimmed,
            # other writers may fill the pool meanwhile: what is measured is a lower bound
            reclaimed_bytes=max(0, before - after),
            failures=tuple(failures),
        )

    def _totals(self) -> model.TrimStats:
        """The totals to add to (the caller holds the trim lock). A record this version cannot read
        (a newer driver's, a damaged one) starts again from zero, logged: the count is lost, not the
        trims (raising here stopped the schedule for good)."""
        try:
            return read_stats(self._state_dir)
        except errors.CsiThinError as exc:
            log.warning("event=trim-totals-restart pool=%s error=%s", self._pool, exc)
            return model.TrimStats()

    def _save(self, stats: model.TrimStats) -> None:
        """Write the totals (the caller holds the trim lock). A state dir that cannot take them (full:
        on reflink it may be the pool's own filesystem, which this very trim relieves) costs the
        count, not the run; the scheduler remembers its own last run meanwhile."""
        try:
            _write_stats(self._state_dir, stats)
        except OSError as exc:
            log.warning(
                "event=trim-totals-unwritten pool=%s error=%s", self._pool, os.strerror(exc.errno or 0)
            )

    def _record(self, result: Result, *, scheduled: bool) -> None:
        """Add a run to the totals (the caller holds the trim lock)."""
        old = self._totals()
        self._save(
            dataclasses.replace(
                old,
                runs=old.runs + 1,
                failed_runs=old.failed_runs + (0 if result.ok else 1),
                trimmed_bytes=old.trimmed_bytes + result.trimmed_bytes,
                reclaimed_bytes=old.reclaimed_bytes + result.reclaimed_bytes,
                last_started_at=result.started_at,
                last_finished_at=result.finished_at,
                last_filesystems=result.filesystems,
                last_reclaimed_bytes=result.reclaimed_bytes,
                last_error="; ".join(result.failures),
                # the scheduler plans the next run right after its own
                next_at=None if scheduled else old.next_at,
            ),
        )

    def plan(self, at: float) -> None:
        """Record when the next scheduled run is due (for `pool status`); skipped while a run holds
        the lock: that run's totals must not be overwritten, and the plan is made again after it."""
        with contextlib.suppress(errors.OperationPending), _exclusive(self._state_dir, self._pool):
            self._save(dataclasses.replace(self._totals(), next_at=at))


# ---- the schedule ----------------------------------------------------------------------------------


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds (the totals' timestamps outlive the process)."""
        ...

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the scheduler was stopped meanwhile."""
        ...

    def stop(self) -> None: ...


class SystemClock:
    def __init__(self) -> None:
        self._stopped = threading.Event()

    def now(self) -> float:
        return time.time()

    def wait(self, seconds: float) -> bool:
        return self._stopped.wait(max(0.0, seconds))

    def stop(self) -> None:
        self._stopped.set()


class Scheduler:
    """Runs the trimmer at the configured times until stopped (one thread)."""

    def __init__(
        self,
        trimmer: Trimmer,
        cfg: config.TrimConfig,
        *,
        clock: Clock | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._trimmer = trimmer
        self._cfg = cfg
        self._clock = clock or SystemClock()
        self._uniform = uniform
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: when this scheduler's last run ended: the totals may not have recorded it (see Trimmer._save)
        self._ran_at: float | None = None

    def next_at(self, stats: model.TrimStats) -> float:
        """When the next run starts. A plan an earlier process recorded stands (a restart does not
        postpone a run; overdue, it starts after a share of the jitter); otherwise interval after
        the last run (the first: after the process start) plus a share of the jitter."""
        now = self._clock.now()
        share = self._uniform(0.0, self._cfg.jitter_seconds)
        if stats.next_at is not None:
            return stats.next_at if stats.next_at > now else now + share
        since = now if stats.last_finished_at is None else stats.last_finished_at
        return max(since + self._cfg.interval_seconds, now) + share

    def step(self) -> Result | None:
        """Plan the next run, wait for it, run it. None when stopped first, or when the run found a
        trim of this pool already running (`csi-thin pool trim`): its result is the one that counts."""
        try:
            stats = self._trimmer.stats()
        except errors.CsiThinError as exc:  # unreadable totals: plan as if no run had been made
            log.warning("event=trim-stats-unreadable error=%s", exc)
            stats = model.TrimStats()
        if self._ran_at is not None and (stats.last_finished_at or 0.0) < self._ran_at:
            # the totals missed this scheduler's own last run (not written): its plan is stale and
            # overdue, and would start the run again at once
            stats = dataclasses.replace(stats, last_finished_at=self._ran_at, next_at=None)
        due = self.next_at(stats)
        self._trimmer.plan(due)
        log.info("event=trim-planned at=%.0f in_seconds=%.0f", due, due - self._clock.now())
        if self._clock.wait(due - self._clock.now()):
            return None
        try:
            result = self._trimmer.run(
                deadline=deadline_mod.Deadline.after(RUN_SECONDS),
                stopping=self._stopping.is_set,
                scheduled=True,
            )
        except errors.OperationPending as exc:
            log.info("event=trim-skipped reason=%s", exc.message)
            return None
        except errors.CsiThinError as exc:  # counted as a failed run; the next comes at the usual time
            log.warning("event=trim-run-failed error=%s", exc)
            self._ran_at = self._clock.now()
            return None
        self._ran_at = result.finished_at
        return result

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="trim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop planning; a run in flight stops after its current filesystem (waited for up to
        STOP_SECONDS: the engine closes next)."""
        self._stopping.set()
        self._clock.stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_SECONDS)
            if self._thread.is_alive():
                log.warning("event=trim-stop-timeout what=an fstrim still runs")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception:
                # never the end of the schedule: a dead thread would stop trimming until a restart
                log.exception("event=trim-crashed")
                if self._clock.wait(60.0):
                    return
