"""containerd snapshots on the pool: the journalled transactions behind csi_thin.snapshotter.

A containerd snapshot is a Layer record (its containerd key, kind, parent, labels; the store's
`layers` key space) naming a thin device whose Device record has kind LAYER. Each mutation is ONE
journalled transaction of the engine (csi_thin.pool.engine's `_transition`: intent first, each
step with its undo, the result in one LMDB commit), with its fault points declared in
csi_thin.pool.faults and its crash left-overs finished or undone by csi_thin.pool.recovery:

    layer_prepare  create_thin, fence, activate, mkfs   a base layer: new device, formatted, active
    layer_snap     create_snap, fence, activate         a snapshot of a committed (inactive) parent
    layer_commit   deactivate                           active -> committed: renamed, deactivated
    layer_remove   discard, deactivate, delete, fence   the device gone with its records

The layer records move with the device record in the same LMDB transactions: a Prepare writes its
record (pending) with the intent and clears `pending` with the commit, so a reader never sees a
layer whose device is not there yet; recovery always undoes an open prepare (the caller never got
its mounts) and always finishes an open remove or commit (containerd asked for them; a delete
cannot be undone).

Keys are containerd's strings (any length up to MAX_KEY_BYTES, '/' and all): the device gets a
name of its own, `l-` + 40 random hex digits, recorded in the layer record. Claims: the key (and the
parent's, shared: Prepares of its children run together, its Remove waits) in the engine's claim
space under `layer:`.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.pool import engine as engine_mod
from csi_thin.pool import modes
from csi_thin.store import lmdb_store

log = logging.getLogger(__name__)

#: LMDB keys hold at most 511 bytes; containerd's keys are far shorter in practice
MAX_KEY_BYTES = 500
DEVICE_PREFIX = "l-"

#: formats a blank device at the path (mkfs with the snapshotter's fs_type and fs_options)
Formatter = Callable[[str, deadline_mod.Deadline], None]
#: discards every block of the device at the path (blkdiscard), before it is deleted
Discarder = Callable[[str, deadline_mod.Deadline], None]


def validate_key(key: str, what: str = "key") -> None:
    if not key:
        raise errors.InvalidArgument(f"{what} must not be empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise errors.InvalidArgument(f"{what} is {len(key.encode())} bytes, at most {MAX_KEY_BYTES}")
    if "\x00" in key:
        raise errors.InvalidArgument(f"{what} {key!r}: no NUL characters")


def _claim_name(key: str) -> str:
    return f"layer:{key}"


def new_device_name() -> str:
    """Random, not derived from the key: a key may be prepared again while the device of its last
    life still waits for Cleanup (async_remove)."""
    return DEVICE_PREFIX + secrets.token_hex(20)


def _inherited(attrs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A snapshot's device attributes from its committed parent's: not the committed mark."""
    return tuple(kv for kv in attrs if kv[0] != model.ATTR_LAYER_COMMITTED)


class Layers:
    """The layer transactions over one engine (which owns the claims, the pool lock and the store)."""

    def __init__(self, engine: engine_mod.PoolEngine) -> None:
        self.engine = engine
        self.store = engine.store

    # ---- reads (no claim: LMDB readers see the last committed state) ---------------------------------

    def get(self, key: str) -> model.Layer | None:
        layer = self.store.layer(key)
        return None if layer is None or layer.pending != model.LayerPending.NONE else layer

    def require(self, key: str) -> model.Layer:
        validate_key(key)
        layer = self.get(key)
        if layer is None:
            raise errors.NotFound(f"snapshot {key!r} does not exist")
        return layer

    def list(self) -> builtins.list[model.Layer]:
        return sorted(
            (x for x in self.store.layers() if x.pending == model.LayerPending.NONE), key=lambda x: x.key
        )

    def device(self, layer: model.Layer) -> model.Device:
        dev = self.store.get(layer.device)
        if dev is None:
            raise errors.Internal(f"snapshot {layer.key!r}: its device {layer.device!r} has no record")
        return dev

    def usage(self, key: str, *, deadline: deadline_mod.Deadline) -> int:
        """The bytes the pool has mapped for the snapshot's device (shared blocks included)."""
        layer = self.require(key)
        return self.engine.usage(layer.device, deadline=deadline)

    # ---- claims ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _claim(self, *keys: str, devices: tuple[str, ...] = (), parent: str = "") -> Iterator[None]:
        """`parent`: claimed shared (Prepares of its children run together; its Remove waits)."""
        shared = (_claim_name(parent),) if parent else ()
        with self.engine._claim(*(_claim_name(k) for k in keys), *devices, shared=shared):
            yield

    def _resolve_stale(self, key: str, deadline: deadline_mod.Deadline) -> None:
        """Holding the key's claim: an open intent on the device its record names is left by an undo
        that failed; it is resolved as recovery would (recovery moves the layer records too). Not
        only a pending record has one: a Commit left open keeps the ACTIVE record of its key beside
        its pending committed one, and recovery finishes it, so the key is committed already (a
        second Commit of it would give the device two committed snapshots, a Mounts would activate
        a committed layer). Every call on a key names it here first."""
        layer = self.store.layer(key)
        if layer is None or not self.stale(layer):
            return
        # every call on the device holds the claim of a key naming it: none is in flight
        with self.engine._claim(layer.device):
            self.engine._resolve_stale(layer.device, deadline)

    def stale(self, layer: model.Layer) -> bool:
        """An intent on the layer's device is open (a failed undo left it: see _resolve_stale)."""
        return any(i.name == layer.device for i in self.store.intents())

    # ---- Prepare / View ----------------------------------------------------------------------------

    def prepare(
        self,
        key: str,
        *,
        parent: str,
        kind: model.LayerKind,
        labels: Mapping[str, str],
        size_bytes: int,
        fmt: Formatter,
        attributes: Mapping[str, str],
        deadline: deadline_mod.Deadline,
    ) -> tuple[model.Layer, model.Device]:
        """An active (or view) snapshot `key`: a new device of `size_bytes` formatted by `fmt`,
        with these device `attributes`, without a parent; else a snapshot of the committed parent's
        device (its size and attributes). Returns it activated."""
        validate_key(key)
        if parent:
            validate_key(parent, "parent")
        if kind == model.LayerKind.COMMITTED:
            raise errors.InvalidArgument("a snapshot is prepared active or as a view, never committed")
        size = self.engine._size(size_bytes)
        eng = self.engine
        with self._claim(key, parent=parent):
            self._resolve_stale(key, deadline)
            if self.store.layer(key) is not None:
                raise errors.AlreadyExists(f"snapshot {key!r} already exists")
            src = self._parent_device(parent) if parent else None
            op = modes.Op.CREATE_SNAPSHOT if src else modes.Op.CREATE_VOLUME
            st = eng._require_mode(op, deadline)
            assert st is not None
            eng._require_room(st)
            with eng._fenced(deadline):
                if self.store.layer(key) is not None:
                    raise errors.AlreadyExists(f"snapshot {key!r} already exists")
                now = time.time()
                layer = model.Layer(
                    key=key,
                    device=new_device_name(),
                    kind=kind,
                    parent=parent,
                    labels=model.attributes(labels),
                    created_at=now,
                    updated_at=now,
                    pending=model.LayerPending.PREPARE,
                )
                return self._prepare_fenced(
                    layer,
                    size=src.size_bytes if src else size,
                    src=src,
                    fmt=fmt,
                    attrs=_inherited(src.attributes) if src else model.attributes(attributes),
                    deadline=deadline,
                )

    def _parent_device(self, parent: str) -> model.Device:
        par = self.get(parent)
        if par is None:
            raise errors.NotFound(f"parent snapshot {parent!r} does not exist")
        if par.kind != model.LayerKind.COMMITTED:
            raise errors.InvalidArgument(f"parent {parent!r} is not a committed snapshot ({par.kind.value})")
        return self.engine._ready(par.device, "parent snapshot device")

    def _prepare_fenced(
        self,
        layer: model.Layer,
        *,
        size: int,
        src: model.Device | None,
        fmt: Formatter,
        attrs: tuple[tuple[str, str], ...],
        deadline: deadline_mod.Deadline,
    ) -> tuple[model.Layer, model.Device]:
        eng = self.engine
        op = "layer_snap" if src else "layer_prepare"
        create_step = "create_snap" if src else "create_thin"
        name = layer.device
        collided: builtins.list[int] = []

        def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
            dev_id = w.allocate_id()
            w.put(
                model.Device(
                    name=name,
                    dev_id=dev_id,
                    kind=model.DeviceKind.LAYER,
                    state=model.DeviceState.CREATING,
                    size_bytes=size,
                    origin=src.name if src else None,
                    attributes=attrs,
                    created_at=layer.created_at,
                )
            )
            w.put_layer(layer)
            return w.open_intent(
                op=op,
                name=name,
                dev_id=dev_id,
                size_bytes=size,
                origin_id=src.dev_id if src else None,
                base_txid=w.transaction_id(),
                steps=(create_step, "fence", "activate", *(() if src else ("mkfs",))),
                created_at=time.time(),
            )

        def commit(w: lmdb_store.WriteTxn, tx: engine_mod._Transition) -> None:
            rec = w.get(name)
            assert rec is not None and tx.intent.base_txid is not None
            path = str(tx.result["path"])
            w.put(dataclasses.replace(rec, state=model.DeviceState.READY, active=True, path=path))
            w.put_layer(dataclasses.replace(layer, pending=model.LayerPending.NONE))
            w.close_intent(tx.intent)
            w.set_transaction_id(tx.intent.base_txid + 1)

        def abort(w: lmdb_store.WriteTxn, tx: engine_mod._Transition) -> None:
            w.remove(name)
            w.remove_layer(layer.key)
            if collided:  # someone else's device holds the id: keep it reserved as an orphan
                w.reserve_orphan(tx.intent.dev_id)
            w.close_intent(tx.intent)

        with eng._transition(op, begin=begin, commit=commit, abort=abort, deadline=deadline) as tx:
            dev_id = tx.intent.dev_id
            base = tx.intent.base_txid
            assert base is not None

            def create() -> None:
                try:
                    if src is None:
                        eng.backend.create_thin(dev_id, size, deadline=deadline)
                    else:
                        eng.backend.create_snap(dev_id, src.dev_id, size, deadline=deadline)
                except errors.AlreadyExists as exc:
                    collided.append(dev_id)
                    raise errors.Unavailable(
                        f"thin id {dev_id} already exists in the pool but no record owns it: "
                        "reserved as an orphan; retry"
                    ) from exc

            def undo_create() -> None:
                if not collided:
                    eng._delete_if_present(dev_id, deadline)

            def undo_activate() -> None:
                eng.backend.deactivate(dev_id, deadline=engine_mod._grace(deadline))

            tx.step(create_step, create, undo_create)
            tx.step(
                "fence",
                lambda: eng.backend.set_transaction_id(base, base + 1, deadline=deadline),
                lambda: eng._unfence(base, deadline),
            )
            path = tx.step(
                "activate", lambda: eng.backend.activate(dev_id, size, deadline=deadline), undo_activate
            )
            tx.result["path"] = path
            if src is None:
                # nothing to undo: the device it wrote to is deleted by create's undo
                tx.step("mkfs", lambda: fmt(path, deadline), lambda: None)
        got = self.store.layer(layer.key)
        dev = self.store.get(name)
        assert got is not None and dev is not None
        return got, dev

    # ---- Mounts ------------------------------------------------------------------------------------

    def activate(self, key: str, *, deadline: deadline_mod.Deadline) -> tuple[model.Layer, model.Device]:
        """The active or view snapshot's device made active (again, after a node restart), holding
        the key's claim: a Commit of the key (which deactivates the device for good) cannot run
        between the check of its kind and the activation."""
        validate_key(key)
        with self._claim(key):
            self._resolve_stale(key, deadline)
            layer = self.require(key)
            if layer.kind == model.LayerKind.COMMITTED:
                raise errors.FailedPrecondition(
                    f"snapshot {key!r} is committed: only active and view snapshots mount"
                )
            return layer, self.engine.activate(layer.device, deadline=deadline)

    # ---- Commit ------------------------------------------------------------------------------------

    def commit(
        self, name: str, key: str, *, labels: Mapping[str, str], deadline: deadline_mod.Deadline
    ) -> model.Layer:
        """The active snapshot `key` becomes the committed snapshot `name` (with these labels; an
        active's labels are not inherited, as in containerd), and its device is deactivated."""
        validate_key(name, "name")
        validate_key(key)
        if name == key:
            raise errors.InvalidArgument(f"commit name and key are both {key!r}")
        eng = self.engine
        with self._claim(key, name):
            self._resolve_stale(key, deadline)
            self._resolve_stale(name, deadline)
            active = self.require(key)
            if active.kind != model.LayerKind.ACTIVE:
                raise errors.FailedPrecondition(f"snapshot {key!r} is not active ({active.kind.value})")
            if self.store.layer(name) is not None:
                raise errors.AlreadyExists(f"snapshot {name!r} already exists")
            now = time.time()
            done = model.Layer(
                key=name,
                device=active.device,
                kind=model.LayerKind.COMMITTED,
                parent=active.parent,
                labels=model.attributes(labels),
                created_at=now,
                updated_at=now,
            )
            with eng._claim(active.device):  # a Mounts (activate) of the key waits its turn
                self._commit(active, done, deadline=deadline)
            return self.require(name)

    def _commit(self, active: model.Layer, done: model.Layer, *, deadline: deadline_mod.Deadline) -> None:
        eng = self.engine
        dev = eng._ready(active.device, "snapshot device")
        eng._require_mode(modes.Op.DEACTIVATE, deadline)

        def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
            w.put_layer(dataclasses.replace(done, pending=model.LayerPending.COMMIT))
            return w.open_intent(
                op="layer_commit",
                name=dev.name,
                dev_id=dev.dev_id,
                size_bytes=dev.size_bytes,
                old_size_bytes=dev.size_bytes,
                steps=("deactivate",),
                created_at=time.time(),
            )

        def commit(w: lmdb_store.WriteTxn, tx: engine_mod._Transition) -> None:
            rec = w.get(dev.name)
            assert rec is not None
            w.put(
                dataclasses.replace(
                    rec, active=False, path=None, attributes=model.committed_layer(rec.attributes)
                )
            )
            w.remove_layer(active.key)
            w.put_layer(done)
            w.close_intent(tx.intent)

        def abort(w: lmdb_store.WriteTxn, tx: engine_mod._Transition) -> None:
            w.remove_layer(done.key)
            w.close_intent(tx.intent)

        def undo() -> None:
            # the active snapshot's mounts name its device: make it whole again
            if dev.active:
                eng.backend.activate(dev.dev_id, dev.size_bytes, deadline=engine_mod._grace(deadline))

        with eng._transition(
            "layer_commit", begin=begin, commit=commit, abort=abort, deadline=deadline
        ) as tx:
            tx.step("deactivate", lambda: eng.backend.deactivate(dev.dev_id, deadline=deadline), undo)

    # ---- Update (labels: no pool change, one LMDB transaction) ---------------------------------------

    def set_labels(self, key: str, labels: Mapping[str, str]) -> model.Layer:
        validate_key(key)
        with self._claim(key), self.store.write() as w:
            layer = w.layer(key)
            if layer is None or layer.pending != model.LayerPending.NONE:
                raise errors.NotFound(f"snapshot {key!r} does not exist")
            new = dataclasses.replace(layer, labels=model.attributes(labels), updated_at=time.time())
            w.put_layer(new)
        return new

    # ---- Remove / Cleanup ----------------------------------------------------------------------------

    def remove(
        self,
        key: str,
        *,
        deferred: bool,
        discard: Discarder | None,
        deadline: deadline_mod.Deadline,
    ) -> None:
        """Remove the snapshot `key` (a leaf: one with children is FailedPrecondition). `deferred`
        (async_remove): only the record goes, in one LMDB transaction; Cleanup deletes the device."""
        validate_key(key)
        with self._claim(key):
            self._resolve_stale(key, deadline)
            layer = self.require(key)
            if any(x.parent == key and x.pending == model.LayerPending.PREPARE for x in self.store.layers()):
                # holding the key's claim, no Prepare of a child is in flight (it claims its parent):
                # a pending child is a Prepare whose undo failed. Resolve it (with every stale fenced
                # intent) rather than refuse the Remove until some other fenced call happens by.
                with self.engine._fenced(deadline):
                    pass
            children = sorted(x.key for x in self.store.layers() if x.parent == key)
            if children:
                raise errors.FailedPrecondition(
                    f"snapshot {key!r} has {len(children)} children (e.g. {children[0]!r}): remove them"
                )
            if deferred:
                with self.store.write() as w:
                    w.remove_layer(key)
                log.info("event=layer-forgotten key=%s device=%s", key, layer.device)
                return
            with self.engine._claim(layer.device):  # a Mounts (activate) of the key waits its turn
                self._remove_device(layer.device, key=key, discard=discard, deadline=deadline)

    def cleanup(self, *, discard: Discarder | None, deadline: deadline_mod.Deadline) -> builtins.list[str]:
        """Delete every LAYER device no layer record names (left by async_remove); return them."""
        named = {x.device for x in self.store.layers()}
        gone: builtins.list[str] = []
        for dev in self.engine.list(kind=model.DeviceKind.LAYER):
            if dev.name in named or dev.state != model.DeviceState.READY:
                continue
            with self.engine._claim(dev.name):
                if dev.name in {x.device for x in self.store.layers()}:
                    continue  # named again meanwhile (cannot be: names are random; cheap to be sure)
                self._remove_device(dev.name, key=None, discard=discard, deadline=deadline)
            gone.append(dev.name)
        return gone

    def _remove_device(
        self, name: str, *, key: str | None, discard: Discarder | None, deadline: deadline_mod.Deadline
    ) -> None:
        eng = self.engine
        eng._require_mode(modes.Op.DELETE, deadline)
        with eng._fenced(deadline):
            dev = eng._ready(name, "snapshot device")
            layer = self.store.layer(key) if key is not None else None

            def begin(w: lmdb_store.WriteTxn) -> lmdb_store.Intent:
                w.put(dataclasses.replace(dev, state=model.DeviceState.DELETING))
                if layer is not None:
                    w.put_layer(dataclasses.replace(layer, pending=model.LayerPending.REMOVE))
                return w.open_intent(
                    op="layer_remove",
                    name=dev.name,
                    dev_id=dev.dev_id,
                    size_bytes=dev.size_bytes,
                    base_txid=w.transaction_id(),
                    steps=("discard", "deactivate", "delete", "fence"),
                    created_at=time.time(),
                )

            def commit(w: lmdb_store.WriteTxn, tx: engine_mod._Transition) -> None:
                assert tx.intent.base_txid is not None
                w.remove(dev.name)
                if layer is not None:
                    w.remove_layer(layer.key)
                w.close_intent(tx.intent)
                w.set_transaction_id(tx.intent.base_txid + 1)

            def abort(w: lmdb_store.WriteTxn, tx: engine_mod._Transition) -> None:
                w.put(dev)
                if layer is not None:
                    w.put_layer(layer)
                w.close_intent(tx.intent)

            def do_discard() -> None:
                if discard is None:
                    return
                path = eng.backend.activate(dev.dev_id, dev.size_bytes, deadline=deadline)
                discard(path, deadline)

            def undo_discard() -> None:
                # the blocks are gone either way (the snapshot is being removed): only the device's
                # activation goes back to what it was
                if not dev.active:
                    eng.backend.deactivate(dev.dev_id, deadline=engine_mod._grace(deadline))

            def undo_deactivate() -> None:
                undo_deadline = engine_mod._grace(deadline)
                if dev.active and dev.dev_id not in eng.backend.active_ids(deadline=undo_deadline):
                    eng.backend.activate(dev.dev_id, dev.size_bytes, deadline=undo_deadline)

            def delete() -> None:
                with contextlib.suppress(errors.NotFound):  # already gone: the delete is done
                    eng.backend.delete(dev.dev_id, deadline=deadline)

            def undo_delete() -> None:
                if dev.dev_id not in eng.backend.device_ids(deadline=engine_mod._grace(deadline)):
                    raise engine_mod._RollForward  # a delete cannot be undone: finish it

            def undo_fence() -> None:
                raise engine_mod._RollForward  # the fence runs only after the delete happened

            with eng._transition(
                "layer_remove", begin=begin, commit=commit, abort=abort, deadline=deadline
            ) as tx:
                base = tx.intent.base_txid
                assert base is not None
                tx.step("discard", do_discard, undo_discard)
                tx.step(
                    "deactivate",
                    lambda: eng.backend.deactivate(dev.dev_id, deadline=deadline),
                    undo_deactivate,
                )
                tx.step("delete", delete, undo_delete)
                tx.step(
                    "fence",
                    lambda: eng.backend.set_transaction_id(base, base + 1, deadline=deadline),
                    undo_fence,
                )
