"""The pool engine: the only code that changes the pool, and the API the CSI layer calls.

Flow of a mutation: validate -> claim the name (and the source) without blocking -> "does it exist,
and is it compatible?" -> the pool's condition (csi_thin.pool.modes, one table for every
operation) and thresholds -> a journalled transition:

    intent + "-ing" record in LMDB  ->  kernel steps (each with an explicit undo)
        ->  set_transaction_id(N, N+1)  ->  record + txid N+1 + intent closed, in ONE LMDB txn

On a failure the undos run in reverse order and the intent is closed; if an undo fails too, the
intent stays open and the next call on the name (or start-up recovery) resolves it from the pool's
evidence (csi_thin.pool.recovery). A backend only performs single steps (csi_thin.pool.backend).

Concurrency: per-name claims are non-blocking (a second caller gets OperationPending, ABORTED at the
edge). Fenced mutations of different names also serialize on one pool lock, because the pool's
transaction id is a single compare-and-swap counter; that lock blocks, within the caller's deadline.

Fault injection: every step boundary, before and after each step and each undo, is a point declared in
csi_thin.pool.faults and reached through `faults.reach` (a test hook records the points, fails a step
once, or SIGKILLs the process there).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import faults, modes, recovery
from csi_thin.store import lmdb_store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Undo gets at least this long even when the caller's deadline has passed: leaving a half-done
#: mutation behind costs more than overrunning a deadline by a bounded amount.
UNDO_GRACE_SECONDS = 30.0

MAX_NAME_LEN = 256
MAX_SIZE_BYTES = 1 << 50  # 1 PiB: anything above is a unit mistake


RecoveryReport = recovery.RecoveryReport


class _RollForward(Exception):
    """Raised by an undo that cannot undo (a delete happened): the transition finishes instead."""


@dataclasses.dataclass
class _Done:
    name: str
    undo: Callable[[], None]


class _Transition:
    """The steps of one journalled mutation, recorded so they can be undone in reverse order."""

    def __init__(self, engine: PoolEngine, op: str, intent: lmdb_store.Intent) -> None:
        self.engine = engine
        self.op = op
        self.intent = intent
        self.done: list[_Done] = []
        self.result: dict[str, Any] = {}

    def step(self, name: str, do: Callable[[], T], undo: Callable[[], None]) -> T:
        # Recorded before it runs: a step that raised may still have happened (a timeout after the
        # kernel acted), so every undo checks the pool instead of assuming.
        self.done.append(_Done(name, undo))
        faults.reach(f"{self.op}/{name}")
        value = do()
        faults.reach(f"{self.op}/{name}:done")
        return value


def _grace(deadline: deadline_mod.Deadline) -> deadline_mod.Deadline:
    """The deadline an undo runs under: the caller's, or UNDO_GRACE_SECONDS if that is shorter."""
    return deadline_mod.Deadline.after(max(deadline.remaining(), UNDO_GRACE_SECONDS))


def _round_up(size: int, block: int) -> int:
    return -(-size // block) * block


def _check_offset(starting_offset: int, size: int) -> None:
    if not 0 <= starting_offset <= size:
        raise errors.OutOfRange(
            f"starting_offset {starting_offset} is outside the snapshot's 0..{size} bytes"
        )


def _block_map(size: int, extents: Collection[model.Extent], starting_offset: int) -> model.BlockMap:
    return model.BlockMap(capacity_bytes=size, extents=tuple(e for e in extents if e.end > starting_offset))


def _group_key(group: str) -> str:
    """A group's claim key: no device name holds a '/', so it never collides with one."""
    return f"group/{group}"


def _group_members(group: str, members: Sequence[tuple[str, str]]) -> builtins.list[tuple[str, str]]:
    """Validated (snapshot name, source volume) pairs: at least one, no name or source twice, no
    name that is also a source (nor the group's name)."""
    _validate_name(group, "group")
    pairs = [(str(n), str(s)) for n, s in members]
    if not pairs:
        raise errors.InvalidArgument(f"group snapshot {group!r}: no member")
    for name, source in pairs:
        _validate_name(name, "member snapshot name")
        _validate_name(source, "source")
    names = [n for n, _ in pairs]
    sources = [s for _, s in pairs]
    for what, values in (("snapshot name", names), ("source volume", sources)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise errors.InvalidArgument(f"group snapshot {group!r}: {what} {twice[0]!r} given twice")
    both = sorted(set(names) & {*sources, group})
    if both:
        raise errors.InvalidArgument(
            f"group snapshot {group!r}: {both[0]!r} is both a member snapshot and a source or the group"
        )
    return pairs


def _validate_name(name: str, what: str = "name") -> None:
    if not name or len(name) > MAX_NAME_LEN:
        raise errors.InvalidArgument(f"{what} must be 1..{MAX_NAME_LEN} characters, got {len(name)}")
    if "\x00" in name or "/" in name or not name.isprintable():
        raise errors.InvalidArgument(f"{what} {name!r}: no '/', NUL or control characters")


class PoolEngine:
    def __init__(
        self,
        *,
        backend: backend_mod.Backend,
        store: lmdb_store.LmdbStore,
        thresholds: model.Thresholds,
        block_size: int,
    ) -> None:
        if block_size <= 0:
            raise errors.InvalidArgument(f"block_size {block_size} must be positive")
        self.backend = backend
        self.store = store
        self.thresholds = thresholds
        self.block_size = block_size
        self._claims_mutex = threading.Lock()
        self._claimed: set[str] = set()
        #: shared claims: name -> how many callers hold it (see _claim)
        self._shared: dict[str, int] = {}
        self._pool_lock = threading.Lock()
        #: what the last `recover` found and did (None before it ran)
        self.last_recovery: RecoveryReport | None = None

    # ---- seams and locks -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _claim(self, *names: str, shared: tuple[str, ...] = ()) -> Iterator[None]:
        """Per-name claim, non-blocking: a second caller on any of the names gets OperationPending.
        `shared` names are claimed only against the exclusive claims: any number of callers hold
        them together (containerd's Prepares of children of one parent), none while one holds the
        name exclusively (its Remove)."""
        keys = set(names)
        with self._claims_mutex:
            busy = sorted((keys & (self._claimed | self._shared.keys())) | (set(shared) & self._claimed))
            if busy:
                raise errors.OperationPending(f"an operation on {busy[0]!r} is in progress; retry later")
            self._claimed |= keys
            for name in shared:
                self._shared[name] = self._shared.get(name, 0) + 1
        try:
            yield
        finally:
            with self._claims_mutex:
                self._claimed -= keys
                for name in shared:
                    self._shared[name] -= 1
                    if not self._shared[name]:
                        del self._shared[name]

    @contextlib.contextmanager
    def _fenced(self, deadline: deadline_mod.Deadline) -> Iterator[None]:
        """The pool lock every fenced mutation holds from its intent to its commit. Any fenced intent
        still open when it is acquired is stale (its owner failed to undo): resolve it first.

        Then the pool's transaction id must equal the store's. The fence's compare-and-swap would
        refuse a drifted pool too, but only after the delete step: a pool moved on by someone else
        (or the wrong pool for this state dir) may hold another device under a record's id."""
        if not self._pool_lock.acquire(timeout=max(deadline.remaining(), 0.001)):
            raise errors.DeadlineExceeded("deadline exceeded waiting for the pool's transaction lock")
        try:
            for intent in self.store.intents():
                if intent.fenced:
                    self._resolve(intent, deadline)
            pool_txid = self.backend.transaction_id(deadline=deadline)
            store_txid = self.store.transaction_id()
            if pool_txid != store_txid:
                raise recovery.TransactionMismatch(
                    f"pool transaction id {pool_txid} vs store {store_txid}: the pool and the LMDB store "
                    "disagree; nothing was changed. Find out who moved the pool, then restart (recovery)."
                )
            yield
        finally:
            self._pool_lock.release()

    def _resolve(self, intent: lmdb_store.Intent, deadline: deadline_mod.Deadline) -> None:
        result = recovery.resolve_intent(self.backend, self.store, intent, deadline=deadline)
        log.info("event=resolved op=%s name=%s result=%s", intent.op, intent.name, result)

    def _resolve_stale(self, name: str, deadline: deadline_mod.Deadline) -> None:
        """Called holding the name's claim, so no call on the name is in flight: an open intent on it
        is left from a failed undo. Resolve it from the pool's evidence, as recovery would."""
        for intent in self.store.intents():
            if intent.name != name and name not in {m[0] for m in intent.members}:
                continue
            if intent.fenced:
                with self._fenced(deadline):  # resolves every stale fenced intent
                    pass
            else:
                self._resolve(intent, deadline)

    @contextlib.contextmanager
    def _transition(
        self,
        op: str,
        *,
        begin: Callable[[lmdb_store.WriteTxn], lmdb_store.Intent],
        commit: Callable[[lmdb_store.WriteTxn, _Transition], None],
        abort: Callable[[lmdb_store.WriteTxn, _Transition], None],
        deadline: deadline_mod.Deadline,
    ) -> Iterator[_Transition]:
        """Write the intent and the "-ing" record, run the steps of the block, then write the result
        (commit) or undo the steps in reverse and write the failure (abort)."""
        with self.store.write() as w:
            intent = begin(w)
        tx = _Transition(self, op, intent)
        try:
            faults.reach(f"{op}/journaled")
            yield tx
        except Exception as exc:
            undo_deadline = _grace(deadline)
            if self._unwind(tx, exc, abort, undo_deadline):
                return  # rolled forward: the mutation completed after all
            raise
        with self.store.write() as w:
            commit(w, tx)
        faults.reach(f"{op}/committed")
        log.info("event=committed op=%s name=%s dev_id=%d", op, intent.name, intent.dev_id)

    def _unwind(
        self,
        tx: _Transition,
        exc: Exception,
        abort: Callable[[lmdb_store.WriteTxn, _Transition], None],
        deadline: deadline_mod.Deadline,
    ) -> bool:
        """Undo in reverse order; True when the transition rolled forward instead."""
        log.warning("event=undo op=%s name=%s error=%r", tx.op, tx.intent.name, exc)
        try:
            for done in reversed(tx.done):
                faults.reach(f"{tx.op}/undo:{done.name}")
                done.undo()
                faults.reach(f"{tx.op}/undo:{done.name}:done")
        except _RollForward:
            try:
                self._resolve(tx.intent, deadline)
            except Exception as resolve_exc:
                exc.add_note(f"finishing {tx.op} {tx.intent.name!r} failed: {resolve_exc!r}; left open")
                return False
            return True
        except Exception as undo_exc:
            # The intent stays open (the record keeps its "-ing" state): the next call on the name, or
            # recovery, resolves it from the pool's evidence.
            exc.add_note(f"undo of {tx.op} {tx.intent.name!r} failed too: {undo_exc!r}; left open")
            log.exception("event=undo-failed op=%s name=%s", tx.op, tx.intent.name)
            return False
        with self.store.write() as w:
            abort(w, tx)
        faults.reach(f"{tx.op}/aborted")
        return False

    # ---- checks ------------------------------------------------------------------------------------

    def _require_mode(self, op: modes.Op, deadline: deadline_mod.Deadline) -> model.PoolStatus | None:
        """Refuse `op` when the pool's condition does not allow it (modes.TABLE, the one place that
        decides). An op that runs in every condition reads no status (None)."""
        if modes.runs_always(op):
            return None
        st = self.backend.status(deadline=deadline)
        modes.require(op, st)
        return st

    def _require_room(self, st: model.PoolStatus) -> None:
        if st.data_used_ratio > self.thresholds.data:
            raise errors.PoolExhausted(
                f"pool data {st.data_used_ratio:.1%} used, above the {self.thresholds.data:.0%} threshold: "
                "new volumes and snapshots are refused"
            )
        if st.metadata_used_ratio > self.thresholds.metadata:
            raise errors.PoolExhausted(
                f"pool metadata {st.metadata_used_ratio:.1%} used, above the "
                f"{self.thresholds.metadata:.0%} threshold: new volumes and snapshots are refused"
            )

    def _size(self, size_bytes: int) -> int:
        if size_bytes <= 0:
            raise errors.InvalidArgument(f"size {size_bytes} must be positive")
        if size_bytes > MAX_SIZE_BYTES:
            raise errors.OutOfRange(f"size {size_bytes} is above the maximum of {MAX_SIZE_BYTES} bytes")
        return _round_up(size_bytes, self.block_size)

    def _ready(self, name: str, what: str = "device") -> model.Device:
        dev = self.store.get(name)
        if dev is None:
            raise errors.NotFound(f"{what} {name!r} not found")
        if dev.state == model.DeviceState.LOST:
            raise errors.FailedPrecondition(
                f"{what} {name!r} is LOST: its record exists but the pool has no device {dev.dev_id}"
            )
        if dev.state != model.DeviceState.READY:
            raise errors.OperationPending(f"{what} {name!r} is {dev.state.value}; retry later")
        return dev

    # ---- recovery ------------------------------------------------------------------------------------

    def recover(self, *, deadline: deadline_mod.Deadline) -> RecoveryReport:
        """Finish or undo every open intent and reconcile the store with the pool (at start-up)."""
        with self._pool_lock:
            report = recovery.recover(self.backend, self.store, deadline=deadline)
            self.last_recovery = report
        log.info(
            "event=recovered txid=%d forward=%s back=%s lost=%s orphans=%s",
            report.pool_txid,
            list(report.rolled_forward),
            list(report.rolled_back),
            list(report.lost),
            list(report.orphans),
        )
        return report

    # ---- creates -------------------------------------------------------------------------------------

    def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device:
        return self._create(
            "create_volume", name, size_bytes, source=None, attributes=attributes, deadline=deadline
        )

    def create_snapshot(self, name: str, source: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        """Snapshot of a volume (same size). An active source is made consistent by the backend."""
        return self._create("create_snapshot", name, None, source=source, attributes=None, deadline=deadline)

    def clone(
        self,
        name: str,
        source: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device:
        """A volume from a volume (clone) or from a snapshot (restore); it may be larger than the
        source (dm-thin keeps no size per device, so a larger restore is free)."""
        return self._create(
            "clone", name, size_bytes, source=source, attributes=attributes, deadline=deadline
        )

    def _create(
        self,
        op: str,
        name: str,
        size_bytes: int | None,
        *,
        source: str | None,
        attributes: Mapping[str, str] | None,
        deadline: deadline_mod.Deadline,
    ) -> model.Device:
        _validate_name(name)
        attrs = model.attributes(attributes)
        if source is not None:
            _validate_name(source, "source")
            if source == name:
                raise errors.InvalidArgument(f"{name!r} cannot be its own source")
        size = None if size_bytes is None else self._size(size_bytes)
        kind = model.DeviceKind.SNAPSHOT if op == "create_snapshot" else model.DeviceKind.VOLUME
        # Claiming the source too keeps it from being deleted, grown or deactivated under the step.
        with self._claim(name, *([source] if source else [])):
            self._resolve_stale(name, deadline)
            existing = self._existing(name, kind=kind, size=size, source=source, attrs=attrs)
            if existing is not None:
                return existing
            st = self._require_mode(modes.Op(op), deadline)
            assert st is not None
            self._require_room(st)
            with self._fenced(deadline):
                existing = self._existing(name, kind=kind, size=size, source=source, attrs=attrs)
                if existing is not None:
                    return existing
                src = None
                if source is not None:
                    src = self._ready(source, "source")
                    if op == "create_snapshot" and src.kind != model.DeviceKind.VOLUME:
                        raise errors.InvalidArgument(f"source {source!r} is a {src.kind.value}, not a volume")
                    if size is None:
                        size = src.size_bytes
                    if size < src.size_bytes:
                        raise errors.OutOfRange(
                            f"size {size} is smaller than the source {source!r} ({src.size_bytes})"
                        )
                assert size is not None
                return self._create_fenced(
                    op=op, name=name, kind=kind, size=size, src=src, attrs=attrs, deadline=deadline
                )

    def _existing(
        self,
        name: str,
        *,
        kind: model.DeviceKind,
        size: int | None,
        source: str | None,
        attrs: tuple[tuple[str, str], ...],
    ) -> model.Device | None:
        dev = self.store.get(name)
        if dev is None:
            return None
        if dev.state == model.DeviceState.CREATING:
            raise errors.OperationPending(f"{name!r} is being created; retry later")
        if dev.state == model.DeviceState.DELETING:
            raise errors.OperationPending(f"{name!r} is being deleted; retry later")
        want = dev.size_bytes if size is None else size
        if not dev.is_compatible_with(kind=kind, size_bytes=want, origin=source, attributes=attrs):
            raise errors.AlreadyExists(
                f"{name!r} exists as {dev.kind.value} of {dev.size_bytes} bytes from {dev.origin!r} "
                f"with {dict(dev.attributes)}, incompatible with {kind.value} of {want} bytes from "
                f"{source!r} with {dict(attrs)}"
            )
        if dev.state == model.DeviceState.LOST:
            raise errors.FailedPrecondition(f"{name!r} exists but is LOST (the pool has no device)")
        return dev

    def _create_fenced(
        self,
        *,
        op: str,
        name: str,
        kind: model.DeviceKind,
        size: int,
        src: model.Device | None,
        attrs: tuple[tuple[str, str], ...],
        deadline: deadline_mod.Deadline,
    ) -> model.Device:
        step_name = "create_thin" if src is None else "create_snap"
        collided: builtins.list[int] = []

        def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
            dev_id = w.allocate_id()
            base = w.transaction_id()
            w.put(
                model.Device(
                    name=name,
                    dev_id=dev_id,
                    kind=kind,
                    state=model.DeviceState.CREATING,
                    size_bytes=size,
                    origin=src.name if src else None,
                    attributes=attrs,
                    created_at=time.time(),
                )
            )
            return w.open_intent(
                op=op,
                name=name,
                dev_id=dev_id,
                size_bytes=size,
                origin_id=src.dev_id if src else None,
                base_txid=base,
                steps=(step_name, "fence"),
                created_at=time.time(),
            )

        def commit(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            rec = w.get(name)
            assert rec is not None and tx.intent.base_txid is not None
            w.put(dataclasses.replace(rec, state=model.DeviceState.READY))
            w.close_intent(tx.intent)
            w.set_transaction_id(tx.intent.base_txid + 1)

        def abort(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            w.remove(name)
            if collided:  # someone else's device holds the id: keep it reserved as an orphan
                w.reserve_orphan(tx.intent.dev_id)
            w.close_intent(tx.intent)

        with self._transition(op, begin=begin, commit=commit, abort=abort, deadline=deadline) as tx:
            dev_id = tx.intent.dev_id
            base = tx.intent.base_txid
            assert base is not None

            def create() -> None:
                try:
                    if src is None:
                        self.backend.create_thin(dev_id, size, deadline=deadline)
                    else:
                        self.backend.create_snap(dev_id, src.dev_id, size, deadline=deadline)
                except errors.AlreadyExists as exc:
                    collided.append(dev_id)
                    raise errors.Unavailable(
                        f"thin id {dev_id} already exists in the pool but no record owns it: "
                        "reserved as an orphan; retry"
                    ) from exc

            def undo_create() -> None:
                if not collided:
                    self._delete_if_present(dev_id, deadline)

            tx.step(step_name, create, undo_create)
            tx.step(
                "fence",
                lambda: self.backend.set_transaction_id(base, base + 1, deadline=deadline),
                lambda: self._unfence(base, deadline),
            )
        dev = self.store.get(name)
        assert dev is not None
        return dev

    def _delete_if_present(self, dev_id: int, deadline: deadline_mod.Deadline) -> None:
        undo_deadline = _grace(deadline)
        if dev_id in self.backend.device_ids(deadline=undo_deadline):
            with contextlib.suppress(errors.NotFound):
                self.backend.delete(dev_id, deadline=undo_deadline)

    def _unfence(self, base: int, deadline: deadline_mod.Deadline) -> None:
        undo_deadline = _grace(deadline)
        if self.backend.transaction_id(deadline=undo_deadline) == base + 1:
            self.backend.set_transaction_id(base + 1, base, deadline=undo_deadline)

    # ---- group snapshots ------------------------------------------------------------------------------

    def create_group_snapshot(
        self, group: str, members: Sequence[tuple[str, str]], *, deadline: deadline_mod.Deadline
    ) -> builtins.list[model.Device]:
        """Snapshots of several volumes at one instant (crash-consistent across them): `members` are
        (snapshot name, source volume) pairs. ONE journalled, fenced mutation: hold every origin
        (backend.quiesce: dm-thin suspends the active ones, reflink freezes their mounted
        filesystems), snapshot each, let go of all (release), fence. Held for the snapshot steps
        only: no LMDB write happens in between (the store may live on no held device, but its writes
        would lengthen the hold). A crash while held is let go by the next assemble; every other
        path releases, and recovery releases again before it finishes or undoes the group.

        Idempotent: the same group with the same members returns the existing group; the same group
        name with other members is AlreadyExists. Returned (and recorded) in the order given."""
        pairs = _group_members(group, members)
        names = [n for n, _ in pairs]
        sources = [src for _, src in pairs]
        with self._claim(_group_key(group), *names, *sources):
            for name in names:  # a stale group intent names its members (never the group alone)
                self._resolve_stale(name, deadline)
            existing = self._existing_group(group, pairs)
            if existing is not None:
                return existing
            st = self._require_mode(modes.Op.CREATE_SNAPSHOT, deadline)
            assert st is not None
            self._require_room(st)
            with self._fenced(deadline):
                existing = self._existing_group(group, pairs)
                if existing is not None:
                    return existing
                srcs = [self._group_source(group, src) for src in sources]
                for name in names:
                    dev = self.store.get(name)
                    if dev is not None:
                        raise errors.AlreadyExists(
                            f"group snapshot {group!r}: member name {name!r} is taken by a "
                            f"{dev.kind.value} of {dev.origin!r} in group {dev.group!r}"
                        )
                self._create_group_fenced(group, names, srcs, deadline)
            got = [self.store.get(n) for n in names]
            return [d for d in got if d is not None]

    def delete_group_snapshot(self, group: str, *, deadline: deadline_mod.Deadline) -> None:
        """Delete every member of the group (each a fenced delete of its own: a crash in between
        leaves some members, which a repeated call deletes). Absent is done."""
        _validate_name(group, "group")
        with self._claim(_group_key(group)):
            members = self.get_group(group)
            # in use: refused whole, before any member goes (delete refuses an active one)
            active = [d.name for d in members if d.active]
            if active:
                raise errors.FailedPrecondition(
                    f"group snapshot {group!r}: member {active[0]!r} is active: deactivate it first"
                )
            for dev in members:
                self.delete(dev.name, deadline=deadline)

    def get_group(self, group: str) -> builtins.list[model.Device]:
        """The group's member snapshots, by name ([] when no such group)."""
        return sorted((d for d in self.store.devices() if d.group == group), key=lambda d: d.name)

    def _existing_group(
        self, group: str, pairs: Sequence[tuple[str, str]]
    ) -> builtins.list[model.Device] | None:
        have = self.get_group(group)
        if not have:
            return None
        busy = [d for d in have if d.state in (model.DeviceState.CREATING, model.DeviceState.DELETING)]
        if busy:
            raise errors.OperationPending(f"group snapshot {group!r} is {busy[0].state.value}; retry later")
        if {(d.name, d.origin) for d in have} != set(pairs):
            raise errors.AlreadyExists(
                f"group snapshot {group!r} exists with members "
                f"{sorted((d.name, d.origin) for d in have)}, not {sorted(pairs)}"
            )
        by_name = {d.name: d for d in have}
        return [by_name[n] for n, _ in pairs]

    def _group_source(self, group: str, source: str) -> model.Device:
        dev = self.store.get(source)
        if dev is None:
            raise errors.NotFound(
                f"group snapshot {group!r}: source volume {source!r} is not in this pool "
                "(every member of a group must live in the same pool)"
            )
        if dev.kind != model.DeviceKind.VOLUME:
            raise errors.InvalidArgument(
                f"group snapshot {group!r}: source {source!r} is a {dev.kind.value}, not a volume"
            )
        return self._ready(source, "source")

    def _quiesce(
        self, origin_ids: Sequence[int], held: builtins.list[int], deadline: deadline_mod.Deadline
    ) -> None:
        """Hold every origin; `held` then names them, or, when the hold failed and could not let go
        of some (HoldLeft), those: the undo tries them again (or the intent stays open), and never
        touches a freeze the hold was refused by (someone else's)."""
        try:
            self.backend.quiesce(origin_ids, deadline=deadline)
        except backend_mod.HoldLeft as exc:
            held.extend(exc.origin_ids)
            raise
        held.extend(origin_ids)

    def _create_group_fenced(
        self,
        group: str,
        names: Sequence[str],
        srcs: Sequence[model.Device],
        deadline: deadline_mod.Deadline,
    ) -> None:
        collided: set[int] = set()
        held: builtins.list[int] = []  # the origins held now (_quiesce)
        origin_ids = [s.dev_id for s in srcs]

        def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
            now = time.time()
            members = []
            for name, src in zip(names, srcs, strict=True):
                dev_id = w.allocate_id()
                w.put(
                    model.Device(
                        name=name,
                        dev_id=dev_id,
                        kind=model.DeviceKind.SNAPSHOT,
                        state=model.DeviceState.CREATING,
                        size_bytes=src.size_bytes,
                        origin=src.name,
                        created_at=now,
                        group=group,
                    )
                )
                members.append((name, dev_id, src.dev_id))
            return w.open_intent(
                op="create_group_snapshot",
                name=group,
                dev_id=members[0][1],
                origin_id=members[0][2],
                base_txid=w.transaction_id(),
                steps=("quiesce", *["create_snap"] * len(members), "release", "fence"),
                created_at=now,
                members=tuple(members),
            )

        def commit(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            assert tx.intent.base_txid is not None
            for name, _, _ in tx.intent.members:
                rec = w.get(name)
                assert rec is not None
                w.put(dataclasses.replace(rec, state=model.DeviceState.READY))
            w.close_intent(tx.intent)
            w.set_transaction_id(tx.intent.base_txid + 1)

        def abort(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            for name, dev_id, _ in tx.intent.members:
                w.remove(name)
                if dev_id in collided:  # someone else's device holds the id: keep it reserved
                    w.reserve_orphan(dev_id)
            w.close_intent(tx.intent)

        def release() -> None:
            # also the first thing every later undo does: the hold ends before anything else
            if held:
                self.backend.release(list(held), deadline=_grace(deadline))
                held.clear()  # let go: a later undo must not thaw a freeze someone else made since

        def let_go() -> None:
            self.backend.release(origin_ids, deadline=_grace(deadline))
            held.clear()  # let go: a later undo must not thaw a freeze someone else has made since

        def create(dev_id: int, origin_id: int, size: int) -> None:
            try:
                self.backend.create_snap(dev_id, origin_id, size, deadline=deadline, held=True)
            except errors.AlreadyExists as exc:
                collided.add(dev_id)
                raise errors.Unavailable(
                    f"thin id {dev_id} already exists in the pool but no record owns it: "
                    "reserved as an orphan; retry"
                ) from exc

        def undo_create(dev_id: int) -> None:
            release()
            if dev_id not in collided:
                self._delete_if_present(dev_id, deadline)

        with self._transition(
            "create_group_snapshot", begin=begin, commit=commit, abort=abort, deadline=deadline
        ) as tx:
            base = tx.intent.base_txid
            assert base is not None
            tx.step("quiesce", functools.partial(self._quiesce, origin_ids, held, deadline), release)
            for (_, dev_id, origin_id), src in zip(tx.intent.members, srcs, strict=True):
                tx.step(
                    "create_snap",
                    functools.partial(create, dev_id, origin_id, src.size_bytes),
                    functools.partial(undo_create, dev_id),
                )
            tx.step("release", let_go, release)
            tx.step(
                "fence",
                lambda: self.backend.set_transaction_id(base, base + 1, deadline=deadline),
                lambda: self._unfence(base, deadline),
            )

    # ---- delete --------------------------------------------------------------------------------------

    def delete(self, name: str, *, deadline: deadline_mod.Deadline) -> None:
        """Delete a device from the pool and its record; absent is done; active is refused."""
        _validate_name(name)
        with self._claim(name):
            self._resolve_stale(name, deadline)
            if self.store.get(name) is None:
                return
            self._require_mode(modes.Op.DELETE, deadline)
            with self._fenced(deadline):
                dev = self.store.get(name)
                if dev is None:
                    return
                if dev.active:
                    raise errors.FailedPrecondition(f"{name!r} is active at {dev.path}: deactivate it first")
                if dev.state == model.DeviceState.LOST:
                    self._forget_lost(dev, deadline)
                    return
                self._delete_fenced(dev, deadline)

    def _forget_lost(self, dev: model.Device, deadline: deadline_mod.Deadline) -> None:
        """A LOST record has no device in the pool: dropping it changes no pool metadata."""
        if dev.dev_id in self.backend.device_ids(deadline=deadline):
            raise errors.FailedPrecondition(f"{dev.name!r} is LOST but the pool shows it: run recovery")
        with self.store.write() as w:
            w.remove(dev.name)

    def _delete_fenced(self, dev: model.Device, deadline: deadline_mod.Deadline) -> None:
        def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
            w.put(dataclasses.replace(dev, state=model.DeviceState.DELETING))
            return w.open_intent(
                op="delete",
                name=dev.name,
                dev_id=dev.dev_id,
                size_bytes=dev.size_bytes,
                base_txid=w.transaction_id(),
                steps=("delete", "fence"),
                created_at=time.time(),
            )

        def commit(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            assert tx.intent.base_txid is not None
            w.remove(dev.name)
            w.close_intent(tx.intent)
            w.set_transaction_id(tx.intent.base_txid + 1)

        def abort(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            w.put(dataclasses.replace(dev, state=model.DeviceState.READY))
            w.close_intent(tx.intent)

        def delete() -> None:
            with contextlib.suppress(errors.NotFound):  # already gone: the delete is done
                self.backend.delete(dev.dev_id, deadline=deadline)

        def undo_delete() -> None:
            undo_deadline = _grace(deadline)
            if dev.dev_id not in self.backend.device_ids(deadline=undo_deadline):
                raise _RollForward  # a delete cannot be undone: finish it

        def undo_fence() -> None:
            raise _RollForward  # the fence runs only after the delete happened

        with self._transition("delete", begin=begin, commit=commit, abort=abort, deadline=deadline) as tx:
            base = tx.intent.base_txid
            assert base is not None
            tx.step("delete", delete, undo_delete)
            tx.step(
                "fence",
                lambda: self.backend.set_transaction_id(base, base + 1, deadline=deadline),
                undo_fence,
            )

    # ---- grow, activate, deactivate (no pool metadata change: journalled, not fenced) ----------------

    def grow(self, name: str, size_bytes: int, *, deadline: deadline_mod.Deadline) -> model.Device:
        """Grow a device (active: the backend reloads its table). Shrinking is OutOfRange.

        Not refused above the space thresholds: growing allocates nothing until written, and existing
        volumes keep working. Refused in every pool condition but rw (modes.TABLE).
        """
        _validate_name(name)
        size = self._size(size_bytes)
        with self._claim(name):
            self._resolve_stale(name, deadline)
            dev = self._ready(name)
            if size < dev.size_bytes:
                raise errors.OutOfRange(f"{name!r} is {dev.size_bytes} bytes; shrinking to {size} is refused")
            if size == dev.size_bytes:
                return dev
            self._require_mode(modes.Op.GROW, deadline)

            def undo() -> None:
                # Growing cannot be undone. A device the kernel did grow (the step, or its failure,
                # came after the reload) is finished instead: the record takes the new size, so it
                # never says less than the kernel; one that did not grow keeps the old size.
                now = self.backend.kernel_size(dev.dev_id, deadline=_grace(deadline))
                if now is not None and now > dev.size_bytes:
                    raise _RollForward

            self._unfenced(
                "grow",
                dev,
                size=size,
                do=lambda: self.backend.resize(dev.dev_id, size, deadline=deadline),
                undo=undo,
                result=lambda d, _: dataclasses.replace(d, size_bytes=size),
                deadline=deadline,
            )
            return self._ready(name)

    def activate(self, name: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        """Make the device a block device (.active, .path). Idempotent."""
        _validate_name(name)
        with self._claim(name):
            self._resolve_stale(name, deadline)
            dev = self._ready(name)
            self._require_mode(modes.Op.ACTIVATE, deadline)

            def undo() -> None:
                if not dev.active:
                    self.backend.deactivate(dev.dev_id, deadline=_grace(deadline))

            self._unfenced(
                "activate",
                dev,
                size=dev.size_bytes,
                do=lambda: self.backend.activate(dev.dev_id, dev.size_bytes, deadline=deadline),
                undo=undo,
                result=lambda d, path: dataclasses.replace(d, active=True, path=str(path)),
                deadline=deadline,
            )
            return self._ready(name)

    def deactivate(self, name: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        """Remove the block device (the data stays). Idempotent."""
        _validate_name(name)
        with self._claim(name):
            self._resolve_stale(name, deadline)
            dev = self.store.get(name)
            if dev is None:
                raise errors.NotFound(f"device {name!r} not found")
            if dev.state in (model.DeviceState.CREATING, model.DeviceState.DELETING):
                raise errors.OperationPending(f"{name!r} is {dev.state.value}; retry later")
            if dev.state == model.DeviceState.LOST and not dev.active:
                return dev
            self._require_mode(modes.Op.DEACTIVATE, deadline)

            def undo() -> None:
                # A deactivate that removed the device and then failed: put the device back.
                undo_deadline = _grace(deadline)
                active = self.backend.active_ids(deadline=undo_deadline)
                if dev.active and dev.dev_id not in active:
                    self.backend.activate(dev.dev_id, dev.size_bytes, deadline=undo_deadline)

            self._unfenced(
                "deactivate",
                dev,
                size=dev.size_bytes,
                do=lambda: self.backend.deactivate(dev.dev_id, deadline=deadline),
                undo=undo,
                result=lambda d, _: dataclasses.replace(d, active=False, path=None),
                deadline=deadline,
            )
            got = self.store.get(name)
            assert got is not None
            return got

    def _unfenced(
        self,
        op: str,
        dev: model.Device,
        *,
        size: int,
        do: Callable[[], object],
        undo: Callable[[], None],
        result: Callable[[model.Device, object], model.Device],
        deadline: deadline_mod.Deadline,
    ) -> None:
        def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
            return w.open_intent(
                op=op,
                name=dev.name,
                dev_id=dev.dev_id,
                size_bytes=size,
                old_size_bytes=dev.size_bytes,
                steps=(op,),
                created_at=time.time(),
            )

        def commit(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            rec = w.get(dev.name)
            assert rec is not None
            w.put(result(rec, tx.result.get("value")))
            w.close_intent(tx.intent)

        def abort(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            w.close_intent(tx.intent)

        with self._transition(op, begin=begin, commit=commit, abort=abort, deadline=deadline) as tx:
            tx.result["value"] = tx.step(op, do, undo)

    # ---- queries -------------------------------------------------------------------------------------

    def get(self, name: str) -> model.Device | None:
        # Reads need no claim: LMDB readers see the last committed state and never block.
        return self.store.get(name)

    def list(self, *, kind: model.DeviceKind | None = None) -> builtins.list[model.Device]:
        """Every record (of `kind`), in name order."""
        return self.store.devices(kind)

    def page(self, kind: model.DeviceKind, *, after: str, limit: int) -> builtins.list[model.Device]:
        """Up to `limit` records of `kind` named after `after`, in name order (from the store's index:
        the same cost on any page of any pool)."""
        return self.store.page(kind, after=after, limit=limit)

    def totals(self) -> model.Totals:
        """Counts and bytes of the records by kind and state (running totals, not a scan)."""
        return self.store.totals()

    def volume_bytes(self) -> int:
        """What overprovisioning counts: the sizes of the volume records in any state (a running
        total) and of containerd's active and view snapshots (writable thin devices too). A committed
        layer, like a snapshot, is read-only for good. The layers are read from the index by kind:
        their number follows the node's images, not its volumes."""
        volumes = self.store.totals().of(kind=model.DeviceKind.VOLUME).size_bytes
        return volumes + sum(
            d.size_bytes
            for d in self.list(kind=model.DeviceKind.LAYER)
            if model.ATTR_LAYER_COMMITTED not in dict(d.attributes)
        )

    def lost(self) -> builtins.list[str]:
        """The names of the LOST records (the store's index of records not READY)."""
        return self.store.names_in(model.DeviceState.LOST)

    def usage(self, name: str, *, deadline: deadline_mod.Deadline) -> int:
        dev = self._ready(name)
        return self.backend.mapped_bytes(dev.dev_id, deadline=deadline)

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        return self.backend.status(deadline=deadline)

    def space_thresholds(self, *, deadline: deadline_mod.Deadline) -> model.Thresholds:
        """The configured thresholds (the controller's view of them; no pool read needed)."""
        del deadline
        return self.thresholds

    def provisioned_bytes(self) -> int:
        return self.store.totals().provisioned_bytes

    def intents(self) -> builtins.list[lmdb_store.Intent]:
        return self.store.intents()

    # ---- changed-block tracking (read-only) ----------------------------------------------------------

    def allocated(
        self, name: str, *, starting_offset: int, deadline: deadline_mod.Deadline
    ) -> model.BlockMap:
        """The ranges of snapshot `name` that hold data, from `starting_offset` on (every range that
        ends after it).

        Read-only, so no claim and no pool lock: a mutation may run beside it. The backend reads one
        consistent view (and releases it before returning); the record is read again afterwards, so
        a snapshot deleted (or replaced) meanwhile is NotFound instead of someone else's blocks."""
        snap = self._snapshot(name, "snapshot")
        _check_offset(starting_offset, snap.size_bytes)
        extents = self.backend.allocated(snap.dev_id, snap.size_bytes, deadline=deadline)
        self._still_there(snap)
        return _block_map(snap.size_bytes, extents, starting_offset)

    def delta(
        self, base: str, target: str, *, starting_offset: int, deadline: deadline_mod.Deadline
    ) -> model.BlockMap:
        """The ranges where snapshot `target` may differ from snapshot `base` of the same volume, from
        `starting_offset` on; the capacity is the target's (a volume may have grown in between).
        Read-only, like `allocated`."""
        b = self._snapshot(base, "base snapshot")
        t = self._snapshot(target, "target snapshot")
        if b.origin != t.origin:
            raise errors.InvalidArgument(
                f"base snapshot {base!r} is of volume {b.origin!r}, target snapshot {target!r} of "
                f"{t.origin!r}: a delta is between two snapshots of the same volume"
            )
        _check_offset(starting_offset, t.size_bytes)
        extents = self.backend.delta(b.dev_id, t.dev_id, t.size_bytes, deadline=deadline)
        self._still_there(b)
        self._still_there(t)
        return _block_map(t.size_bytes, extents, starting_offset)

    def _snapshot(self, name: str, what: str) -> model.Device:
        _validate_name(name, what)
        dev = self.store.get(name)
        if dev is None or dev.kind != model.DeviceKind.SNAPSHOT:
            raise errors.NotFound(f"{what} {name!r} not found")
        return self._ready(name, what)

    def _still_there(self, dev: model.Device) -> None:
        now = self.store.get(dev.name)
        if now is None or (now.dev_id, now.created_at, now.state) != (dev.dev_id, dev.created_at, dev.state):
            raise errors.NotFound(f"snapshot {dev.name!r} was deleted while its blocks were read")

    # ---- orphans ---------------------------------------------------------------------------------

    def orphans(self) -> builtins.list[int]:
        """Pool ids no record owns, as found by the last recovery (reserved; never reused)."""
        return self.store.orphans()

    def gc_orphans(self, *, deadline: deadline_mod.Deadline, force: bool = False) -> builtins.list[int]:
        """Delete every orphan id from the pool (each one a fenced transaction); return them.

        After the store was lost and rebuilt over the pool, every old volume is an orphan: that is not
        garbage, so gc refuses until `force` says the operator knows (and then clears the mark).
        """
        adopted = self.store.adopted()
        if adopted is not None and not force and self.orphans():
            raise errors.FailedPrecondition(
                f"the metadata store was rebuilt over this pool at {time.ctime(adopted)} (the old one was "
                f"lost): its {len(self.orphans())} orphan device(s) are the lost store's volumes, not "
                "garbage; pass --force to delete them anyway"
            )
        return self.delete_orphans(self.orphans(), deadline=deadline)

    def delete_orphans(self, ids: Collection[int], *, deadline: deadline_mod.Deadline) -> builtins.list[int]:
        """Delete these orphan ids from the pool (each one a fenced transaction); return the deleted.

        The caller has decided that they are garbage: `gc_orphans` (standalone: no record owns them,
        and the store was not rebuilt) or the Kubernetes node agent (no CR names them, read afresh
        from the API server). An id that is no orphan (any more) or is active is skipped. With no
        orphan left, a rebuilt store's 'adopted' mark has nothing left to protect and is cleared.
        """
        deleted: builtins.list[int] = []
        self._require_mode(modes.Op.GC, deadline)
        with self._fenced(deadline):
            active = self.backend.active_ids(deadline=deadline)
            orphans = set(self.orphans())
            for dev_id in sorted(ids):
                if dev_id not in orphans:
                    continue
                if dev_id in active:
                    log.warning("event=gc-skip dev_id=%d reason=active", dev_id)
                    continue
                self._gc_one(dev_id, deadline)
                deleted.append(dev_id)
            if self.store.adopted() is not None and not self.orphans():
                with self.store.write() as w:
                    w.clear_adopted()
        return deleted

    def adopt(self, dev: model.Device, *, deadline: deadline_mod.Deadline) -> model.Device:
        """Give an orphan pool id its record back (READY), after the store was lost and rebuilt: the
        caller knows from elsewhere (Kubernetes mode: the CRs) which name, kind, size and origin the id
        had. No pool metadata changes, so nothing is fenced; the pool must still hold the id. Once no
        orphan is left, the store's 'adopted' mark is cleared (gc needs no --force any more)."""
        _validate_name(dev.name)
        with self._claim(dev.name), self._pool_lock:
            existing = self.store.get(dev.name)
            if existing is not None:
                if existing.dev_id != dev.dev_id:
                    raise errors.AlreadyExists(
                        f"{dev.name!r} already has device {existing.dev_id}, not orphan {dev.dev_id}"
                    )
                return existing
            with self.store.write() as w:
                owner = w.owner(dev.dev_id)
                if owner != lmdb_store.ORPHAN:
                    raise errors.FailedPrecondition(
                        f"device id {dev.dev_id} is not an orphan of this pool (owner {owner!r})"
                    )
            if dev.dev_id not in self.backend.device_ids(deadline=deadline):
                raise errors.FailedPrecondition(
                    f"the pool has no device {dev.dev_id} to adopt as {dev.name!r}"
                )
            active = dev.dev_id in self.backend.active_ids(deadline=deadline)
            record = dataclasses.replace(
                dev,
                state=model.DeviceState.READY,
                active=active,
                path=self.backend.device_path(dev.dev_id) if active else None,
                node=None,
            )
            with self.store.write() as w:
                w.free_id(dev.dev_id)
                w.put(record)
            if self.store.adopted() is not None and not self.orphans():
                with self.store.write() as w:
                    w.clear_adopted()
            log.info("event=adopted name=%s dev_id=%d", dev.name, dev.dev_id)
            return record

    def _gc_one(self, dev_id: int, deadline: deadline_mod.Deadline) -> None:
        def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
            return w.open_intent(
                op="gc",
                name=f"orphan-{dev_id}",
                dev_id=dev_id,
                base_txid=w.transaction_id(),
                steps=("delete", "fence"),
                created_at=time.time(),
            )

        def commit(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            assert tx.intent.base_txid is not None
            if w.owner(dev_id) == lmdb_store.ORPHAN:
                w.free_id(dev_id)
            w.close_intent(tx.intent)
            w.set_transaction_id(tx.intent.base_txid + 1)

        def abort(w: lmdb_store.WriteTxn, tx: _Transition) -> None:
            w.close_intent(tx.intent)

        def undo_delete() -> None:
            if dev_id not in self.backend.device_ids(deadline=_grace(deadline)):
                raise _RollForward

        def undo_fence() -> None:
            raise _RollForward

        def delete() -> None:
            with contextlib.suppress(errors.NotFound):
                self.backend.delete(dev_id, deadline=deadline)

        with self._transition("gc", begin=begin, commit=commit, abort=abort, deadline=deadline) as tx:
            base = tx.intent.base_txid
            assert base is not None
            tx.step("delete", delete, undo_delete)
            tx.step(
                "fence",
                lambda: self.backend.set_transaction_id(base, base + 1, deadline=deadline),
                undo_fence,
            )
