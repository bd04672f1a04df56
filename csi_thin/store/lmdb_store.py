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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import lmdb

from csi_thin import errors, model

SCHEMA_VERSION = 1

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

    @property
    def fenced(self) -> bool:
        return self.base_txid is not None


def _id_key(dev_id: int) -> bytes:
    return dev_id.to_bytes(4, "big")


def _seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


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
        self._txn.put(dev.name.encode(), encode_device(dev), db=self._dbs["devices"])
        self._txn.put(_id_key(dev.dev_id), dev.name.encode(), db=self._dbs["ids"])

    def remove(self, name: str) -> None:
        """Drop the record and free its id (only ever after the pool confirmed the delete)."""
        dev = self.get(name)
        if dev is None:
            return
        self._txn.delete(name.encode(), db=self._dbs["devices"])
        if self.owner(dev.dev_id) == name:
            self._txn.delete(_id_key(dev.dev_id), db=self._dbs["ids"])

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
            self._txn.put(_id_key(dev_id), ORPHAN.encode(), db=self._dbs["ids"])

    def free_id(self, dev_id: int) -> None:
        self._txn.delete(_id_key(dev_id), db=self._dbs["ids"])

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
        self._dbs = {
            n: self._env.open_db(n.encode()) for n in ("devices", "ids", "journal", "meta", "layers")
        }
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"schema", db=self._dbs["meta"])
            if raw is None:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self._dbs["meta"])
            elif int(bytes(raw)) > SCHEMA_VERSION:
                self._env.close()
                raise SchemaTooNew(
                    f"{path}: store schema v{int(bytes(raw))} is newer than this csi-thin's "
                    f"v{SCHEMA_VERSION}: upgrade csi-thin"
                )

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

    def devices(self) -> list[model.Device]:
        with self._read() as txn:
            return [decode_device(bytes(v)) for _, v in txn.cursor(db=self._dbs["devices"])]

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
