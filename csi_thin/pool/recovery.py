"""Start-up recovery: make the pool and the LMDB store agree again after whatever a crash left.

Evidence, in order of trust: the pool's transaction id (moved by exactly one fenced mutation at a
time), the pool's device ids, and the journal's open intents. The rules:

- A fenced intent (create, snapshot, clone, delete, gc) with the pool at base+1: the fence happened,
  so the mutation happened: roll forward. With the pool at base: the fence did not happen: undo
  whatever of its steps the pool shows (delete a created id), except a delete whose device is already
  gone, which can only go forward (fence it, then close it).
- containerd snapshots (csi_thin.pool.layers) move their layer records with their devices: an open
  Prepare (layer_prepare, layer_snap) is always undone, fenced or not (its caller never got the
  mounts; a half-formatted device is no use to anyone): deactivate, delete, set the transaction id
  back. An open Remove (layer_remove) and Commit (layer_commit) are always finished: a delete cannot
  be undone, and a commit is a deactivation plus records.
- Resize intents roll forward (growing is idempotent: the resize is redone on a device the pool
  holds, active or not); activation intents are closed and the `active` flags are taken from the
  kernel.
- A READY record whose id the pool does not have is flagged LOST (never re-created empty). A pool id
  no record owns is an orphan: reserved (never reused) and reported, deleted only by gc_orphans.
  A read-only pool's ids cannot be read live (no metadata snapshot): that check waits for a writable
  pool, and only the active flags are reconciled.

Every step here is idempotent and rechecks the pool before acting, so recovery is itself re-runnable
after a crash at any point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import faults
from csi_thin.store import lmdb_store

log = logging.getLogger(__name__)

#: ops whose kernel steps create a device
CREATE_OPS = frozenset({"create_volume", "create_snapshot", "clone"})
#: ops whose kernel step deletes a device (gc: an orphan, without a record)
DELETE_OPS = frozenset({"delete", "gc"})
#: the op whose one intent names several members (Intent.members), each created from its origin
GROUP_OP = "create_group_snapshot"
#: containerd snapshots (csi_thin.pool.layers): a Prepare or View, always undone when left open
LAYER_CREATE_OPS = frozenset({"layer_prepare", "layer_snap"})


@dataclasses.dataclass(frozen=True)
class RecoveryReport:
    pool_txid: int
    store_txid: int
    adopted_txid: bool = False  # a pristine store took the pool's transaction id
    rolled_forward: tuple[str, ...] = ()
    rolled_back: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()  # names of records whose device the pool does not have
    found: tuple[str, ...] = ()  # LOST records whose device is back
    active_fixed: tuple[str, ...] = ()  # records whose active flag was corrected from the kernel
    orphans: tuple[int, ...] = ()  # pool ids no record owns (reserved, reported, never reused)
    #: False when the pool was read-only: its ids cannot be read live, so LOST and orphans were not
    #: looked for (records and reservations kept as they were; the next recovery on a writable pool does)
    ids_checked: bool = True
    #: where the store's index and running totals disagreed with its records (rebuilt from them)
    index_repaired: tuple[str, ...] = ()

    def clean(self) -> bool:
        return not (self.lost or self.orphans)


class TransactionMismatch(errors.Internal):
    """The pool and the store disagree by more than one fenced mutation: nothing is guessed."""


def _mismatch(pool_txid: int, store_txid: int, what: str) -> TransactionMismatch:
    return TransactionMismatch(
        f"pool transaction id {pool_txid} vs store {store_txid} ({what}): the pool and the LMDB store "
        "disagree by more than one mutation; refusing to guess. Check that the right pool was assembled "
        "for this state_dir."
    )


def resolve_intent(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    deadline: deadline_mod.Deadline,
) -> str:
    """Finish or undo one open intent; return "forward" or "back". Idempotent."""
    if intent.fenced:
        return _resolve_fenced(backend, store, intent, deadline=deadline)
    return _resolve_unfenced(backend, store, intent, deadline=deadline)


def _resolve_fenced(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    deadline: deadline_mod.Deadline,
) -> str:
    assert intent.base_txid is not None
    base = intent.base_txid
    store_txid = store.transaction_id()
    pool_txid = backend.transaction_id(deadline=deadline)
    if store_txid != base or pool_txid not in (base, base + 1):
        raise _mismatch(pool_txid, store_txid, f"open intent {intent.op} {intent.name!r} at base {base}")
    if intent.op == GROUP_OP:
        return _resolve_group(backend, store, intent, fenced=pool_txid == base + 1, deadline=deadline)
    in_pool = intent.dev_id in backend.device_ids(deadline=deadline)
    fenced = pool_txid == base + 1
    log.info(
        "event=resolve op=%s name=%s dev_id=%d base=%d pool_txid=%d in_pool=%s",
        intent.op,
        intent.name,
        intent.dev_id,
        base,
        pool_txid,
        in_pool,
    )

    if intent.op in CREATE_OPS:
        return _resolve_create(backend, store, intent, fenced=fenced, in_pool=in_pool, deadline=deadline)
    if intent.op in DELETE_OPS:
        return _resolve_delete(backend, store, intent, fenced=fenced, in_pool=in_pool, deadline=deadline)
    if intent.op in LAYER_CREATE_OPS:
        return _undo_layer_create(backend, store, intent, fenced=fenced, in_pool=in_pool, deadline=deadline)
    if intent.op == "layer_remove":
        return _finish_layer_remove(backend, store, intent, fenced=fenced, in_pool=in_pool, deadline=deadline)
    raise errors.Internal(f"journal: unknown fenced op {intent.op!r}")


def _drop_layers(w: lmdb_store.WriteTxn, device: str) -> None:
    """Remove every layer record naming the device (a Prepare's pending record, a removed one)."""
    for layer in w.layers():
        if layer.device == device:
            w.remove_layer(layer.key)


def _undo_layer_create(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    fenced: bool,
    in_pool: bool,
    deadline: deadline_mod.Deadline,
) -> str:
    """An open Prepare: whatever it got to (created, fenced, activated, half-formatted), undone."""
    assert intent.base_txid is not None
    base = intent.base_txid
    if in_pool:
        faults.reach(f"recover/{intent.op}/deactivate")
        backend.deactivate(intent.dev_id, deadline=deadline)
        faults.reach(f"recover/{intent.op}/deactivate:done")
        faults.reach(f"recover/{intent.op}/delete")
        with contextlib.suppress(errors.NotFound):
            backend.delete(intent.dev_id, deadline=deadline)
        faults.reach(f"recover/{intent.op}/delete:done")
    if fenced:  # the store never took base+1: the pool's id goes back, as the engine's own undo does
        faults.reach(f"recover/{intent.op}/unfence")
        backend.set_transaction_id(base + 1, base, deadline=deadline)
        faults.reach(f"recover/{intent.op}/unfence:done")
    with store.write() as w:
        _drop(w, intent)
        _drop_layers(w, intent.name)
        w.close_intent(intent)
    return "back"


def _finish_layer_remove(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    fenced: bool,
    in_pool: bool,
    deadline: deadline_mod.Deadline,
) -> str:
    """An open Remove: finished (deactivate, delete, fence) and its records dropped."""
    assert intent.base_txid is not None
    base = intent.base_txid
    if not fenced:
        if in_pool:
            faults.reach("recover/layer_remove/deactivate")
            backend.deactivate(intent.dev_id, deadline=deadline)
            faults.reach("recover/layer_remove/deactivate:done")
            faults.reach("recover/layer_remove/delete")
            with contextlib.suppress(errors.NotFound):
                backend.delete(intent.dev_id, deadline=deadline)
            faults.reach("recover/layer_remove/delete:done")
        faults.reach("recover/layer_remove/fence")
        backend.set_transaction_id(base, base + 1, deadline=deadline)
        faults.reach("recover/layer_remove/fence:done")
    with store.write() as w:
        _drop(w, intent)
        _drop_layers(w, intent.name)
        w.close_intent(intent)
        w.set_transaction_id(base + 1)
    return "forward"


def _finish_layer_commit(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    deadline: deadline_mod.Deadline,
) -> str:
    """An open Commit: the device deactivated, the committed record kept, the active one dropped."""
    faults.reach("recover/layer_commit/deactivate")
    backend.deactivate(intent.dev_id, deadline=deadline)
    faults.reach("recover/layer_commit/deactivate:done")
    with store.write() as w:
        rec = w.get(intent.name)
        if rec is not None and rec.dev_id == intent.dev_id:
            w.put(
                dataclasses.replace(
                    rec, active=False, path=None, attributes=model.committed_layer(rec.attributes)
                )
            )
        for layer in w.layers():
            if layer.device != intent.name:
                continue
            if layer.pending == model.LayerPending.COMMIT:
                w.put_layer(dataclasses.replace(layer, pending=model.LayerPending.NONE))
            elif layer.kind == model.LayerKind.ACTIVE:
                w.remove_layer(layer.key)
        w.close_intent(intent)
    return "forward"


def _resolve_create(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    fenced: bool,
    in_pool: bool,
    deadline: deadline_mod.Deadline,
) -> str:
    assert intent.base_txid is not None
    if fenced:
        with store.write() as w:
            rec = w.get(intent.name)
            if rec is not None and rec.dev_id == intent.dev_id:
                state = model.DeviceState.READY if in_pool else model.DeviceState.LOST
                w.put(dataclasses.replace(rec, state=state))
            w.close_intent(intent)
            w.set_transaction_id(intent.base_txid + 1)
        return "forward"
    if in_pool:
        faults.reach(f"recover/{intent.op}/delete")
        with contextlib.suppress(errors.NotFound):
            backend.delete(intent.dev_id, deadline=deadline)
        faults.reach(f"recover/{intent.op}/delete:done")
    with store.write() as w:
        _drop(w, intent)
        w.close_intent(intent)
    return "back"


def _resolve_group(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    fenced: bool,
    deadline: deadline_mod.Deadline,
) -> str:
    """A group snapshot: first let go of every origin (an undo that failed may have left one
    suspended or frozen, and that hangs its writers: the assemble before a start-up recovery has
    done it already, this is for the engine's own resolution), then all members go forward (fenced)
    or back (each member the pool shows is deleted), never some of each."""
    assert intent.base_txid is not None
    origin_ids = sorted({origin_id for _, _, origin_id in intent.members})
    faults.reach(f"recover/{GROUP_OP}/release")
    backend.release(origin_ids, deadline=deadline)
    faults.reach(f"recover/{GROUP_OP}/release:done")
    pool_ids = backend.device_ids(deadline=deadline)
    log.info(
        "event=resolve op=%s name=%s members=%d fenced=%s",
        intent.op,
        intent.name,
        len(intent.members),
        fenced,
    )
    if fenced:
        with store.write() as w:
            for name, dev_id, _ in intent.members:
                rec = w.get(name)
                if rec is not None and rec.dev_id == dev_id:
                    state = model.DeviceState.READY if dev_id in pool_ids else model.DeviceState.LOST
                    w.put(dataclasses.replace(rec, state=state))
            w.close_intent(intent)
            w.set_transaction_id(intent.base_txid + 1)
        return "forward"
    for _, dev_id, _ in intent.members:
        if dev_id in pool_ids:
            faults.reach(f"recover/{GROUP_OP}/delete")
            with contextlib.suppress(errors.NotFound):
                backend.delete(dev_id, deadline=deadline)
            faults.reach(f"recover/{GROUP_OP}/delete:done")
    with store.write() as w:
        for name, dev_id, _ in intent.members:
            _drop_member(w, name, dev_id)
        w.close_intent(intent)
    return "back"


def _drop_member(w: lmdb_store.WriteTxn, name: str, dev_id: int) -> None:
    rec = w.get(name)
    if rec is not None and rec.dev_id == dev_id:
        w.remove(name)
    elif w.owner(dev_id) in (name, lmdb_store.ORPHAN):
        w.free_id(dev_id)


def _drop(w: lmdb_store.WriteTxn, intent: lmdb_store.Intent) -> None:
    """Remove the intent's record (if it still owns the intent's id) and free the id."""
    rec = w.get(intent.name) if intent.op != "gc" else None
    if rec is not None and rec.dev_id == intent.dev_id:
        w.remove(intent.name)
    elif w.owner(intent.dev_id) in (intent.name, lmdb_store.ORPHAN):
        w.free_id(intent.dev_id)


def _resolve_delete(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    fenced: bool,
    in_pool: bool,
    deadline: deadline_mod.Deadline,
) -> str:
    assert intent.base_txid is not None
    base = intent.base_txid
    if not fenced and in_pool:  # the delete did not happen: undo = keep the device
        with store.write() as w:
            rec = w.get(intent.name) if intent.op == "delete" else None
            if rec is not None and rec.dev_id == intent.dev_id:
                w.put(dataclasses.replace(rec, state=model.DeviceState.READY))
            w.close_intent(intent)
        return "back"
    if not fenced:  # deleted but not fenced: a delete cannot be undone, finish it
        faults.reach(f"recover/{intent.op}/fence")
        backend.set_transaction_id(base, base + 1, deadline=deadline)
        faults.reach(f"recover/{intent.op}/fence:done")
    with store.write() as w:
        _drop(w, intent)
        w.close_intent(intent)
        w.set_transaction_id(base + 1)
    return "forward"


def _resolve_unfenced(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    intent: lmdb_store.Intent,
    *,
    deadline: deadline_mod.Deadline,
) -> str:
    if intent.op == "grow":
        in_pool = intent.dev_id in backend.device_ids(deadline=deadline)
        if in_pool:
            # active or not: a reflink device keeps its size in its file (dm-thin: a no-op when inactive).
            # Never below what the kernel already holds (a shrink, refused by every backend), and redone
            # even where it holds enough: the step may have stopped half-way (reflink: the file grown,
            # the loop device's capacity not yet refreshed)
            now = backend.kernel_size(intent.dev_id, deadline=deadline) or 0
            faults.reach("recover/grow/resize")
            backend.resize(intent.dev_id, max(intent.size_bytes, now), deadline=deadline)
            faults.reach("recover/grow/resize:done")
        with store.write() as w:
            rec = w.get(intent.name)
            if in_pool and rec is not None and rec.dev_id == intent.dev_id:
                w.put(dataclasses.replace(rec, size_bytes=max(rec.size_bytes, intent.size_bytes)))
            w.close_intent(intent)
        return "forward"
    if intent.op == "layer_commit":
        return _finish_layer_commit(backend, store, intent, deadline=deadline)
    if intent.op in ("activate", "deactivate"):
        active = intent.dev_id in backend.active_ids(deadline=deadline)
        with store.write() as w:
            rec = w.get(intent.name)
            if rec is not None and rec.dev_id == intent.dev_id:
                path = backend.device_path(intent.dev_id) if active else None
                w.put(dataclasses.replace(rec, active=active, path=path))
            w.close_intent(intent)
        return "forward" if active == (intent.op == "activate") else "back"
    raise errors.Internal(f"journal: unknown op {intent.op!r}")


def recover(
    backend: backend_mod.Backend,
    store: lmdb_store.LmdbStore,
    *,
    deadline: deadline_mod.Deadline,
) -> RecoveryReport:
    """Resolve every open intent, then reconcile records, ids and active flags with the pool."""
    forward: list[str] = []
    back: list[str] = []
    intents = store.intents()
    pool_txid = backend.transaction_id(deadline=deadline)
    adopted = False
    if store.is_pristine() and not intents and pool_txid != store.transaction_id():
        # A new store over an existing pool (state_dir lost): adopt the pool's id; its devices are
        # reported as orphans below, never deleted, and marked so that gc refuses to treat the lost
        # store's volumes as garbage without --force.
        with store.write() as w:
            w.set_transaction_id(pool_txid)
            w.set_adopted(time.time())
        adopted = True

    fenced = [i for i in intents if i.fenced]
    if len(fenced) > 1:
        raise errors.Internal(
            f"journal holds {len(fenced)} open fenced intents (at most one can exist): "
            + ", ".join(f"{i.op} {i.name!r}" for i in fenced)
        )
    for intent in intents:
        result = resolve_intent(backend, store, intent, deadline=deadline)
        (forward if result == "forward" else back).append(f"{intent.op} {intent.name}")

    pool_txid = backend.transaction_id(deadline=deadline)
    store_txid = store.transaction_id()
    if pool_txid != store_txid:
        raise _mismatch(pool_txid, store_txid, "no open intent")

    active_ids = backend.active_ids(deadline=deadline)
    pool_ids: dict[int, int] | None = None
    if backend.status(deadline=deadline).mode == model.PoolMode.RO:
        # A read-only pool (metadata full or damaged) takes no messages, so no metadata snapshot: its
        # ids cannot be read while it is live. Nothing can be created or deleted either, so the records
        # stand as they are; failing here would take the driver, and with it every existing volume, down.
        log.warning("event=ids-unchecked reason=pool read-only; LOST and orphans are checked once writable")
    else:
        pool_ids = backend.device_ids(deadline=deadline)
    # One write transaction, and no record read that need not change: the index's summaries say
    # which records the pool's evidence changes (the start-up cost that grows with the pool)
    with store.write() as w:
        summaries, index_repaired = w.verified_summaries()
        lost, found, fixed = _reconcile_records(
            backend, w, summaries, pool_ids=pool_ids, active_ids=active_ids
        )
        if pool_ids is None:
            orphans = sorted(i for i, owner in w.ids().items() if owner == lmdb_store.ORPHAN)
        else:
            orphans = _reconcile_ids(w, summaries, pool_ids=pool_ids)
    ids_checked = pool_ids is not None
    if index_repaired:
        log.warning("event=index-repaired differences=%d first=%r", len(index_repaired), index_repaired[:5])
    for name in lost:
        log.warning("event=lost name=%s reason=record READY but the pool has no such device", name)
    if orphans and store.adopted() is not None:
        log.warning(
            "event=orphans ids=%s reason=the metadata store was lost and rebuilt over the pool: these are "
            "its volumes without their names, not garbage; 'csi-thin pool gc --orphans' refuses them "
            "unless --force",
            orphans,
        )
    elif orphans:
        log.warning("event=orphans ids=%s hint='csi-thin pool gc --orphans' deletes them", orphans)
    return RecoveryReport(
        pool_txid=pool_txid,
        store_txid=store.transaction_id(),
        adopted_txid=adopted,
        rolled_forward=tuple(forward),
        rolled_back=tuple(back),
        lost=tuple(sorted(lost)),
        found=tuple(sorted(found)),
        active_fixed=tuple(sorted(fixed)),
        orphans=tuple(orphans),
        ids_checked=ids_checked,
        index_repaired=tuple(index_repaired),
    )


def _settled(sm: lmdb_store.Summary, *, pool_ids: dict[int, int] | None, active_ids: set[int]) -> bool:
    """True when the pool's evidence changes nothing of this record (READY, in the pool, inactive,
    and the kernel agrees): the one case that needs no read of the record."""
    return (
        sm.state == model.DeviceState.READY
        and not sm.active
        and sm.dev_id not in active_ids
        and (pool_ids is None or sm.dev_id in pool_ids)
    )


def _reconcile_records(
    backend: backend_mod.Backend,
    w: lmdb_store.WriteTxn,
    summaries: list[lmdb_store.Summary],
    *,
    pool_ids: dict[int, int] | None,
    active_ids: set[int],
) -> tuple[list[str], list[str], list[str]]:
    """Flag LOST (or found again) records and take the active flags from the kernel (only the
    active flags when `pool_ids` is None: the pool's ids could not be read)."""
    lost: list[str] = []
    found: list[str] = []
    fixed: list[str] = []
    for sm in summaries:
        if _settled(sm, pool_ids=pool_ids, active_ids=active_ids):
            continue
        rec = w.get(sm.name)
        assert rec is not None, sm
        new = rec
        in_pool = pool_ids is None or rec.dev_id in pool_ids
        if pool_ids is None:
            if rec.state == model.DeviceState.LOST:
                lost.append(rec.name)
        elif rec.state == model.DeviceState.READY and not in_pool:
            new = dataclasses.replace(new, state=model.DeviceState.LOST)
            lost.append(rec.name)
        elif rec.state == model.DeviceState.LOST and in_pool:
            new = dataclasses.replace(new, state=model.DeviceState.READY)
            found.append(rec.name)
        elif rec.state in (model.DeviceState.CREATING, model.DeviceState.DELETING):
            # Impossible by construction (the "-ing" state and its intent are written in one
            # LMDB transaction): keep whatever the pool has, never lose it.
            new = dataclasses.replace(
                new, state=model.DeviceState.READY if in_pool else model.DeviceState.LOST
            )
            (found if in_pool else lost).append(rec.name)
        elif rec.state == model.DeviceState.LOST:
            lost.append(rec.name)
        active = rec.dev_id in active_ids
        path = backend.device_path(rec.dev_id) if active else None
        if (new.active, new.path) != (active, path):
            new = dataclasses.replace(new, active=active, path=path)
            fixed.append(rec.name)
        if new != rec:
            w.put(new)
    return lost, found, fixed


def _reconcile_ids(
    w: lmdb_store.WriteTxn, summaries: list[lmdb_store.Summary], *, pool_ids: dict[int, int]
) -> list[int]:
    """Free allocations nothing holds; reserve (and return) pool ids no record owns."""
    owned = {sm.dev_id: sm.name for sm in summaries}
    for dev_id, owner in w.ids().items():
        if owner == lmdb_store.ORPHAN:
            if dev_id not in pool_ids:
                w.free_id(dev_id)
        elif owned.get(dev_id) != owner:
            w.free_id(dev_id)  # an allocation no record holds: nothing in the pool either
    orphans = sorted(i for i in pool_ids if i not in owned)
    for dev_id in orphans:
        w.reserve_orphan(dev_id)
    return orphans
