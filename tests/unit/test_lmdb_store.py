"""LMDB store: round trips (write, close, reopen, compare), id allocation, schema versions."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import struct
import threading

import lmdb
import pytest

from csi_thin import errors, model
from csi_thin.store import lmdb_store


def _dev(name: str, dev_id: int, **kw: object) -> model.Device:
    fields: dict[str, object] = {
        "name": name,
        "dev_id": dev_id,
        "kind": model.DeviceKind.VOLUME,
        "state": model.DeviceState.READY,
        "size_bytes": 1 << 20,
        "origin": None,
        "created_at": 1700000000.5,
    }
    fields.update(kw)
    return model.Device(**fields)  # type: ignore[arg-type]


def test_round_trip_records_ids_journal_txid(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "db")
    devs = [
        _dev("vol-a", 1),
        _dev("snap-a", 2, kind=model.DeviceKind.SNAPSHOT, origin="vol-a", active=True, path="/dev/x"),
        _dev("vol-b", 3, state=model.DeviceState.CREATING, size_bytes=5 << 30),
        _dev("lost", 4, state=model.DeviceState.LOST),
    ]
    with lmdb_store.LmdbStore(path) as store, store.write() as w:
        for d in devs:
            w.put(d)
        w.reserve_orphan(77)
        intent = w.open_intent(
            op="create_volume", name="vol-b", dev_id=3, size_bytes=5 << 30, base_txid=9, steps=("a", "b")
        )
        w.set_transaction_id(9)
    with lmdb_store.LmdbStore(path) as store:
        assert sorted(store.devices(), key=lambda d: d.dev_id) == devs
        assert store.get("snap-a") == devs[1]
        assert store.get("nope") is None
        assert store.ids() == {1: "vol-a", 2: "snap-a", 3: "vol-b", 4: "lost", 77: lmdb_store.ORPHAN}
        assert store.intents() == [intent]
        assert intent.fenced and intent.seq == 1 and intent.steps == ("a", "b")
        assert store.transaction_id() == 9
        assert not store.is_pristine()


def test_remove_frees_the_id_and_close_intent(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        with store.write() as w:
            w.put(_dev("a", 5))
            i1 = w.open_intent(op="delete", name="a", dev_id=5, base_txid=0)
            i2 = w.open_intent(op="grow", name="a", dev_id=5, size_bytes=2)
        assert [i.seq for i in store.intents()] == [1, 2] and not i2.fenced
        with store.write() as w:
            w.remove("a")
            w.close_intent(i1)
        assert store.ids() == {} and store.get("a") is None
        assert store.intents() == [i2]


def test_failed_write_commits_nothing(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        with pytest.raises(RuntimeError), store.write() as w:
            w.put(_dev("a", 1))
            w.set_transaction_id(4)
            raise RuntimeError("boom")
        assert store.devices() == [] and store.ids() == {} and store.transaction_id() == 0
        assert store.is_pristine()


def test_allocation_skips_used_ids_and_wraps(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        with store.write() as w:
            first = w.allocate_id()
            w.put(_dev("a", first))
            w.reserve_orphan(2)
            third = w.allocate_id()
        assert (first, third) == (1, 3)
        with store.write() as w:  # near the top of the 24-bit range it wraps to the lowest free id
            w._txn.put(b"next_id", str(model.MAX_DEVICE_ID).encode(), db=w._dbs["meta"])
            top = w.allocate_id()
            w.put(_dev("top", top))
            assert top == model.MAX_DEVICE_ID
            assert w.allocate_id() == 3  # 1 is "a", 2 is an orphan, 3 was never reserved


def test_ids_not_reused_until_the_record_goes(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        seen = set()
        for n in range(20):
            with store.write() as w:
                dev_id = w.allocate_id()
                assert dev_id not in store.ids()
                w.put(_dev(f"d{n}", dev_id))
                seen.add(dev_id)
        assert len(seen) == 20


def test_newer_record_schema_is_refused_clearly(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        with store.write() as w:
            raw = json.loads(lmdb_store.encode_device(_dev("a", 1)))
            raw["v"] = lmdb_store.SCHEMA_VERSION + 1
            w._txn.put(b"a", json.dumps(raw).encode(), db=w._dbs["devices"])
        with pytest.raises(lmdb_store.SchemaTooNew, match="upgrade csi-thin"):
            store.get("a")


def test_newer_store_schema_is_refused_at_open(tmp_path: pathlib.Path) -> None:
    lmdb_store.LmdbStore(str(tmp_path)).close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"99", db=meta)
    env.close()
    with pytest.raises(lmdb_store.SchemaTooNew) as exc:
        lmdb_store.LmdbStore(str(tmp_path))
    assert isinstance(exc.value, errors.Internal)


def test_corrupt_record_is_a_clear_error() -> None:
    with pytest.raises(lmdb_store.StoreCorrupt):
        lmdb_store.decode_device(b"{not json")
    with pytest.raises(lmdb_store.StoreCorrupt, match="schema version"):
        lmdb_store.decode_device(b"{}")


def test_concurrent_writers_from_threads(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)) as store:

        def worker(n: int) -> None:
            for k in range(10):
                with store.write() as w:
                    w.put(_dev(f"t{n}-{k}", w.allocate_id()))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = store.ids()
        assert len(ids) == 80 and len(set(ids.values())) == 80


def test_second_open_in_one_process_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)), pytest.raises(errors.Unavailable, match="already open"):
        lmdb_store.LmdbStore(str(tmp_path))


def test_a_full_store_is_resource_exhausted_and_changes_nothing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lmdb_store, "_MAP_SIZE", 64 * 1024)
    store = lmdb_store.LmdbStore(str(tmp_path / "small"))
    with pytest.raises(errors.ResourceExhausted, match="full"), store.write() as w:
        for i in range(10_000):
            w.set_transaction_id(i)
            w.put(_dev(f"volume-{i:06d}-" + "x" * 64, i + 1))
    assert store.devices() == [] and store.transaction_id() == 0
    store.close()


def _mode(path: pathlib.Path) -> int:
    return path.stat().st_mode & 0o777


def test_store_files_are_private_and_a_shared_folder_keeps_its_mode(tmp_path: pathlib.Path) -> None:
    """LMDB names every volume: its files are 0600 whatever the umask, and made so again when an
    older version left them 0644; its folder is made 0700 unless it holds more than the store."""
    own = tmp_path / "own"
    with lmdb_store.LmdbStore(str(own)):
        pass
    files = sorted(own.iterdir())
    assert [p.name for p in files] == ["data.mdb", "lock.mdb"]
    assert [_mode(p) for p in [own, *files]] == [0o700, 0o600, 0o600]
    for p in [own, *files]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    with lmdb_store.LmdbStore(str(own)):
        assert [_mode(p) for p in [own, *files]] == [0o700, 0o600, 0o600]
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "something-else").write_text("not the store's")
    with lmdb_store.LmdbStore(str(shared)):
        assert _mode(shared) == 0o755
        assert _mode(shared / "data.mdb") == 0o600


def test_records_and_intents_from_before_group_snapshots_still_load() -> None:
    """A store written before group snapshots (no `group` on records, no `members` on intents) loads
    with the defaults; the new fields round-trip."""
    old_device = (
        b'{"v": 1, "name": "s", "dev_id": 3, "kind": "snapshot", "state": "ready", "size_bytes": 65536,'
        b' "origin": "v", "created_at": 1.5, "active": false, "path": null, "attributes": []}'
    )
    assert lmdb_store.decode_device(old_device).group is None
    old_intent = (
        b'{"v": 1, "seq": 1, "op": "create_snapshot", "name": "s", "dev_id": 3, "size_bytes": 0,'
        b' "origin_id": 2, "old_size_bytes": 0, "base_txid": 4, "steps": ["create_snap", "fence"],'
        b' "created_at": 1.5}'
    )
    assert lmdb_store.decode_intent(old_intent).members == ()
    dev = lmdb_store.decode_device(old_device)
    member = dataclasses.replace(dev, group="g-x")
    assert lmdb_store.decode_device(lmdb_store.encode_device(member)) == member
    intent = dataclasses.replace(lmdb_store.decode_intent(old_intent), members=(("a", 3, 2), ("b", 4, 5)))
    assert lmdb_store.decode_intent(lmdb_store.encode_intent(intent)) == intent


# ---- index and running totals (schema 2) ------------------------------------------------------------


def _expected_totals(
    store: lmdb_store.LmdbStore,
) -> dict[tuple[model.DeviceKind, model.DeviceState], model.Tally]:
    out: dict[tuple[model.DeviceKind, model.DeviceState], model.Tally] = {}
    for d in store.devices():
        out[d.kind, d.state] = out.get((d.kind, d.state), model.Tally()) + model.Tally(
            1, d.size_bytes, int(d.active)
        )
    return out


def _check_derived(store: lmdb_store.LmdbStore) -> None:
    """Everything the index and totals answer equals what a scan of the records says."""
    devs = store.devices()
    totals = store.totals()
    assert {(k, s): t for k, s, t in totals.tallies} == _expected_totals(store)
    for kind in model.DeviceKind:
        assert store.devices(kind) == [d for d in devs if d.kind == kind]
    for state in (model.DeviceState.CREATING, model.DeviceState.DELETING, model.DeviceState.LOST):
        assert store.names_in(state) == [d.name for d in devs if d.state == state]
    assert store.orphans() == sorted(i for i, o in store.ids().items() if o == lmdb_store.ORPHAN)
    assert store.check_index(repair=False) == []


def test_totals_and_index_follow_every_change_and_every_abort(tmp_path: pathlib.Path) -> None:
    """A seeded random walk of puts (new, changed kind/state/size/active), removes, orphan
    reservations and frees, some in transactions that abort: after each, the index and totals are
    what the records say."""
    rng = random.Random(12)
    names = [f"d{i}" for i in range(30)]
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        for step in range(300):
            try:
                with store.write() as w:
                    for _ in range(rng.randint(1, 4)):
                        name = rng.choice(names)
                        op = rng.random()
                        if op < 0.6:
                            old = w.get(name)
                            w.put(
                                _dev(
                                    name,
                                    old.dev_id if old else w.allocate_id(),
                                    kind=rng.choice(list(model.DeviceKind)),
                                    state=rng.choice(list(model.DeviceState)),
                                    size_bytes=rng.choice((1, 2, 3)) << 20,
                                    active=rng.random() < 0.3,
                                )
                            )
                        elif op < 0.8:
                            w.remove(name)
                        elif op < 0.9:
                            w.reserve_orphan(rng.randint(1000, 1010))
                        else:
                            w.free_id(rng.randint(1000, 1010))
                    if step % 7 == 0:
                        raise RuntimeError("abort this transaction")
            except RuntimeError:
                pass
            _check_derived(store)
        assert store.devices(), "the walk left records to check"


def test_pages_follow_the_name_order_from_any_name(tmp_path: pathlib.Path) -> None:
    names = ["a", "a0", "ab", "b", "é", "z-1", "ß"]
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        with store.write() as w:
            for i, name in enumerate(names):
                w.put(_dev(name, i + 1))
            w.put(_dev("snap", 99, kind=model.DeviceKind.SNAPSHOT, origin="a"))
        assert [d.name for d in store.devices(model.DeviceKind.VOLUME)] == sorted(names)
        got: list[str] = []
        after = ""
        while True:
            page = store.page(model.DeviceKind.VOLUME, after=after, limit=2)
            if not page:
                break
            got += [d.name for d in page]
            after = page[-1].name
        assert got == sorted(names)
        # a name that is not (or no longer) there still continues where it would sort
        assert [d.name for d in store.page(model.DeviceKind.VOLUME, after="aa", limit=0)] == [
            "ab",
            "b",
            "z-1",
            "ß",
            "é",
        ]
        assert [d.name for d in store.page(model.DeviceKind.SNAPSHOT, after="", limit=5)] == ["snap"]
        assert store.page(model.DeviceKind.SNAPSHOT, after="snap", limit=5) == []


def _write_v1_store(path: str, records: list[dict[str, object]], *, intent: dict[str, object] | None) -> None:
    """A store as csi-thin with schema 1 wrote it: records, ids, journal, meta; no index, no totals."""
    env = lmdb.open(path, max_dbs=8, subdir=True)
    try:
        with env.begin(write=True) as txn:
            devices, ids, journal, meta = (
                env.open_db(n, txn=txn) for n in (b"devices", b"ids", b"journal", b"meta")
            )
            for r in records:
                txn.put(str(r["name"]).encode(), json.dumps({"v": 1, **r}).encode(), db=devices)
                txn.put(int(str(r["dev_id"])).to_bytes(4, "big"), str(r["name"]).encode(), db=ids)
            txn.put((900).to_bytes(4, "big"), b"", db=ids)  # an orphan
            if intent is not None:
                txn.put((1).to_bytes(8, "big"), json.dumps({"v": 1, **intent}).encode(), db=journal)
            txn.put(b"schema", b"1", db=meta)
            txn.put(b"txid", b"7", db=meta)
    finally:
        env.close()


def _v1_record(name: str, dev_id: int, **kw: object) -> dict[str, object]:
    r: dict[str, object] = {
        "name": name,
        "dev_id": dev_id,
        "kind": "volume",
        "state": "ready",
        "size_bytes": 1 << 20,
        "origin": None,
        "created_at": 1.0,
        "active": False,
        "path": None,
        "attributes": [],
    }
    r.update(kw)
    return r


def test_a_schema_1_store_gets_its_index_and_totals_built_once_at_open(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "db")
    records = [
        _v1_record("v1", 1),
        _v1_record("v2", 2, size_bytes=3 << 20, active=True, path="/dev/loop9"),
        _v1_record("s1", 3, kind="snapshot", origin="v1"),
        _v1_record("gone", 4, state="lost"),
        _v1_record("new", 5, state="creating"),
    ]
    intent = {
        "seq": 1,
        "op": "create_volume",
        "name": "new",
        "dev_id": 5,
        "size_bytes": 1 << 20,
        "origin_id": None,
        "old_size_bytes": 0,
        "base_txid": 7,
        "steps": ["create_thin", "fence"],
        "created_at": 1.0,
    }
    _write_v1_store(path, records, intent=intent)
    with lmdb_store.LmdbStore(path) as store:
        _check_derived(store)
        assert store.totals().of(kind=model.DeviceKind.VOLUME).count == 4
        assert store.totals().provisioned_bytes == (1 << 20) * 2 + (3 << 20)
        assert store.names_in(model.DeviceState.LOST) == ["gone"]
        assert store.orphans() == [900]
        assert store.transaction_id() == 7
        assert [i.name for i in store.intents()] == ["new"]  # the journal is left for recovery
    env = lmdb.open(path, max_dbs=8, subdir=True)
    try:
        with env.begin() as txn:
            assert txn.get(b"schema", db=env.open_db(b"meta", txn=txn)) == b"2"
    finally:
        env.close()
    with lmdb_store.LmdbStore(path) as store:  # a second open builds nothing
        _check_derived(store)


def test_a_migration_that_fails_leaves_the_schema_1_store_as_it_was(tmp_path: pathlib.Path) -> None:
    """The build runs in the open's one write transaction: a record it cannot read aborts it all,
    and the store stays at schema 1 with nothing half-built (a crash there is the same)."""
    path = str(tmp_path / "db")
    _write_v1_store(path, [_v1_record("v1", 1), _v1_record("bad", 2, kind="nonsense")], intent=None)
    with pytest.raises(lmdb_store.StoreCorrupt):
        lmdb_store.LmdbStore(path)
    env = lmdb.open(path, max_dbs=8, subdir=True)
    try:
        with env.begin() as txn:
            assert txn.get(b"schema", db=env.open_db(b"meta", txn=txn)) == b"1"
            assert txn.stat(env.open_db(b"index", txn=txn))["entries"] == 0
            assert txn.stat(env.open_db(b"totals", txn=txn))["entries"] == 0
    finally:
        env.close()


def test_a_total_is_never_written_below_zero(tmp_path: pathlib.Path) -> None:
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        with store.write() as w:
            w.put(_dev("a", 1, size_bytes=2 << 20))
        with store.write() as w:  # skew the total as an outside writer could
            w._txn.put(b"volume/ready", struct.pack(">QQQ", 1, 1 << 20, 0), db=w._dbs["totals"])
        with pytest.raises(lmdb_store.StoreCorrupt, match="below zero"), store.write() as w:
            w.remove("a")
        assert store.get("a") is not None  # nothing was written
        (diff,) = store.check_index(repair=True)
        assert diff.startswith("total volume/ready is Tally(count=1, size_bytes=1048576"), diff
        _check_derived(store)


def test_a_page_after_a_name_longer_than_any_key_still_pages(tmp_path: pathlib.Path) -> None:
    # a starting_token carries any name a client sends: one past LMDB's key size (511 bytes) must
    # page like any other name, not fail inside the cursor
    with lmdb_store.LmdbStore(str(tmp_path)) as store:
        with store.write() as w:
            for i, name in enumerate(["a", "m" * 600 + "z", "n"]):
                w.put(_dev(name[:200], i + 1))
        long = "m" * 600
        assert [d.name for d in store.page(model.DeviceKind.VOLUME, after=long, limit=0)] == ["n"]
        assert [d.name for d in store.page(model.DeviceKind.VOLUME, after="é" * 300, limit=0)] == []
