"""The node agent (Kubernetes mode): this node's ThinVolumes, ThinSnapshots and ThinGroupSnapshots ->
the pool engine.

It follows the CRs whose spec.nodeName is this node (a field selector: no other node's events reach
it) and reconciles each one, one at a time, through the same PoolEngine the CSI Node service uses:

- a live CR without a device: add the finalizer (before the device exists, so the CR cannot vanish
  with a device left behind), create the device (a restore or clone waits until its source is
  ready), write status Ready with the device id and observedGeneration; a domain error is status
  Failed with its gRPC code name (the controller maps it back) and a Warning Event.
- a CR whose device is gone from the pool (its status had a device): Lost, with an Event. Never
  re-created empty: that would hand a workload an empty disk where its data was.
- spec.sizeBytes above the device: grow (status.sizeBytes follows); a failed grow keeps phase Ready
  and reports the code for that generation.
- a CR being deleted: delete the device (absent is done; an active one waits until unstaged), then
  drop the finalizer.
- a ThinGroupSnapshot: once every member ThinSnapshot it names is here (the controller writes them
  first), the finalizer on the group and on each member, then ONE engine mutation cuts every member
  (create_group_snapshot: idempotent, journalled, so a crash anywhere is finished or undone by
  recovery and the retry finds the result); then each member's status Ready, then the group's. A
  member never makes a device of its own; it goes with its group (delete_group_snapshot), and a
  member deleted alone while its group lives is blocked (DeleteBlocked), as CSI asks.

Start-up, before serving the watch: list this node's CRs; if the LMDB store was lost and rebuilt
over the pool (recovery marks it 'adopted' and reserves every pool id as an orphan), give each
orphan id whose CR names it its record back (engine.adopt): the CRs say what is legitimate, nothing
is deleted. Records no CR owns, and pool ids no record owns, are reported in the ThinPool status.

The ThinPool status follows every mutation: each one marks it dirty, and one writer publishes the
latest state at most once per `PUBLISH_INTERVAL` (so a burst of creates is a few writes, not one per
create), never later than that after the mutation; and every `refresh_seconds` anyway (usage grows
as volumes are written, with no mutation here).

Orphans (devices no CR owns: a CR removed by force, an id no CR names after a lost store) are only
reported, until the operator runs `csi-thin pool gc --orphans --node-id N` next to the agent (the
private control socket, csi_thin.node.control): the agent deletes those that have been orphans for
the whole grace period, each after a fresh read from the API server shows that still no CR names it.

Transient failures (a busy name, the API server down, a status conflict) are retried with backoff;
nothing polls: work comes from the watch, retries from a timer queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.kube import watch
from csi_thin.pool import engine as engine_mod

log = logging.getLogger(__name__)

#: how long one reconcile may take (a create or delete on a busy pool)
RECONCILE_SECONDS = 60.0
REFRESH_SECONDS = res.LEGACY_REFRESH_SECONDS
#: a mutation is in the ThinPool status at most this long after it (and the status is written at most
#: this often): GetCapacity follows creates promptly without a write per create
PUBLISH_INTERVAL = 0.25
#: how an orphan pool id (no record owns it) is named in the ThinPool status and gc's report
ID_PREFIX = "id:"
RETRY_FIRST = 0.2
RETRY_CAP = 30.0
#: errors worth retrying as they are; every other domain error is the object's verdict
TRANSIENT = (errors.OperationPending, errors.Unavailable, errors.DeadlineExceeded)

Key = tuple[res.Kind, str]
W = TypeVar("W", res.ThinVolume, res.ThinSnapshot, res.ThinGroupSnapshot)


@dataclasses.dataclass(frozen=True)
class StartReport:
    volumes: int
    snapshots: int
    adopted: tuple[str, ...]
    orphans: tuple[str, ...]
    seconds: float


class _WaitForSource(Exception):
    """A restore or clone whose source is not ready yet: retry later, it is not a failure."""


@dataclasses.dataclass(frozen=True)
class Waiting:
    """An orphan not deleted yet: it has been one for `orphan_seconds` of the grace period."""

    name: str
    orphan_seconds: float
    eligible_in_seconds: float


@dataclasses.dataclass(frozen=True)
class Kept:
    """An orphan that gc did not delete, and why (a CR names it after all; active; an error)."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class GcReport:
    deleted: tuple[str, ...]
    waiting: tuple[Waiting, ...]
    kept: tuple[Kept, ...]
    failed: tuple[Kept, ...]  # the check or the delete failed (the API server down, a deadline)


class Coalescer:
    """Calls `publish` after `mark()`, at most once per `interval`, and every `period` regardless.

    A mark made while a publish runs is published by the next one (the flag is cleared before the
    publish reads anything), so the state published last is never older than the last mark, and a
    mark waits at most `interval` (after a failed publish: a backoff up to RETRY_CAP, so an API
    server that is down is not hammered). `publish` returns False when it failed.
    """

    def __init__(self, publish: Callable[[], bool], *, interval: float, period: float) -> None:
        self._publish = publish
        self._interval = interval
        self._period = period
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def mark(self) -> None:
        self._dirty.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=RECONCILE_SECONDS)

    def _run(self) -> None:
        last = time.monotonic()  # the start-up reconcile has just published
        backoff = 0.0
        while True:
            self._dirty.wait(max(0.0, last + self._period - time.monotonic()))
            pause = last + max(self._interval, backoff) - time.monotonic()
            if self._stop.wait(pause) if pause > 0 else self._stop.is_set():
                return
            self._dirty.clear()
            last = time.monotonic()
            if self._publish_once():
                backoff = 0.0
            else:
                self._dirty.set()
                backoff = min(RETRY_CAP, max(RETRY_FIRST, backoff * 2))

    def _publish_once(self) -> bool:
        """One publish; an unexpected exception is a failed one (retried with backoff), never the
        end of this thread: a dead writer would leave the ThinPool status, and so GetCapacity, stale
        until the process restarts."""
        try:
            return self._publish()
        except Exception:
            log.exception("event=pool-status-crashed")
            return False


class _Queue:
    """Keys to reconcile, each at most once in the queue, some due later (retries)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._seq = itertools.count()
        self.closed = False

    def put(self, key: Key, *, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        with self._cond:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key))
            self._cond.notify()

    def get(self) -> Key | None:
        """The next due key; None once closed."""
        with self._cond:
            while not self.closed:
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier put
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    return key
                self._cond.wait(None if not self._heap else self._heap[0][0] - now)
            return None

    def empty(self) -> bool:
        with self._cond:
            return not self._due

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Agent:
    def __init__(
        self,
        *,
        api: client_mod.Client,
        engine: engine_mod.PoolEngine,
        node: str,
        pool: str,
        overprovision_ratio: float,
        refresh_seconds: float = REFRESH_SECONDS,
        on_error: Callable[[str], None] | None = None,
        on_operation: Callable[[str, str, float], None] | None = None,
        snapshot_metadata_endpoint: str = "",
    ) -> None:
        self._api = api
        #: where this node serves SnapshotMetadata to the controller, published in the ThinPool
        self._snapshot_metadata_endpoint = snapshot_metadata_endpoint
        #: told the resource ("thinvolume", "thinsnapshot", "thinpool") of every failed reconcile
        self._on_error = on_error
        #: told (operation, gRPC code name, seconds) of every pool operation run for a CR
        self._on_operation = on_operation
        self._engine = engine
        self._node = node
        self._pool = pool
        self._ratio = overprovision_ratio
        self._refresh_seconds = refresh_seconds
        self._queue = _Queue()
        self._lock = threading.Lock()  # guards the caches below
        self._volumes: dict[str, res.ThinVolume] = {}
        self._snapshots: dict[str, res.ThinSnapshot] = {}
        self._groups: dict[str, res.ThinGroupSnapshot] = {}
        self._retries: dict[Key, float] = {}
        #: orphan ids that more than one object names (after a lost store): adopted by none
        self._ambiguous: set[int] = set()
        self._status = Coalescer(self._refresh_quietly, interval=PUBLISH_INTERVAL, period=refresh_seconds)
        #: orphan (as in the ThinPool status: a record name or "id:N") -> when this process first saw
        #: it, continuously an orphan since (monotonic). In memory only: a restart restarts the clock
        #: (see gc_orphans)
        self._orphan_since: dict[str, float] = {}
        #: record name -> device id, of the orphan records gc deleted: a CR of that name seen later (a
        #: restore, spec only, made even while gc deleted) is Lost, not given a new empty device.
        #: In memory: a restart forgets them
        self._collected: dict[str, int] = {}
        #: held by each reconcile and by gc around each fresh check and delete: the two never interleave
        self._work_lock = threading.Lock()
        #: set by stop: gc (on the control socket's threads) starts no check or delete after it
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._vol_follower: watch.Follower[res.ThinVolume] = watch.Follower(
            api, res.ThinVolume, node=node, on_object=self._seen_volume, on_list=self._listed_volumes
        )
        self._snap_follower: watch.Follower[res.ThinSnapshot] = watch.Follower(
            api, res.ThinSnapshot, node=node, on_object=self._seen_snapshot, on_list=self._listed_snapshots
        )
        self._group_follower: watch.Follower[res.ThinGroupSnapshot] = watch.Follower(
            api, res.ThinGroupSnapshot, node=node, on_object=self._seen_group, on_list=self._listed_groups
        )
        #: reconciles done, and status or finalizer writes that lost a race (a test or metric reads them)
        self.reconciled = 0
        self.conflicts = 0

    @property
    def pool_object_name(self) -> str:
        return res.pool_object_name(self._node, self._pool)

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self, *, deadline: deadline_mod.Deadline) -> StartReport:
        """Start-up reconcile (list, adopt, reconcile every CR), then follow the watches."""
        t0 = time.monotonic()
        self._ensure_pool_object(deadline=deadline)
        vols = self._vol_follower.list_now(deadline=deadline)
        snaps = self._snap_follower.list_now(deadline=deadline)
        groups = self._group_follower.list_now(deadline=deadline)
        with self._lock:
            self._volumes = {v.name: v for v in vols}
            self._snapshots = {s.name: s for s in snaps}
            self._groups = {g.name: g for g in groups}
        adopted = self._adopt(vols, snaps, deadline=deadline)
        # sources first: plain volumes, then groups and snapshots, then restores and clones
        order: list[Key] = [(res.Kind.VOLUME, v.name) for v in vols if v.spec.source is None]
        order += [(res.Kind.GROUP, g.name) for g in groups]
        order += [(res.Kind.SNAPSHOT, s.name) for s in snaps]
        order += [(res.Kind.VOLUME, v.name) for v in vols if v.spec.source is not None]
        for key in order:
            self._reconcile_key(key)
        self._refresh_pool(deadline=deadline)
        report = StartReport(
            volumes=len(vols),
            snapshots=len(snaps),
            adopted=tuple(adopted),
            orphans=self._orphans(),
            seconds=time.monotonic() - t0,
        )
        log.info(
            "event=agent-started node=%s volumes=%d snapshots=%d adopted=%d orphans=%s seconds=%.3f",
            self._node,
            report.volumes,
            report.snapshots,
            len(report.adopted),
            list(report.orphans),
            report.seconds,
        )
        self._vol_follower.start()
        self._snap_follower.start()
        self._group_follower.start()
        thread = threading.Thread(target=self._work, name="agent-worker", daemon=True)
        thread.start()
        self._threads.append(thread)
        self._status.start()
        return report

    def stop(self) -> None:
        """Stop, and return only when no reconcile or gc uses the engine any more (bounded by
        RECONCILE_SECONDS each): the caller closes the engine and lets go of the pool next."""
        self._stopping.set()
        self._vol_follower.stop()
        self._snap_follower.stop()
        self._group_follower.stop()
        self._queue.close()
        self._status.stop()
        for thread in self._threads:
            thread.join(timeout=RECONCILE_SECONDS)
        # a gc in flight runs on a control socket thread, which nobody joins: wait for the orphan it
        # has in hand (it takes no other once `_stopping` is set)
        if self._work_lock.acquire(timeout=RECONCILE_SECONDS):
            self._work_lock.release()
        else:
            log.error("event=agent-stop-timeout what=a gc or reconcile still holds the pool")

    # ---- watch callbacks -----------------------------------------------------------------------

    def _seen_volume(self, obj: res.ThinVolume, deleted: bool) -> None:
        with self._lock:
            if deleted:
                self._volumes.pop(obj.name, None)
            else:
                self._volumes[obj.name] = obj
                self._orphan_since.pop(obj.name, None)
        if deleted:
            self._status.mark()  # gone without our finalizer (removed by force): its device is an orphan
        else:
            self._queue.put((res.Kind.VOLUME, obj.name))

    def _seen_snapshot(self, obj: res.ThinSnapshot, deleted: bool) -> None:
        with self._lock:
            if deleted:
                self._snapshots.pop(obj.name, None)
            else:
                self._snapshots[obj.name] = obj
                self._orphan_since.pop(obj.name, None)
        if deleted:
            self._status.mark()  # gone without our finalizer (removed by force): its device is an orphan
        else:
            self._queue.put((res.Kind.SNAPSHOT, obj.name))

    def _seen_group(self, obj: res.ThinGroupSnapshot, deleted: bool) -> None:
        with self._lock:
            if deleted:
                self._groups.pop(obj.name, None)
            else:
                self._groups[obj.name] = obj
        if deleted:
            # its members may wait for it to go (a member deleted with its group)
            for m in obj.spec.members:
                self._queue.put((res.Kind.SNAPSHOT, m.snapshot))
        else:
            self._queue.put((res.Kind.GROUP, obj.name))

    def _listed_groups(self, items: list[res.ThinGroupSnapshot]) -> None:
        with self._lock:
            self._groups = {g.name: g for g in items}
        for g in items:
            self._queue.put((res.Kind.GROUP, g.name))

    def _listed_volumes(self, items: list[res.ThinVolume]) -> None:
        with self._lock:
            self._volumes = {v.name: v for v in items}
        for v in items:
            self._queue.put((res.Kind.VOLUME, v.name))
        self._status.mark()  # a relist after a gap: objects gone meanwhile leave orphans

    def _listed_snapshots(self, items: list[res.ThinSnapshot]) -> None:
        with self._lock:
            self._snapshots = {s.name: s for s in items}
        for s in items:
            self._queue.put((res.Kind.SNAPSHOT, s.name))
        self._status.mark()  # a relist after a gap: objects gone meanwhile leave orphans

    # ---- workers -------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            self._reconcile_key(key)

    def _refresh_quietly(self) -> bool:
        try:
            self._refresh_pool(deadline=deadline_mod.Deadline.after(RECONCILE_SECONDS))
        except errors.CsiThinError as exc:
            log.warning("event=pool-status-failed error=%s", exc)
            self._count_error(res.Kind.POOL)
            return False
        return True

    def _reconcile_key(self, key: Key) -> None:
        with self._work_lock:
            self._reconcile_key_locked(key)

    def _reconcile_key_locked(self, key: Key) -> None:
        kind, name = key
        try:
            with self._lock:
                obj = self._cache(kind).get(name)
            if obj is None:
                return  # deleted meanwhile (without our finalizer: it never had a device)
            if isinstance(obj, res.ThinVolume):
                self._reconcile_volume(obj)
            elif isinstance(obj, res.ThinGroupSnapshot):
                self._reconcile_group(obj)
            else:
                self._reconcile_snapshot(obj)
            self._retries.pop(key, None)
            self.reconciled += 1
        except client_mod.Conflict:
            self.conflicts += 1
            self._refetch(key)
            self._queue.put(key)
        except errors.NotFound as exc:
            log.info("event=gone kind=%s name=%s reason=%s", kind.value, name, exc)
            self._refetch(key)
        except (_WaitForSource, *TRANSIENT) as exc:
            self._retry(key, exc)
        except errors.CsiThinError as exc:
            log.warning(
                "event=reconcile-failed kind=%s name=%s code=%s error=%s", kind.value, name, exc.code, exc
            )
            self._count_error(kind)
            self._retry(key, exc)
        except Exception as exc:
            log.exception("event=reconcile-crashed kind=%s name=%s", kind.value, name)
            self._count_error(kind)
            self._retry(key, exc)

    def _cache(
        self, kind: res.Kind
    ) -> dict[str, res.ThinVolume] | dict[str, res.ThinSnapshot] | dict[str, res.ThinGroupSnapshot]:
        if kind == res.Kind.VOLUME:
            return self._volumes
        if kind == res.Kind.GROUP:
            return self._groups
        return self._snapshots

    @contextlib.contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        """Tell on_operation how long a pool operation took and how it ended (its gRPC code)."""
        started = time.monotonic()
        code = "INTERNAL"  # anything that is not a domain error is one
        try:
            yield
            code = "OK"
        except errors.CsiThinError as exc:
            code = exc.code
            raise
        finally:
            if self._on_operation is not None:
                self._on_operation(operation, code, time.monotonic() - started)

    def _count_error(self, kind: res.Kind) -> None:
        if self._on_error is not None:
            self._on_error(kind.value.lower())

    def _retry(self, key: Key, exc: BaseException) -> None:
        delay = min(RETRY_CAP, self._retries.get(key, RETRY_FIRST / 2) * 2)
        self._retries[key] = delay
        log.info("event=requeue kind=%s name=%s in=%.1fs reason=%s", key[0].value, key[1], delay, exc)
        self._queue.put(key, delay=delay)

    def _refetch(self, key: Key) -> None:
        """Read the object again (after a conflict: our cached copy is stale)."""
        kind, name = key
        dl = deadline_mod.Deadline.after(client_mod.READ_SECONDS)
        try:
            if kind == res.Kind.GROUP:
                tg = self._api.find(res.ThinGroupSnapshot, name, deadline=dl)
                with self._lock:
                    if tg is None:
                        self._groups.pop(name, None)
                    else:
                        self._groups[name] = tg
            elif kind == res.Kind.VOLUME:
                tv = self._api.find(res.ThinVolume, name, deadline=dl)
                with self._lock:
                    if tv is None:
                        self._volumes.pop(name, None)
                    else:
                        self._volumes[name] = tv
            else:
                ts = self._api.find(res.ThinSnapshot, name, deadline=dl)
                with self._lock:
                    if ts is None:
                        self._snapshots.pop(name, None)
                    else:
                        self._snapshots[name] = ts
        except errors.CsiThinError as exc:
            self._retry(key, exc)

    def _store(self, obj: res.ThinVolume | res.ThinSnapshot | res.ThinGroupSnapshot) -> None:
        with self._lock:
            if isinstance(obj, res.ThinVolume):
                self._volumes[obj.name] = obj
            elif isinstance(obj, res.ThinGroupSnapshot):
                self._groups[obj.name] = obj
            else:
                self._snapshots[obj.name] = obj

    # ---- reconcile: volumes --------------------------------------------------------------------

    def _reconcile_volume(self, tv: res.ThinVolume) -> None:
        dl = deadline_mod.Deadline.after(RECONCILE_SECONDS)
        if tv.meta.deleting:
            self._finalize(tv, deadline=dl)
            return
        dev = self._engine.get(tv.name) or self._adopt_late(tv, _volume_record(tv), deadline=dl)
        if dev is None:
            if tv.status.device_id or tv.status.phase in (res.Phase.READY, res.Phase.LOST):
                self._lost(tv, "its device is not in the pool (never re-created empty)", deadline=dl)
                return
            if tv.name in self._collected:
                self._lost(tv, self._collected_why(tv.name), deadline=dl)
                return
            if tv.status.phase == res.Phase.FAILED and tv.status.observed_generation >= tv.meta.generation:
                return  # the controller reads the verdict and deletes the object
            tv = self._claim(tv, deadline=dl)
            try:
                dev = self._create_volume(tv, deadline=dl)
            except (_WaitForSource, *TRANSIENT):
                raise
            except errors.CsiThinError as exc:
                self._failed(tv, exc, deadline=dl)
                return
            finally:
                self._status.mark()
        if dev.state == model.DeviceState.LOST:
            self._lost(tv, f"device {dev.dev_id} is not in the pool (never re-created empty)", deadline=dl)
            return
        if dev.state != model.DeviceState.READY:
            raise errors.OperationPending(f"{tv.name} is {dev.state.value}")
        tv = self._with_finalizer(tv, deadline=dl)
        dev, code, message = self._grow(tv, dev, deadline=dl)
        self._put_volume_status(
            tv,
            dataclasses.replace(
                tv.status,
                phase=res.Phase.READY,
                code=code,
                message=message,
                size_bytes=dev.size_bytes,
                device_id=dev.dev_id,
                created_at=dev.created_at,
                observed_generation=tv.meta.generation,
            ),
            deadline=dl,
        )

    def _grow(
        self, tv: res.ThinVolume, dev: model.Device, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Device, str, str]:
        """Grow the device to the spec; a refusal is (device, code, message) for the status."""
        if tv.spec.size_bytes <= dev.size_bytes:
            return dev, "", ""
        try:
            with self._timed("grow"):
                return self._engine.grow(tv.name, tv.spec.size_bytes, deadline=deadline), "", ""
        except TRANSIENT:
            raise
        except errors.CsiThinError as exc:
            self._event(tv, "GrowFailed", exc.message, deadline=deadline)
            return dev, exc.code, exc.message
        finally:
            self._status.mark()

    def _create_volume(self, tv: res.ThinVolume, *, deadline: deadline_mod.Deadline) -> model.Device:
        attrs = {model.ATTR_ACCESS_TYPE: tv.spec.access_type.value}
        if tv.spec.fs_type:
            attrs[model.ATTR_FS_TYPE] = tv.spec.fs_type
        if tv.spec.source is None:
            with self._timed("create_volume"):
                return self._engine.create_volume(
                    tv.name, tv.spec.size_bytes, deadline=deadline, attributes=attrs
                )
        source = tv.spec.source.name
        self._require_source(source, res.ThinSnapshot if tv.spec.source.snapshot else res.ThinVolume)
        with self._timed("clone"):
            return self._engine.clone(
                tv.name, source, tv.spec.size_bytes, deadline=deadline, attributes=attrs
            )

    def _require_source(self, name: str, cls: type[res.ThinVolume] | type[res.ThinSnapshot]) -> None:
        dev = self._engine.get(name)
        if dev is not None and dev.state == model.DeviceState.READY:
            return
        with self._lock:
            cr = (self._snapshots if cls is res.ThinSnapshot else self._volumes).get(name)
        if cr is None or cr.meta.deleting:
            raise errors.NotFound(f"source {name!r} does not exist on node {self._node}")
        if cr.status.phase in (res.Phase.FAILED, res.Phase.LOST):
            raise errors.FailedPrecondition(f"source {name!r} is {cr.status.phase.value}")
        raise _WaitForSource(f"source {name!r} is not ready yet")

    def _put_volume_status(
        self, tv: res.ThinVolume, status: res.VolumeStatus, *, deadline: deadline_mod.Deadline
    ) -> None:
        status = dataclasses.replace(status, conditions=self._conditions(tv.status.conditions, status))
        if status == tv.status:
            return
        self._store(self._api.put_status(tv, status.to_dict(), deadline=deadline))

    @staticmethod
    def _conditions(old: tuple[res.Condition, ...], status: res.VolumeStatus) -> tuple[res.Condition, ...]:
        ready = status.phase == res.Phase.READY and not status.code
        reason = status.code or status.phase.value
        previous = next((c for c in old if c.type == "Ready"), None)
        cond = res.Condition(
            type="Ready",
            status="True" if ready else "False",
            reason="".join(p.capitalize() for p in reason.split("_")),
            message=status.message,
            observed_generation=status.observed_generation,
            last_transition_time=(
                previous.last_transition_time
                if previous is not None and previous.status == ("True" if ready else "False")
                else client_mod.now()
            ),
        )
        return (cond,)

    # ---- reconcile: snapshots ------------------------------------------------------------------

    def _reconcile_snapshot(self, ts: res.ThinSnapshot) -> None:
        dl = deadline_mod.Deadline.after(RECONCILE_SECONDS)
        if ts.meta.deleting:
            (self._finalize_member if ts.spec.group else self._finalize)(ts, deadline=dl)
            return
        dev = self._engine.get(ts.name) or self._adopt_late(ts, _snapshot_record(ts), deadline=dl)
        if dev is None:
            # a member's device goes with its group (deleted first, every member in one mutation),
            # its object next: while its group is gone or going, a missing device is not lost
            went = bool(ts.spec.group) and self._group_gone(ts.spec.group)
            if not went and (ts.status.device_id or ts.status.phase in (res.Phase.READY, res.Phase.LOST)):
                self._lost(ts, "its device is not in the pool", deadline=dl)
                return
            if ts.name in self._collected:
                self._lost(ts, self._collected_why(ts.name), deadline=dl)
                return
            # a failed one waits for the controller; a group's member is cut with its group, never
            # alone (the group's reconcile reports it)
            if ts.spec.group or (
                ts.status.phase == res.Phase.FAILED and ts.status.observed_generation >= ts.meta.generation
            ):
                if ts.spec.group:
                    # its group waits for every member: one seen now (late, or made again after it
                    # vanished under the group's reconcile, which nothing else reconciles again)
                    # lets it go on
                    self._queue.put((res.Kind.GROUP, ts.spec.group))
                return
            ts = self._claim(ts, deadline=dl)
            try:
                self._require_source(ts.spec.source_volume, res.ThinVolume)
                with self._timed("create_snapshot"):
                    dev = self._engine.create_snapshot(ts.name, ts.spec.source_volume, deadline=dl)
            except (_WaitForSource, *TRANSIENT):
                raise
            except errors.CsiThinError as exc:
                self._failed(ts, exc, deadline=dl)
                return
            finally:
                self._status.mark()
        if dev.state == model.DeviceState.LOST:
            self._lost(ts, f"device {dev.dev_id} is not in the pool", deadline=dl)
            return
        if dev.state != model.DeviceState.READY:
            raise errors.OperationPending(f"{ts.name} is {dev.state.value}")
        self._snapshot_ready(ts, dev, deadline=dl)

    def _group_gone(self, group: str) -> bool:
        """The group object is gone or being deleted (as this agent has it)."""
        with self._lock:
            tg = self._groups.get(group)
        return tg is None or tg.meta.deleting

    def _snapshot_ready(
        self, ts: res.ThinSnapshot, dev: model.Device, *, deadline: deadline_mod.Deadline
    ) -> None:
        ts = self._with_finalizer(ts, deadline=deadline)
        status = res.SnapshotStatus(
            phase=res.Phase.READY,
            ready_to_use=True,
            size_bytes=dev.size_bytes,
            device_id=dev.dev_id,
            creation_time=dev.created_at,
            observed_generation=ts.meta.generation,
        )
        if status != ts.status:
            self._store(self._api.put_status(ts, status.to_dict(), deadline=deadline))

    # ---- reconcile: group snapshots ------------------------------------------------------------

    def _reconcile_group(self, tg: res.ThinGroupSnapshot) -> None:
        """Cut every member in one engine mutation, then report each member Ready, then the group.

        A group is settled once Ready: its devices are then the members' (each reconciled as a
        snapshot: Lost if it vanishes, never cut again). Before that, the engine call is repeated
        until it answers: it is idempotent (the same group and members return what exists), and
        after a crash the engine's recovery has finished or undone the one mutation."""
        dl = deadline_mod.Deadline.after(RECONCILE_SECONDS)
        if tg.meta.deleting:
            self._finalize_group(tg, deadline=dl)
            return
        if tg.status.phase in (res.Phase.READY, res.Phase.LOST) or (
            tg.status.phase == res.Phase.FAILED and tg.status.observed_generation >= tg.meta.generation
        ):
            return
        members = self._group_members(tg)
        try:
            self._check_group(tg, members)
        except errors.CsiThinError as exc:
            if isinstance(exc, (_WaitForSource, *TRANSIENT)):
                raise
            self._group_failed(tg, exc, deadline=dl)
            return
        # the finalizers before any device exists: no object can vanish with a member device left
        tg = self._claim(tg, deadline=dl)
        claimed = [self._claim(m, deadline=dl) for m in members]
        try:
            with self._timed("create_group_snapshot"):
                devs = self._engine.create_group_snapshot(
                    tg.name, [(m.snapshot, m.source_volume) for m in tg.spec.members], deadline=dl
                )
        except (_WaitForSource, *TRANSIENT):
            raise
        except errors.CsiThinError as exc:
            self._group_failed(tg, exc, deadline=dl)
            return
        finally:
            self._status.mark()
        by_name = {d.name: d for d in devs}
        for ts in claimed:
            self._snapshot_ready(ts, by_name[ts.name], deadline=dl)
        created = min((d.created_at for d in devs), default=time.time())
        status = res.GroupStatus(
            phase=res.Phase.READY,
            ready_to_use=True,
            creation_time=created,
            observed_generation=tg.meta.generation,
        )
        if status != tg.status:
            self._store(self._api.put_status(tg, status.to_dict(), deadline=dl))
        log.info("event=group-snapshot-cut name=%s members=%s", tg.name, sorted(by_name))

    def _group_members(self, tg: res.ThinGroupSnapshot) -> list[res.ThinSnapshot]:
        """The member objects, as this agent has them; each must be here already (the controller
        writes them before the group): one not seen yet is waited for."""
        out = []
        with self._lock:
            cached = [self._snapshots.get(m.snapshot) for m in tg.spec.members]
        for m, ts in zip(tg.spec.members, cached, strict=True):
            if ts is None:
                raise _WaitForSource(f"member {m.snapshot!r} of group {tg.name!r} not seen yet")
            out.append(ts)
        return out

    def _check_group(self, tg: res.ThinGroupSnapshot, members: list[res.ThinSnapshot]) -> None:
        for m, ts in zip(tg.spec.members, members, strict=True):
            if ts.spec.group != tg.name or ts.spec.source_volume != m.source_volume:
                raise errors.FailedPrecondition(
                    f"snapshot {ts.name!r} (of {ts.spec.source_volume!r}, group "
                    f"{ts.spec.group or '(none)'!r}) is not the member of group {tg.name!r} that it names"
                )
            if ts.meta.deleting:
                raise errors.OperationPending(f"member {ts.name!r} is being deleted")
            self._require_source(m.source_volume, res.ThinVolume)

    def _finalize_group(self, tg: res.ThinGroupSnapshot, *, deadline: deadline_mod.Deadline) -> None:
        """Delete every member device in one mutation (absent is done), then let the group go; the
        members' objects, deleted next by the controller, then find their devices gone."""
        if res.FINALIZER not in tg.meta.finalizers:
            return
        current = self._api.get(res.ThinGroupSnapshot, tg.name, deadline=deadline)
        if current.meta.uid != tg.meta.uid:
            self._store(current)
            raise client_mod.Conflict(
                f"{tg.name}: the group being deleted is gone; reconcile the current one"
            )
        try:
            with self._timed("delete_group_snapshot"):
                self._engine.delete_group_snapshot(tg.name, deadline=deadline)
        except errors.FailedPrecondition as exc:
            self._event(tg, "DeleteBlocked", exc.message, deadline=deadline)
            raise
        finally:
            self._status.mark()
        rest = tuple(f for f in tg.meta.finalizers if f != res.FINALIZER)
        self._api.set_finalizers(tg, rest, deadline=deadline)
        for m in tg.spec.members:
            self._queue.put((res.Kind.SNAPSHOT, m.snapshot))
        log.info("event=deleted kind=%s name=%s", tg.kind.value, tg.name)

    def _finalize_member(self, ts: res.ThinSnapshot, *, deadline: deadline_mod.Deadline) -> None:
        """A member goes with its group: while the group's object is here its device stays (CSI: a
        group's snapshot cannot be deleted alone), and once the group deleted the devices there is
        nothing left to delete."""
        with self._lock:
            group = self._groups.get(ts.spec.group)
        if group is not None and self._engine.get(ts.name) is not None:
            if res.FINALIZER in ts.meta.finalizers:
                self._event(
                    ts,
                    "DeleteBlocked",
                    f"a member of group snapshot {ts.spec.group}: deleted with its group, never alone",
                    deadline=deadline,
                )
            raise errors.FailedPrecondition(
                f"{ts.name} is a member of group {ts.spec.group}, which is still here"
            )
        self._finalize(ts, deadline=deadline)

    def _group_failed(
        self, tg: res.ThinGroupSnapshot, exc: errors.CsiThinError, *, deadline: deadline_mod.Deadline
    ) -> None:
        log.warning("event=create-failed name=%s code=%s error=%s", tg.name, exc.code, exc.message)
        self._event(tg, "CreateFailed", f"{exc.code}: {exc.message}", deadline=deadline)
        status = res.GroupStatus(
            phase=res.Phase.FAILED,
            code=exc.code,
            message=exc.message,
            observed_generation=tg.meta.generation,
        )
        self._store(self._api.put_status(tg, status.to_dict(), deadline=deadline))

    # ---- shared steps --------------------------------------------------------------------------

    def _with_finalizer(self, obj: client_mod.R, *, deadline: deadline_mod.Deadline) -> client_mod.R:
        if res.FINALIZER in obj.meta.finalizers:
            return obj
        got = self._api.set_finalizers(obj, (*obj.meta.finalizers, res.FINALIZER), deadline=deadline)
        self._store(got)  # type: ignore[arg-type]
        return got

    def _claim(self, obj: W, *, deadline: deadline_mod.Deadline) -> W:
        """The object, with the finalizer, as the API server has it now: a device is made only for an
        object that exists and is not being deleted. The cached copy can be older than what this agent
        already did (the watch delivers, late, the events of its own writes; a deleted object's
        finalizer-but-no-status version would otherwise make a device no object owns). Adding the
        finalizer is a write guarded by the copy's resourceVersion, so its answer is fresh; with the
        finalizer already there, the object is read again and a moved one reconciled afresh."""
        if res.FINALIZER not in obj.meta.finalizers:
            return self._with_finalizer(obj, deadline=deadline)
        current = self._api.get(type(obj), obj.name, deadline=deadline)  # gone: NotFound, dropped
        if current.meta.resource_version != obj.meta.resource_version:
            self._store(current)
            raise client_mod.Conflict(f"{obj.name}: the cached copy is stale; reconcile the current one")
        return obj

    def _finalize(self, obj: W, *, deadline: deadline_mod.Deadline) -> None:
        """Delete the device, then let the object go. The device goes by name, so only when the
        object being deleted is the one the API server has under that name now: a late event of an
        older object of the name (deleted, then made afresh) must not delete the new one's device."""
        if res.FINALIZER not in obj.meta.finalizers:
            return
        current = self._api.get(type(obj), obj.name, deadline=deadline)  # gone: NotFound, dropped
        if current.meta.uid != obj.meta.uid:
            self._store(current)
            raise client_mod.Conflict(
                f"{obj.name}: the object being deleted is gone; reconcile the current one"
            )
        try:
            with self._timed("delete"):
                self._engine.delete(obj.name, deadline=deadline)
        except errors.FailedPrecondition as exc:  # active (staged): deleted once unstaged
            self._event(obj, "DeleteBlocked", exc.message, deadline=deadline)
            raise
        finally:
            self._status.mark()
        rest = tuple(f for f in obj.meta.finalizers if f != res.FINALIZER)
        self._api.set_finalizers(obj, rest, deadline=deadline)
        log.info("event=deleted kind=%s name=%s", obj.kind.value, obj.name)

    def _failed(
        self,
        obj: res.ThinVolume | res.ThinSnapshot,
        exc: errors.CsiThinError,
        *,
        deadline: deadline_mod.Deadline,
    ) -> None:
        log.warning("event=create-failed name=%s code=%s error=%s", obj.name, exc.code, exc.message)
        self._event(obj, "CreateFailed", f"{exc.code}: {exc.message}", deadline=deadline)
        if isinstance(obj, res.ThinVolume):
            self._put_volume_status(
                obj,
                res.VolumeStatus(
                    phase=res.Phase.FAILED,
                    code=exc.code,
                    message=exc.message,
                    observed_generation=obj.meta.generation,
                ),
                deadline=deadline,
            )
        else:
            status = res.SnapshotStatus(
                phase=res.Phase.FAILED,
                code=exc.code,
                message=exc.message,
                observed_generation=obj.meta.generation,
            )
            self._store(self._api.put_status(obj, status.to_dict(), deadline=deadline))

    def _lost(
        self, obj: res.ThinVolume | res.ThinSnapshot, why: str, *, deadline: deadline_mod.Deadline
    ) -> None:
        if obj.status.phase == res.Phase.LOST:
            return
        message = f"{obj.kind.value} {obj.name}: {why}"
        log.error("event=lost name=%s reason=%s", obj.name, why)
        self._event(obj, "DeviceLost", message, deadline=deadline)
        if isinstance(obj, res.ThinVolume):
            status = dataclasses.replace(
                obj.status,
                phase=res.Phase.LOST,
                code="FAILED_PRECONDITION",
                message=message,
                observed_generation=obj.meta.generation,
            )
            self._put_volume_status(obj, status, deadline=deadline)
        else:
            snap = dataclasses.replace(
                obj.status,
                phase=res.Phase.LOST,
                ready_to_use=False,
                code="FAILED_PRECONDITION",
                message=message,
                observed_generation=obj.meta.generation,
            )
            self._store(self._api.put_status(obj, snap.to_dict(), deadline=deadline))
        self._status.mark()

    def _event(
        self, obj: res.Resource, reason: str, message: str, *, deadline: deadline_mod.Deadline
    ) -> None:
        self._api.event(obj, reason=reason, message=message, reporter=self._node, deadline=deadline)

    # ---- LMDB rebuilt from the CRs -------------------------------------------------------------

    def _adopt(
        self, vols: list[res.ThinVolume], snaps: list[res.ThinSnapshot], *, deadline: deadline_mod.Deadline
    ) -> list[str]:
        """After a lost store: each orphan id a CR's status names gets that CR's record back.

        An id can be named by more than one object: a Lost object keeps the id it had, which a new
        device may have got since, and an object being deleted keeps the id of a device already
        deleted (a crash before its finalizer went). The id goes to the one live (neither Lost nor
        being deleted) object naming it; to a Lost or deleting one only when nothing else names it;
        to nobody when that is still ambiguous (it stays an orphan, reported): never one object's
        data handed to another, never a live device deleted with another object."""
        if self._engine.store.adopted() is None:
            return []
        orphans = set(self._engine.orphans())
        claims: dict[int, list[tuple[bool, model.Device]]] = {}
        for deleting, phase, dev in itertools.chain(
            ((v.meta.deleting, v.status.phase, _volume_record(v)) for v in vols),
            ((s.meta.deleting, s.status.phase, _snapshot_record(s)) for s in snaps),
        ):
            if dev.dev_id in orphans:
                live = not deleting and phase != res.Phase.LOST
                claims.setdefault(dev.dev_id, []).append((live, dev))
        chosen: list[model.Device] = []
        for dev_id, named in sorted(claims.items()):
            best = [d for live, d in named if live] or [d for _, d in named]
            if len(best) == 1:
                chosen.append(best[0])
            else:
                self._ambiguous.add(dev_id)
                log.error(
                    "event=adopt-ambiguous dev_id=%d names=%s action=left-orphan",
                    dev_id,
                    [d.name for d in best],
                )
        adopted: list[str] = []
        for dev in chosen:
            with _logged(f"adopt {dev.name} as device {dev.dev_id}"):
                self._engine.adopt(dev, deadline=deadline)
                adopted.append(dev.name)
        return adopted

    def _adopt_late(
        self, obj: res.ThinVolume | res.ThinSnapshot, record: model.Device, *, deadline: deadline_mod.Deadline
    ) -> model.Device | None:
        """The device of a live object whose status names an id the pool still holds as an orphan:
        not Lost, only not adopted yet (the start-up adoption failed for a while: a deadline on a busy
        pool). Adopted now; a transient failure retries. None when there is nothing to adopt (and an
        id several objects name stays an orphan, as at start-up)."""
        dev_id = obj.status.device_id
        if not dev_id or obj.meta.deleting or obj.status.phase == res.Phase.LOST:
            return None
        if dev_id not in self._engine.orphans():
            return None
        if dev_id in self._ambiguous:
            raise errors.FailedPrecondition(
                f"device id {dev_id} is named by more than one object: left orphan"
            )
        try:
            dev = self._engine.adopt(record, deadline=deadline)
        except errors.FailedPrecondition as exc:  # the pool has no such device after all
            log.warning("event=adopt-failed name=%s dev_id=%d error=%s", obj.name, dev_id, exc)
            return None
        log.info("event=adopted-late name=%s dev_id=%d", obj.name, dev_id)
        self._status.mark()
        return dev

    # ---- orphans: `csi-thin pool gc --orphans --node-id N` ----------------------------------------

    def gc_orphans(self, *, grace_seconds: float, deadline: deadline_mod.Deadline) -> GcReport:
        """Delete what has been an orphan for `grace_seconds` or more, each one only after a fresh read
        from the API server shows that no ThinVolume, ThinSnapshot or ThinGroupSnapshot names it (this
        agent's watch cache may lag: a CR restored a moment ago must still save its device). Nothing a
        CR names is ever deleted; an active device is kept. Idempotent: a second run finds nothing
        more to do.

        The grace clock runs in this process (`_orphan_since`): a restart restarts it. A first-seen
        time kept across restarts would count time that nobody watched (the agent down while, say,
        CRs are being restored from a backup); restarting it only ever delays a deletion.

        The fresh read cannot stop a CR being made right after it (a restore from a backup, spec only):
        a record it deletes is remembered (`_collected`), and a CR of that name is then Lost, never
        given a new empty device (a CR whose status names the device is Lost anyway).

        No `--force` as standalone mode needs after a rebuilt store (where orphans may be the lost
        store's volumes): here the CRs, read afresh, say what is legitimate.
        """
        if self._stopping.is_set():
            raise errors.Unavailable("the node agent is stopping")
        found = self._orphans()
        now = time.monotonic()
        with self._lock:
            since = dict(self._orphan_since)
        deleted: list[str] = []
        waiting: list[Waiting] = []
        kept: list[Kept] = []
        failed: list[Kept] = []
        for orphan in found:
            if orphan not in since:
                continue  # a CR for it arrived meanwhile
            age = now - since[orphan]
            if age < grace_seconds:
                waiting.append(
                    Waiting(
                        name=orphan,
                        orphan_seconds=round(age, 1),
                        eligible_in_seconds=round(grace_seconds - age, 1),
                    )
                )
                continue
            # no reconcile in between: one could otherwise take up the device of a CR that appears
            # after the fresh read, while it is being deleted
            if not self._work_lock.acquire(timeout=max(0.0, deadline.remaining())):
                failed.append(Kept(orphan, "DEADLINE_EXCEEDED: a reconcile held the pool meanwhile"))
                continue
            if self._stopping.is_set():  # the engine is about to close under us
                self._work_lock.release()
                failed.append(Kept(orphan, "UNAVAILABLE: the node agent is stopping"))
                continue
            try:
                owner = self._owner(orphan, deadline=deadline)
                if owner:
                    with self._lock:
                        self._orphan_since.pop(orphan, None)
                    kept.append(Kept(orphan, f"{owner} names it (read afresh from the API server)"))
                    continue
                if self._stopping.is_set():  # stop gave up waiting during the read: the engine closes
                    raise errors.Unavailable("the node agent is stopping")
                refused = self._delete_orphan(orphan, deadline=deadline)
            except errors.CsiThinError as exc:
                failed.append(Kept(orphan, f"{exc.code}: {exc.message}"))
                continue
            finally:
                self._work_lock.release()
                self._status.mark()
            if refused:
                kept.append(Kept(orphan, refused))
                continue
            with self._lock:
                self._orphan_since.pop(orphan, None)
            deleted.append(orphan)
            log.info("event=orphan-deleted name=%s orphan_seconds=%.0f", orphan, age)
        return GcReport(
            deleted=tuple(deleted), waiting=tuple(waiting), kept=tuple(kept), failed=tuple(failed)
        )

    def _owner(self, orphan: str, *, deadline: deadline_mod.Deadline) -> str:
        """Which CR names this orphan, by name, as a group's member or by its status.deviceId; ""
        when none does. Read from the API server now: a get and a list without a resourceVersion
        are consistent reads (as fresh as etcd), not this agent's cache."""
        if orphan.startswith(ID_PREFIX):
            dev_id = int(orphan[len(ID_PREFIX) :])
        else:
            dev = self._engine.get(orphan)
            if dev is None:
                return ""
            dev_id = dev.dev_id
            vol = self._api.find(res.ThinVolume, orphan, deadline=deadline)
            snap = self._api.find(res.ThinSnapshot, orphan, deadline=deadline)
            for obj in (vol, snap):
                if obj is not None:
                    return f"{obj.kind.value} {orphan} (node {obj.spec.node_name})"
            # a group member whose ThinSnapshot was removed by force is still its group's: deleting
            # the group deletes it (by its record's group), and the group's snapshot is incomplete
            # without it
            groups, _ = self._api.list(res.ThinGroupSnapshot, deadline=deadline, node=self._node)
            for tg in groups:
                if any(m.snapshot == orphan for m in tg.spec.members):
                    return f"{tg.kind.value} {tg.name} (a member of it)"
        vols, _ = self._api.list(res.ThinVolume, deadline=deadline, node=self._node)
        snaps, _ = self._api.list(res.ThinSnapshot, deadline=deadline, node=self._node)
        named: list[res.ThinVolume | res.ThinSnapshot] = [*vols, *snaps]
        for o in named:
            if o.status.device_id == dev_id:
                return f"{o.kind.value} {o.name} (its status.deviceId {dev_id})"
        return ""

    def _delete_orphan(self, orphan: str, *, deadline: deadline_mod.Deadline) -> str:
        """Delete one orphan; "" when it is gone now, else why it stays (active; gone already)."""
        if orphan.startswith(ID_PREFIX):
            dev_id = int(orphan[len(ID_PREFIX) :])
            if self._engine.delete_orphans([dev_id], deadline=deadline):
                return ""
            if dev_id in self._engine.orphans():
                return "active: in use on this node"
            return "no orphan any more: a record owns the id now"
        dev = self._engine.get(orphan)
        if dev is None:
            return "gone already (another gc?)"
        try:
            self._engine.delete(orphan, deadline=deadline)
        except errors.FailedPrecondition as exc:  # active (staged): deleted once unstaged
            return exc.message
        # before the work lock goes: a CR of this name made since the fresh read (a restore) waits
        # for it, and its reconcile must find this
        with self._lock:
            self._collected[orphan] = dev.dev_id
        return ""

    def _collected_why(self, name: str) -> str:
        return (
            f"its device {self._collected[name]} was deleted by `csi-thin pool gc --orphans` (no CR named "
            "it for the grace period); never re-created empty"
        )

    # ---- ThinPool ------------------------------------------------------------------------------

    def _ensure_pool_object(self, *, deadline: deadline_mod.Deadline) -> None:
        want = res.ThinPool(
            meta=res.Meta(name=self.pool_object_name),
            spec=res.PoolSpec(node_name=self._node, pool=self._pool),
        )
        with contextlib.suppress(errors.AlreadyExists):
            self._api.create(want, deadline=deadline)

    def orphans(self) -> tuple[str, ...]:
        """What no CR owns, as the ThinPool status lists it (the metrics read it at scrape time)."""
        return self._orphans()

    def _orphans(self) -> tuple[str, ...]:
        """What no CR in this agent's cache owns: record names, then "id:N" for ids no record owns.
        Each one's orphan clock starts here if it was not running (and stops for what is no orphan
        any more)."""
        with self._lock:
            owned = set(self._volumes) | set(self._snapshots)
        # containerd's layers have no CR: their owner is the snapshotter's layer record (its Cleanup
        # collects what containerd removed), never this agent's gc
        unowned = sorted(
            d.name for d in self._engine.list() if d.name not in owned and d.kind != model.DeviceKind.LAYER
        )
        found = (*unowned, *(f"{ID_PREFIX}{i}" for i in self._engine.orphans()))
        now = time.monotonic()
        with self._lock:
            # again under the lock: a CR that arrived since `owned` was read has had its clock
            # dropped by the watch callback, and must not get one again from the stale view
            owned = set(self._volumes) | set(self._snapshots)
            self._orphan_since = {o: self._orphan_since.get(o, now) for o in found if o not in owned}
        return found

    def _refresh_pool(self, *, deadline: deadline_mod.Deadline) -> None:
        try:
            st = self._engine.status(deadline=deadline)
        except errors.Unavailable:
            # the pool cannot be read (not assembled, gone): publish it failed (no capacity, its
            # volumes inaccessible), then fail the refresh as before. Left at its last status, the
            # controller would go on placing volumes here and calling them healthy.
            self._publish_pool(
                model.PoolStatus(0, 0, 0, 0, 0, 0, model.PoolMode.FAIL, needs_check=False), deadline=deadline
            )
            raise
        self._publish_pool(st, deadline=deadline)

    def _publish_pool(self, st: model.PoolStatus, *, deadline: deadline_mod.Deadline) -> None:
        totals = self._engine.totals()  # running totals: no scan of every record per refresh
        status = res.PoolStatus(
            healthy=st.healthy,
            mode=st.mode.value,
            block_size_bytes=st.block_size_bytes,
            data_used_bytes=st.data_used_bytes,
            data_total_bytes=st.data_total_bytes,
            metadata_used_bytes=st.metadata_used_bytes,
            metadata_total_bytes=st.metadata_total_bytes,
            provisioned_bytes=totals.provisioned_bytes,
            overprovision_ratio=self._ratio,
            data_threshold=self._engine.thresholds.data,
            metadata_threshold=self._engine.thresholds.metadata,
            volumes=totals.of(kind=model.DeviceKind.VOLUME).count,
            snapshots=totals.of(kind=model.DeviceKind.SNAPSHOT).count,
            lost=tuple(sorted(self._engine.lost())),
            orphans=self._orphans(),
            pool_transaction_id=st.transaction_id,
            store_transaction_id=self._engine.store.transaction_id(),
            last_updated=client_mod.now(),
            # the promise the controller holds this node to: a status older than a few of these is
            # a node that is down (csi_thin.kube.crengine.silence)
            refresh_seconds=self._refresh_seconds,
            snapshot_metadata_endpoint=self._snapshot_metadata_endpoint,
        )
        obj = self._api.find(res.ThinPool, self.pool_object_name, deadline=deadline)
        if obj is None:
            # deleted under us (made only at start-up): a node with no ThinPool has no capacity for
            # the controller, so make it again rather than fail every publish until a restart
            log.warning("event=pool-object-recreated name=%s", self.pool_object_name)
            self._ensure_pool_object(deadline=deadline)
            obj = self._api.get(res.ThinPool, self.pool_object_name, deadline=deadline)
        self._api.put_status(obj, status.to_dict(), deadline=deadline)


def _volume_record(tv: res.ThinVolume) -> model.Device:
    attrs = {model.ATTR_ACCESS_TYPE: tv.spec.access_type.value}
    if tv.spec.fs_type:
        attrs[model.ATTR_FS_TYPE] = tv.spec.fs_type
    return model.Device(
        name=tv.name,
        dev_id=tv.status.device_id,
        kind=model.DeviceKind.VOLUME,
        state=model.DeviceState.READY,
        size_bytes=tv.status.size_bytes or tv.spec.size_bytes,
        origin=tv.spec.source.name if tv.spec.source else None,
        created_at=tv.status.created_at or time.time(),
        attributes=model.attributes(attrs),
    )


def _snapshot_record(ts: res.ThinSnapshot) -> model.Device:
    return model.Device(
        name=ts.name,
        dev_id=ts.status.device_id,
        kind=model.DeviceKind.SNAPSHOT,
        state=model.DeviceState.READY,
        size_bytes=ts.status.size_bytes,
        origin=ts.spec.source_volume,
        created_at=ts.status.creation_time or time.time(),
        group=ts.spec.group or None,
    )


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Adoption is best effort per object: one that cannot be adopted stays an orphan, reported."""
    try:
        yield
    except errors.CsiThinError as exc:
        log.warning("event=adopt-failed what=%s error=%s", what, exc)
