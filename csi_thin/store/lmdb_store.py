"""The node truth: device records, thin id allocation, the intent journal and the last committed
pool transaction id, in one LMDB environment in the pool's state_dir.

The pool engine is the only writer. Every change the engine makes to the pool is bracketed by two
write transactions of this store: one that writes the intent (and reserves the id), one that closes
it together with the record and the pool transaction id. LMDB commits are atomic and durable, so after
a crash the store is always at one of those two points, never in between.

Sub-databases:
  devices  name -> device record (JSON, carrying a schema version)
  ids      dev id (4 bytes, big endian) -> name; "" marks an orphan id reserved so it is never reused
  journal  sequence (8 bytes, big endian) -> intent (JSON)
  meta     "txid" -> last committed pool transaction id; "schema" -> schema version of this store
  layers   containerd snapshot key -> layer record (JSON): which LAYER device holds it (csi_thin.pool.layers)
  index    (schema 2) "k" kind NUL name -> "" for every record (lists and pages by kind, in name
           order); "s" state NUL name -> "" for every record not READY (the LOST ones, named);
           "o" dev id -> "" for every orphan id
  totals   (schema 2) "kind/state" -> count, bytes, active (three u64): running totals

The index and totals are derived from devices and ids and written in the same write transaction as
the change they follow (WriteTxn keeps them), so no reader ever sees them disagree: GetCapacity,
`pool status` and metrics read a few keys instead of every record. A store of schema 1 gets them
built once when it is opened (one write transaction: a crash leaves it at schema 1, to build again);
start-up recovery checks them against the records and rebuilds them if they ever differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import struct
import threading
import typing
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb

from csi_thin import errors, model

log = logging.getLogger(__name__)

#: 2: the index and totals sub-databases (a v1 csi-thin would change records without them)
SCHEMA_VERSION = 2

#: The name an orphan id is reserved under in the ids database (no record has an empty name).
ORPHAN = ""

_MAP_SIZE = 1 << 30  # sparse: LMDB only uses what it writes


class SchemaTooNew(errors.Internal):
    """The store (or one record) was written by a newer csi-thin than this one."""


class StoreCorrupt(errors.Internal):
    """A value in the store does not parse."""


@dataclasses.dataclass(frozen=True)
class Intent:
    """One journalled mutation: written before the first kernel step, removed when it is resolved.

    `base_txid` is the store's transaction id when the intent was written, for the mutations fenced by
    the pool's transaction id (None for activation, deactivation and resize, which change no pool
    metadata). `steps` names the kernel steps in order, for logs and humans.
    """

    seq: int
    op: str
    name: str
    dev_id: int
    size_bytes: int = 0
    origin_id: int | None = None
    old_size_bytes: int = 0
    base_txid: int | None = None
    steps: tuple[str, ...] = ()
    created_at: float = 0.0
    #: a group snapshot's members, (name, dev id, origin dev id) each: one intent names them all (its
    #: `name` is the group's, `dev_id` the first member's); empty for every other mutation
    members: tuple[tuple[str, int, int], ...] = ()

    @property
    def fenced(self) -> bool:
        return self.base_txid is not None


def _id_key(dev_id: int) -> bytes:
    return dev_id.to_bytes(4, "big")


def _seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


_TALLY = struct.Struct(">QQQ")


def _kind_key(kind: model.DeviceKind, name: str) -> bytes:
    return b"k" + kind.value.encode() + b"\0" + name.encode()


def _kind_prefix(kind: model.DeviceKind) -> bytes:
    return b"k" + kind.value.encode() + b"\0"


def _state_key(state: model.DeviceState, name: str) -> bytes:
    return b"s" + state.value.encode() + b"\0" + name.encode()


def _state_prefix(state: model.DeviceState) -> bytes:
    return b"s" + state.value.encode() + b"\0"


def _orphan_key(dev_id: int) -> bytes:
    return b"o" + _id_key(dev_id)


def _tally_key(kind: model.DeviceKind, state: model.DeviceState) -> bytes:
    return f"{kind.value}/{state.value}".encode()


def _tally(dev: model.Device) -> model.Tally:
    return model.Tally(count=1, size_bytes=dev.size_bytes, active=int(dev.active))


def _tally_value(t: model.Tally) -> bytes:
    return _TALLY.pack(t.count, t.size_bytes, t.active)


def _tally_of(raw: bytes) -> model.Tally:
    count, size, active = _TALLY.unpack(raw)
    return model.Tally(count=count, size_bytes=size, active=active)


_SUMMARY = struct.Struct(">IBBQ")  # dev id, state (its place in DeviceState), active, size
_STATES = tuple(model.DeviceState)


class Summary(typing.NamedTuple):
    """What start-up recovery needs of a record, kept as the value of its index entry: reading
    these is a struct unpack per record where the record itself is a JSON parse."""

    name: str
    kind: model.DeviceKind
    dev_id: int
    state: model.DeviceState
    active: bool
    size_bytes: int


def _summary_value(dev: model.Device) -> bytes:
    return _SUMMARY.pack(dev.dev_id, _STATES.index(dev.state), int(dev.active), dev.size_bytes)


def _index_entries(dev: model.Device) -> dict[bytes, bytes]:
    entries = {_kind_key(dev.kind, dev.name): _summary_value(dev)}
    if dev.state != model.DeviceState.READY:
        entries[_state_key(dev.state, dev.name)] = b""
    return entries


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise StoreCorrupt(f"{what}: not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreCorrupt(f"{what}: expected an object")
    version = value.get("v")
    if not isinstance(version, int):
        raise StoreCorrupt(f"{what}: no schema version")
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{what}: written with schema v{version}, this csi-thin reads up to v{SCHEMA_VERSION}: "
            "upgrade csi-thin (never downgrade over a newer store)"
        )
    return value


def encode_device(dev: model.Device) -> bytes:
    fields = dataclasses.asdict(dev)
    del fields["node"]  # a node's store holds only its own devices
    fields["kind"] = dev.kind.value
    fields["state"] = dev.state.value
    return json.dumps({"v": SCHEMA_VERSION, **fields}, sort_keys=True).encode()


def decode_device(raw: bytes) -> model.Device:
    value = _load(raw, "device record")
    try:
        return model.Device(
            name=str(value["name"]),
            dev_id=int(value["dev_id"]),
            kind=model.DeviceKind(value["kind"]),
            state=model.DeviceState(value["state"]),
            size_bytes=int(value["size_bytes"]),
            origin=None if value["origin"] is None else str(value["origin"]),
            created_at=float(value["created_at"]),
            active=bool(value.get("active", False)),
            path=None if value.get("path") is None else str(value["path"]),
            attributes=tuple((str(k), str(v)) for k, v in value.get("attributes", ())),
            # absent in records written before group snapshots: such a snapshot has no group
            group=None if value.get("group") is None else str(value["group"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreCorrupt(f"device record: {exc!r}") from exc


def encode_layer(layer: model.Layer) -> bytes:
    fields = dataclasses.asdict(layer)
    fields["kind"] = layer.kind.value
    fields["pending"] = layer.pending.value
    fields["labels"] = [list(kv) for kv in layer.labels]
    return json.dumps({"v": SCHEMA_VERSION, **fields}, sort_keys=True).encode()


def decode_layer(raw: bytes) -> model.Layer:
    value = _load(raw, "layer record")
    try:
        return model.Layer(
            key=str(value["key"]),
            device=str(value["device"]),
            kind=model.LayerKind(value["kind"]),
            parent=str(value["parent"]),
            labels=tuple((str(k), str(v)) for k, v in value["labels"]),
            created_at=float(value["created_at"]),
            updated_at=float(value["updated_at"]),
            pending=model.LayerPending(value.get("pending", "")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreCorrupt(f"layer record: {exc!r}") from exc


def encode_intent(intent: Intent) -> bytes:
    fields = dataclasses.asdict(intent)
    fields["steps"] = list(intent.steps)
    fields["members"] = [list(m) for m in intent.members]
    return json.dumps({"v": SCHEMA_VERSION, **fields}, sort_keys=True).encode()


def decode_intent(raw: bytes) -> Intent:
    value = _load(raw, "journal intent")
    try:
        return Intent(
            seq=int(value["seq"]),
            op=str(value["op"]),
            name=str(value["name"]),
            dev_id=int(value["dev_id"]),
            size_bytes=int(value["size_bytes"]),
            origin_id=None if value["origin_id"] is None else int(value["origin_id"]),
            old_size_bytes=int(value["old_size_bytes"]),
            base_txid=None if value["base_txid"] is None else int(value["base_txid"]),
            steps=tuple(str(s) for s in value["steps"]),
            created_at=float(value["created_at"]),
            # absent in intents written before group snapshots
            members=tuple((str(n), int(d), int(o)) for n, d, o in value.get("members", ())),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreCorrupt(f"journal intent: {exc!r}") from exc


class WriteTxn:
    """One LMDB write transaction: everything done through it commits together or not at all."""

    def __init__(self, txn: Any, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    # devices
    def get(self, name: str) -> model.Device | None:
        raw = self._txn.get(name.encode(), db=self._dbs["devices"])
        return None if raw is None else decode_device(bytes(raw))

    def put(self, dev: model.Device) -> None:
        if not dev.name:
            raise errors.InvalidArgument("device name must not be empty")
        old = self.get(dev.name)
        if old is not None:
            self._unindex(old)
        self._txn.put(dev.name.encode(), encode_device(dev), db=self._dbs["devices"])
        self._set_owner(dev.dev_id, dev.name)
        self._index(dev)

    def remove(self, name: str) -> None:
        """Drop the record and free its id (only ever after the pool confirmed the delete)."""
        dev = self.get(name)
        if dev is None:
            return
        self._unindex(dev)
        self._txn.delete(name.encode(), db=self._dbs["devices"])
        if self.owner(dev.dev_id) == name:
            self._txn.delete(_id_key(dev.dev_id), db=self._dbs["ids"])

    # index and totals: every record change above goes through these two, in the same transaction
    def _index(self, dev: model.Device) -> None:
        for key, value in _index_entries(dev).items():
            self._txn.put(key, value, db=self._dbs["index"])
        self._add_tally(dev.kind, dev.state, _tally(dev), sign=1)

    def _unindex(self, dev: model.Device) -> None:
        for key in _index_entries(dev):
            self._txn.delete(key, db=self._dbs["index"])
        self._add_tally(dev.kind, dev.state, _tally(dev), sign=-1)

    def _add_tally(
        self, kind: model.DeviceKind, state: model.DeviceState, t: model.Tally, *, sign: int
    ) -> None:
        key = _tally_key(kind, state)
        raw = self._txn.get(key, db=self._dbs["totals"])
        have = _tally_of(bytes(raw)) if raw is not None else model.Tally()
        count = have.count + sign * t.count
        size = have.size_bytes + sign * t.size_bytes
        active = have.active + sign * t.active
        if min(count, size, active) < 0:
            # only a store whose totals were skewed outside this class can get here: refuse to
            # write nonsense; recovery (check_index) rebuilds them from the records
            raise StoreCorrupt(f"running total {key.decode()} would go below zero: rebuild the index")
        if count == 0:
            self._txn.delete(key, db=self._dbs["totals"])
        else:
            self._txn.put(key, _tally_value(model.Tally(count, size, active)), db=self._dbs["totals"])

    def _set_owner(self, dev_id: int, owner: str) -> None:
        self._txn.put(_id_key(dev_id), owner.encode(), db=self._dbs["ids"])
        if owner == ORPHAN:
            self._txn.put(_orphan_key(dev_id), b"", db=self._dbs["index"])
        else:
            self._txn.delete(_orphan_key(dev_id), db=self._dbs["index"])

    # layers (containerd snapshots): their own key space
    def layer(self, key: str) -> model.Layer | None:
        raw = self._txn.get(key.encode(), db=self._dbs["layers"])
        return None if raw is None else decode_layer(bytes(raw))

    def put_layer(self, layer: model.Layer) -> None:
        if not layer.key:
            raise errors.InvalidArgument("layer key must not be empty")
        self._txn.put(layer.key.encode(), encode_layer(layer), db=self._dbs["layers"])

    def remove_layer(self, key: str) -> None:
        self._txn.delete(key.encode(), db=self._dbs["layers"])

    def layers(self) -> list[model.Layer]:
        return [decode_layer(bytes(v)) for _, v in self._txn.cursor(db=self._dbs["layers"])]

    # ids
    def owner(self, dev_id: int) -> str | None:
        raw = self._txn.get(_id_key(dev_id), db=self._dbs["ids"])
        return None if raw is None else bytes(raw).decode()

    def allocate_id(self) -> int:
        """The next free 24-bit id after the last one handed out (wrapping), without reserving it:
        the caller reserves it by `put` (or `reserve_orphan`) in the same transaction."""
        start = int(self._meta("next_id") or 1)
        dev_id = start
        for _ in range(model.MAX_DEVICE_ID):
            if self._txn.get(_id_key(dev_id), db=self._dbs["ids"]) is None:
                nxt = dev_id + 1 if dev_id < model.MAX_DEVICE_ID else 1
                self._txn.put(b"next_id", str(nxt).encode(), db=self._dbs["meta"])
                return dev_id
            dev_id = dev_id + 1 if dev_id < model.MAX_DEVICE_ID else 1
        raise errors.ResourceExhausted(f"all {model.MAX_DEVICE_ID} thin device ids are in use")

    def reserve_orphan(self, dev_id: int) -> None:
        if self.owner(dev_id) is None:
            self._set_owner(dev_id, ORPHAN)

    def free_id(self, dev_id: int) -> None:
        self._txn.delete(_id_key(dev_id), db=self._dbs["ids"])
        self._txn.delete(_orphan_key(dev_id), db=self._dbs["index"])

    # index and totals, from scratch
    def devices(self) -> list[model.Device]:
        """Every record, in name order (as this transaction sees them)."""
        return [decode_device(bytes(v)) for _, v in self._txn.cursor(db=self._dbs["devices"])]

    def ids(self) -> dict[int, str]:
        """The allocation map (see LmdbStore.ids), as this transaction sees it."""
        return {
            int.from_bytes(bytes(k), "big"): bytes(v).decode()
            for k, v in self._txn.cursor(db=self._dbs["ids"])
        }

    def summaries(self) -> Iterator[Summary]:
        """Every record's summary (see Summary), by kind, then name."""
        for kind in model.DeviceKind:
            prefix = _kind_prefix(kind)
            for name, raw in _items(self._txn, self._dbs["index"], prefix):
                try:
                    dev_id, code, active, size = _SUMMARY.unpack(raw)
                    state = _STATES[code]
                except (struct.error, IndexError) as exc:
                    raise StoreCorrupt(f"index entry of {name!r}: {exc}") from exc
                yield Summary(name.decode(), kind, dev_id, state, bool(active), size)

    def verified_summaries(self) -> tuple[list[Summary], list[str]]:
        """Every record's summary, checked for start-up without reading any record: the index names
        exactly the records, the totals are the sums of the summaries and the orphan entries are the
        ids' orphans. On any difference (or an unreadable entry), everything is rebuilt from the
        records (check_index): returns the summaries and those differences. (A summary that
        disagrees with its own record can only come from an outside edit of one of them;
        check_index compares those too.)"""
        try:
            summaries = list(self.summaries())
            if self._agrees(summaries):
                return summaries, []
        except StoreCorrupt:
            pass
        diffs = self.check_index(repair=True)
        return list(self.summaries()), diffs

    def _agrees(self, summaries: Iterable[Summary]) -> bool:
        totals: dict[bytes, model.Tally] = {}
        names: set[bytes] = set()
        for sm in summaries:
            names.add(sm.name.encode())
            key = _tally_key(sm.kind, sm.state)
            totals[key] = totals.get(key, model.Tally()) + model.Tally(1, sm.size_bytes, int(sm.active))
        records = {bytes(k) for k in self._txn.cursor(db=self._dbs["devices"]).iternext(values=False)}
        have_totals = {bytes(k): _tally_of(bytes(v)) for k, v in self._txn.cursor(db=self._dbs["totals"])}
        orphans = {bytes(k) for k, v in self._txn.cursor(db=self._dbs["ids"]) if bytes(v) == ORPHAN.encode()}
        indexed_orphans = set(_suffixes(self._txn, self._dbs["index"], b"o"))
        return names == records and totals == have_totals and orphans == indexed_orphans

    def check_index(self, *, repair: bool) -> list[str]:
        """Compare the index and totals with what the records and ids say; with `repair`, rebuild
        them where they differ. Returns what differed (empty: nothing). Reads every record: for
        migration, a failed start-up check and tests, never per call."""
        want_index: dict[bytes, bytes] = {}
        want_totals: dict[bytes, model.Tally] = {}
        for dev in self.devices():
            want_index.update(_index_entries(dev))
            key = _tally_key(dev.kind, dev.state)
            want_totals[key] = want_totals.get(key, model.Tally()) + _tally(dev)
        for k, v in self._txn.cursor(db=self._dbs["ids"]):
            if bytes(v) == ORPHAN.encode():
                want_index[b"o" + bytes(k)] = b""
        have_index = {bytes(k): bytes(v) for k, v in self._txn.cursor(db=self._dbs["index"])}
        have_totals = {bytes(k): _tally_of(bytes(v)) for k, v in self._txn.cursor(db=self._dbs["totals"])}
        diffs = [f"index lacks {k!r}" for k in sorted(want_index.keys() - have_index.keys())]
        diffs += [f"index has stray {k!r}" for k in sorted(have_index.keys() - want_index.keys())]
        diffs += [
            f"index entry {k!r} says {have_index[k]!r}, its record {want_index[k]!r}"
            for k in sorted(want_index.keys() & have_index.keys())
            if want_index[k] != have_index[k]
        ]
        for key in sorted(want_totals.keys() | have_totals.keys()):
            want, have = want_totals.get(key, model.Tally()), have_totals.get(key, model.Tally())
            if want != have:
                diffs.append(f"total {key.decode()} is {have}, the records say {want}")
        if diffs and repair:
            self._txn.drop(self._dbs["index"], delete=False)
            self._txn.drop(self._dbs["totals"], delete=False)
            for key, value in want_index.items():
                self._txn.put(key, value, db=self._dbs["index"])
            for key, tally in want_totals.items():
                self._txn.put(key, _tally_value(tally), db=self._dbs["totals"])
        return diffs

    # journal
    def open_intent(self, **fields: Any) -> Intent:
        """Append an intent; its sequence number is assigned here."""
        cur = self._txn.cursor(db=self._dbs["journal"])
        seq = int.from_bytes(bytes(cur.key()), "big") + 1 if cur.last() else 1
        intent = Intent(seq=seq, **fields)
        self._txn.put(_seq_key(seq), encode_intent(intent), db=self._dbs["journal"])
        return intent

    def close_intent(self, intent: Intent) -> None:
        self._txn.delete(_seq_key(intent.seq), db=self._dbs["journal"])

    # meta
    def _meta(self, key: str) -> str | None:
        raw = self._txn.get(key.encode(), db=self._dbs["meta"])
        return None if raw is None else bytes(raw).decode()

    def transaction_id(self) -> int:
        return int(self._meta("txid") or 0)

    def set_transaction_id(self, txid: int) -> None:
        self._txn.put(b"txid", str(txid).encode(), db=self._dbs["meta"])

    def set_adopted(self, at: float) -> None:
        """Mark this store as rebuilt over an existing pool (the old one was lost): its orphans are
        the lost store's devices, not garbage."""
        self._txn.put(b"adopted", repr(at).encode(), db=self._dbs["meta"])

    def clear_adopted(self) -> None:
        self._txn.delete(b"adopted", db=self._dbs["meta"])


def _items(txn: Any, db: Any, prefix: bytes, *, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
    """(key without `prefix`, value) of the keys of `db` that start with `prefix`, from prefix +
    `start` on, in key order."""
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix + start):
        return
    for raw, value in cur.iternext(keys=True, values=True):
        key = bytes(raw)
        if not key.startswith(prefix):
            return
        yield key[len(prefix) :], bytes(value)


def _suffixes(txn: Any, db: Any, prefix: bytes, *, start: bytes = b"") -> Iterator[bytes]:
    """The keys of `db` that start with `prefix`, from prefix + `start` on, without the prefix."""
    for key, _ in _items(txn, db, prefix, start=start):
        yield key


_LMDB_FILES = frozenset({"data.mdb", "lock.mdb"})


def _make_private(path: str) -> None:
    """The store names every volume and its devices: root's alone (files 0600, folder 0700), also
    when an older version left it readable by everyone. The folder's mode is changed only when it
    holds nothing but the store: a state_dir pointed at a shared folder keeps its mode."""
    names = set(os.listdir(path))
    for name in names & _LMDB_FILES:
        os.chmod(os.path.join(path, name), 0o600)
    if names <= _LMDB_FILES:
        os.chmod(path, 0o700)


class LmdbStore:
    """The LMDB environment of one pool. Safe to share between threads (one writer at a time; readers
    never block). Not to be shared across fork(): a child process opens its own."""

    def __init__(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        _make_private(path)
        try:
            self._env = lmdb.open(path, map_size=_MAP_SIZE, max_dbs=16, subdir=True, lock=True, mode=0o600)
        except lmdb.Error as exc:
            # e.g. already open in this process: one LmdbStore per state_dir per process
            raise errors.Unavailable(f"cannot open the LMDB store in {path}: {exc}") from exc
        self._write_lock = threading.Lock()
        names = ("devices", "ids", "journal", "meta", "index", "totals", "layers")
        self._dbs = {n: self._env.open_db(n.encode()) for n in names}
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"schema", db=self._dbs["meta"])
            if raw is not None and int(bytes(raw)) > SCHEMA_VERSION:
                self._env.close()
                raise SchemaTooNew(
                    f"{path}: store schema v{int(bytes(raw))} is newer than this csi-thin's "
                    f"v{SCHEMA_VERSION}: upgrade csi-thin"
                )
            if raw is not None and int(bytes(raw)) < SCHEMA_VERSION:
                # v1 -> v2: build the index and totals from the records, in this one transaction
                diffs = WriteTxn(txn, self._dbs).check_index(repair=True)
                log.info(
                    "event=store-migrated path=%s from=v%d to=v%d built=%d",
                    path,
                    int(bytes(raw)),
                    SCHEMA_VERSION,
                    len(diffs),
                )
            if raw is None or int(bytes(raw)) != SCHEMA_VERSION:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self._dbs["meta"])

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> LmdbStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[WriteTxn]:
        """A write transaction: committed when the block ends, aborted if it raises.

        A full map aborts the transaction (nothing half-written) and is a domain error, so the caller
        sees RESOURCE_EXHAUSTED with a reason instead of a raw LMDB exception.
        """
        try:
            with self._write_lock, self._env.begin(write=True) as txn:
                yield WriteTxn(txn, self._dbs)
        except lmdb.MapFullError as exc:
            raise errors.ResourceExhausted(
                f"the LMDB store in {self.path} is full ({self._env.info()['map_size']} bytes): "
                "nothing was changed; raise its map size"
            ) from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[Any]:
        with self._env.begin(write=False) as txn:
            yield txn

    def get(self, name: str) -> model.Device | None:
        with self._read() as txn:
            raw = txn.get(name.encode(), db=self._dbs["devices"])
            return None if raw is None else decode_device(bytes(raw))

    def devices(self, kind: model.DeviceKind | None = None) -> list[model.Device]:
        """Every record (of `kind`), in name order."""
        if kind is not None:
            return self.page(kind, after="", limit=0)
        with self._read() as txn:
            return [decode_device(bytes(v)) for _, v in txn.cursor(db=self._dbs["devices"])]

    def page(self, kind: model.DeviceKind, *, after: str, limit: int) -> list[model.Device]:
        """Up to `limit` records of `kind` (0: all) whose names sort after `after`, in name order: a
        cursor on the index, so a page costs the same on any page of any pool."""
        # names hold no NUL: the first key past `after`'s own is the next name
        start = after.encode() + b"\0" if after else b""
        out: list[model.Device] = []
        with self._read() as txn:
            for name in _suffixes(txn, self._dbs["index"], _kind_prefix(kind), start=start):
                raw = txn.get(name, db=self._dbs["devices"])
                if raw is None:
                    raise StoreCorrupt(f"the index names {name!r}, which has no record")
                out.append(decode_device(bytes(raw)))
                if limit and len(out) >= limit:
                    break
        return out

    def names_in(self, state: model.DeviceState) -> list[str]:
        """The names of the records in `state` (not READY: those are not indexed by state)."""
        if state == model.DeviceState.READY:
            raise errors.InvalidArgument("READY records are not indexed by state: list them by kind")
        with self._read() as txn:
            return [n.decode() for n in _suffixes(txn, self._dbs["index"], _state_prefix(state))]

    def orphans(self) -> list[int]:
        """Every id reserved as an orphan, ascending."""
        with self._read() as txn:
            return [int.from_bytes(k, "big") for k in _suffixes(txn, self._dbs["index"], b"o")]

    def totals(self) -> model.Totals:
        with self._read() as txn:
            tallies = []
            for k, v in txn.cursor(db=self._dbs["totals"]):
                kind, state = bytes(k).decode().split("/")
                tallies.append((model.DeviceKind(kind), model.DeviceState(state), _tally_of(bytes(v))))
        return model.Totals(tallies=tuple(tallies))

    def check_index(self, *, repair: bool) -> list[str]:
        """See WriteTxn.check_index (in a write transaction of its own)."""
        with self.write() as w:
            return w.check_index(repair=repair)

    def layer(self, key: str) -> model.Layer | None:
        with self._read() as txn:
            raw = txn.get(key.encode(), db=self._dbs["layers"])
            return None if raw is None else decode_layer(bytes(raw))

    def layers(self) -> list[model.Layer]:
        with self._read() as txn:
            return [decode_layer(bytes(v)) for _, v in txn.cursor(db=self._dbs["layers"])]

    def ids(self) -> dict[int, str]:
        """The allocation map: every reserved id -> its name (ORPHAN for a reserved orphan id)."""
        with self._read() as txn:
            return {
                int.from_bytes(bytes(k), "big"): bytes(v).decode() for k, v in txn.cursor(db=self._dbs["ids"])
            }

    def intents(self) -> list[Intent]:
        with self._read() as txn:
            return [decode_intent(bytes(v)) for _, v in txn.cursor(db=self._dbs["journal"])]

    def transaction_id(self) -> int:
        with self._read() as txn:
            raw = txn.get(b"txid", db=self._dbs["meta"])
            return int(bytes(raw)) if raw is not None else 0

    def adopted(self) -> float | None:
        """When this store adopted an existing pool after its predecessor was lost (None: never)."""
        with self._read() as txn:
            raw = txn.get(b"adopted", db=self._dbs["meta"])
            return float(bytes(raw)) if raw is not None else None

    def is_pristine(self) -> bool:
        """True while nothing was ever committed (no transaction id recorded, no records, no ids)."""
        with self._read() as txn:
            return (
                txn.get(b"txid", db=self._dbs["meta"]) is None
                and txn.stat(self._dbs["ids"])["entries"] == 0
                and txn.stat(self._dbs["devices"])["entries"] == 0
            )
