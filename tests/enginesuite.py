"""The pool engine suite, backend-neutral.

Every test takes a `harness` fixture (a Harness subclass) supplied by the module that imports the
suite: tests/unit/test_engine_fake.py (FakeBackend), tests/vm/test_engine_dmthin.py (dm-thin on loop
files in the VM), and later the reflink backend. A harness opens engines on ONE pool and one state
dir, so a test can close an engine, "reboot", fork a child that opens its own, and reopen.

Fault injection goes through the pool layer's single seam, `csi_thin.pool.faults.hook`, called at
every point the registry there declares (engine steps, undos, recovery actions, and the states inside
the backends' compound kernel steps). `test_fault_at_every_point` records the points each mutation
passes, then SIGKILLs a forked child at each one and fails each one once in-process, faults every
undo and every start-up recovery too, and fails unless every declared point was both killed and
failed; after each fault the pool, LMDB and the kernel must agree (see `check_after_fault`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import signal
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import lmdb
import pytest

from csi_thin import config, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.controller import provisioner
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import engine as engine_mod
from csi_thin.pool import faults
from csi_thin.pool import layers as layers_mod
from csi_thin.snapshotter import service
from csi_thin.store import lmdb_store
from tests import blockio, conftest

__all__ = [
    "test_activate_deactivate_idempotent",
    "test_attributes_are_kept_and_part_of_create_compatibility",
    "test_clone_and_restore_into_larger_volume",
    "test_committed_layers_take_no_thin_headroom",
    "test_concurrent_creates_of_different_names",
    "test_concurrent_creates_of_one_name",
    "test_create_is_idempotent_and_checks_compatibility",
    "test_create_volume_rounds_up_and_records",
    "test_delete_absent_active_and_lost",
    "test_failed_undo_is_resolved_by_the_next_call",
    "test_fault_at_every_point",
    "test_group_snapshot_is_idempotent_and_refuses_what_it_cannot_do",
    "test_grow_while_active_and_refuse_shrink",
    "test_kill_during_recovery_is_rerunnable",
    "test_layer_commit_left_open_is_resolved_before_the_key_is_used",
    "test_layer_mounts_never_activates_a_committed_layer",
    "test_layer_prepares_on_one_parent_run_together_and_hold_off_its_remove",
    "test_layer_remove_is_not_held_off_by_a_stale_child",
    "test_layers_follow_containerd_and_commit_deactivates",
    "test_lost_store_adopts_the_pool_and_reports_orphans",
    "test_orphans_reported_and_gc",
    "test_reassembly_after_reboot",
    "test_recovery_rebuilds_skewed_totals_and_index",
    "test_snapshot_data_survives_origin_changes",
    "test_snapshot_of_unknown_or_non_volume_source",
    "test_source_claimed_during_snapshot",
    "test_transaction_id_drift_refuses_delete_and_gc_before_the_pool_is_touched",
    "test_transaction_id_mismatch_is_refused",
]

MiB = model.MiB
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def dl() -> deadline_mod.Deadline:
    return deadline_mod.Deadline.after(120)


class Harness:
    """One pool + one state dir; subclasses supply the backend."""

    has_block_devices = False
    block_size = 64 * 1024
    #: names the backend in result lines
    label = "engine"

    def __init__(self, state_dir: str, thresholds: model.Thresholds | None = None) -> None:
        self.state_dir = state_dir
        self.thresholds = thresholds or model.Thresholds()
        self._open: list[engine_mod.PoolEngine] = []
        self.mounts: list[str] = []

    def make_backend(self) -> backend_mod.Backend:
        raise NotImplementedError

    def set_condition(self, engine: engine_mod.PoolEngine, **fields: Any) -> None:
        """Make the pool look full or unhealthy (fake only; real harnesses skip those checks)."""
        raise NotImplementedError

    def open(self, *, assemble: bool = True, recover: bool = True) -> engine_mod.PoolEngine:
        backend = self.make_backend()
        if assemble:
            backend.assemble(deadline=dl())
        store = lmdb_store.LmdbStore(os.path.join(self.state_dir, "lmdb"))
        engine = engine_mod.PoolEngine(
            backend=backend, store=store, thresholds=self.thresholds, block_size=self.block_size
        )
        if recover:
            try:
                engine.recover(deadline=dl())
            except BaseException:
                store.close()  # one LMDB environment per process: the next open makes its own
                raise
        self._open.append(engine)
        return engine

    def close(self, engine: engine_mod.PoolEngine) -> None:
        if engine in self._open:
            self._open.remove(engine)
            engine.store.close()

    def reboot(self, engine: engine_mod.PoolEngine) -> engine_mod.PoolEngine:
        """Tear the pool down (devices kept), drop the engine, assemble again and recover."""
        engine.backend.teardown(deadline=dl())
        self.close(engine)
        return self.open()

    def shutdown(self) -> None:
        for engine in list(self._open):
            self.close(engine)
        for mount_point in reversed(self.mounts):  # only what this harness mounted
            subprocess.run(["umount", mount_point], check=False, capture_output=True)
        self.mounts.clear()

    # -- what the kernel holds, seen by the test itself (not through the backend under test) -----

    def kernel_sizes(self, engine: engine_mod.PoolEngine) -> dict[int, int]:
        """The size the kernel (or pool) gives each device id now, where it keeps one."""
        raise NotImplementedError

    def leftovers(self, engine: engine_mod.PoolEngine) -> list[str]:
        """Kernel state a step must never leave behind (a suspended device, an inactive table, a
        temp file...), described; [] when clean."""
        raise NotImplementedError

    def mount_new_fs(self, path: str) -> str:
        """Make an ext4 filesystem on block device `path` and mount it under the state dir."""
        mount_point = os.path.join(os.path.dirname(self.state_dir), f"mnt-{len(self.mounts)}")
        os.makedirs(mount_point, exist_ok=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", path], check=True, capture_output=True)
        subprocess.run(["mount", "-t", "ext4", path, mount_point], check=True, capture_output=True)
        self.mounts.append(mount_point)
        return mount_point

    def frozen_mounts(self) -> list[str]:
        """Mounts of this harness whose filesystem is frozen (FIFREEZE answers EBUSY)."""
        out = []
        for mount_point in self.mounts:
            fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
            try:
                try:
                    fcntl.ioctl(fd, FIFREEZE, 0)
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    out.append(mount_point)
                    continue
                fcntl.ioctl(fd, FITHAW, 0)
            finally:
                os.close(fd)
        return out


# ---- helpers ---------------------------------------------------------------------------------------


def committed(engine: engine_mod.PoolEngine) -> dict[str, int]:
    return {d.name: d.dev_id for d in engine.list() if d.state == model.DeviceState.READY}


def check_consistent(
    engine: engine_mod.PoolEngine,
    *,
    before: dict[str, int],
    may_vanish: frozenset[str] = frozenset(),
    allowed_orphans: frozenset[int] = frozenset(),
) -> None:
    """The pool and LMDB agree: no open intent, same transaction id, same id set (plus reported
    orphans only where expected), no leaked id, no committed device lost, active flags true."""
    backend = engine.backend
    assert engine.intents() == [], engine.intents()
    assert engine.store.transaction_id() == backend.transaction_id(deadline=dl())
    records = engine.list()
    bad = [d for d in records if d.state != model.DeviceState.READY]
    assert not bad, bad
    pool_ids = set(backend.device_ids(deadline=dl()))
    orphans = set(engine.orphans())
    assert orphans <= allowed_orphans, (orphans, allowed_orphans)
    record_ids = {d.dev_id for d in records}
    assert len(record_ids) == len(records), "two records share an id"
    assert pool_ids == record_ids | orphans, (pool_ids, record_ids, orphans)
    ids_map = engine.store.ids()
    assert ids_map == {**{d.dev_id: d.name for d in records}, **dict.fromkeys(orphans, "")}
    now = committed(engine)
    for name, dev_id in before.items():
        if name not in may_vanish:
            assert now.get(name) == dev_id, f"committed device {name} lost"
    active = backend.active_ids(deadline=dl())
    for d in records:
        assert d.active == (d.dev_id in active), d
        assert (d.path is not None) == d.active, d
    # the index and running totals follow every record change in its own transaction: they agree
    # with the records now, and did when the last recovery looked (a crash at any point left them right)
    assert engine.store.check_index(repair=False) == []
    if engine.last_recovery is not None:
        assert engine.last_recovery.index_repaired == ()
    totals = engine.totals()
    assert totals.of().count == len(records)
    assert totals.provisioned_bytes == sum(d.size_bytes for d in records)
    assert totals.of().active == sum(d.active for d in records)
    assert engine.lost() == []
    check_layers(engine)


def check_layers(engine: engine_mod.PoolEngine) -> None:
    """containerd snapshots: no record left pending, each names a LAYER device record (one device per
    record), and a committed one's device is inactive (the seed left committed layers active)."""
    layers = engine.store.layers()
    assert [x for x in layers if x.pending != model.LayerPending.NONE] == []
    devices = {d.name: d for d in engine.list()}
    assert len({x.device for x in layers}) == len(layers), "two snapshots share a device"
    for x in layers:
        dev = devices.get(x.device)
        assert dev is not None and dev.kind == model.DeviceKind.LAYER, (x, dev)
        if x.kind == model.LayerKind.COMMITTED:
            assert not dev.active, f"committed snapshot {x.key} left active"


# ---- basic operations --------------------------------------------------------------------------------


def test_create_volume_rounds_up_and_records(harness: Harness) -> None:
    e = harness.open()
    dev = e.create_volume("vol", 1_000_000, deadline=dl())
    bs = harness.block_size
    assert dev.size_bytes == -(-1_000_000 // bs) * bs
    assert dev.state == model.DeviceState.READY and dev.kind == model.DeviceKind.VOLUME
    assert not dev.active and dev.path is None and dev.origin is None
    assert e.get("vol") == dev and e.list() == [dev] and e.list(kind=model.DeviceKind.SNAPSHOT) == []
    assert 1 <= dev.dev_id <= model.MAX_DEVICE_ID
    assert e.store.transaction_id() == 1
    assert e.usage("vol", deadline=dl()) == 0
    st = e.status(deadline=dl())
    assert st.healthy and st.transaction_id == 1
    for bad in ("", "a/b", "x\x00", "n" * 300):
        with pytest.raises(errors.InvalidArgument):
            e.create_volume(bad, MiB, deadline=dl())
    for size in (0, -1):
        with pytest.raises(errors.InvalidArgument):
            e.create_volume("sz", size, deadline=dl())
    with pytest.raises(errors.OutOfRange, match="maximum"):
        e.create_volume("sz", 1 << 60, deadline=dl())
    with pytest.raises(errors.NotFound):
        e.usage("nope", deadline=dl())
    check_consistent(e, before=committed(e))


def test_create_is_idempotent_and_checks_compatibility(harness: Harness) -> None:
    e = harness.open()
    a = e.create_volume("a", 4 * MiB, deadline=dl())
    assert e.create_volume("a", 4 * MiB - 1, deadline=dl()) == a  # rounds to the same size
    with pytest.raises(errors.AlreadyExists):
        e.create_volume("a", 8 * MiB, deadline=dl())
    s = e.create_snapshot("s", "a", deadline=dl())
    assert s.kind == model.DeviceKind.SNAPSHOT and s.origin == "a" and s.size_bytes == a.size_bytes
    assert e.create_snapshot("s", "a", deadline=dl()) == s
    with pytest.raises(errors.AlreadyExists):
        e.create_volume("s", 4 * MiB, deadline=dl())
    c = e.clone("c", "s", 4 * MiB, deadline=dl())
    assert e.clone("c", "s", 4 * MiB, deadline=dl()) == c
    with pytest.raises(errors.AlreadyExists):
        e.clone("c", "a", 4 * MiB, deadline=dl())
    assert e.store.transaction_id() == 3  # idempotent returns changed nothing
    assert len({a.dev_id, s.dev_id, c.dev_id}) == 3
    check_consistent(e, before=committed(e))


def test_snapshot_of_unknown_or_non_volume_source(harness: Harness) -> None:
    e = harness.open()
    with pytest.raises(errors.NotFound):
        e.create_snapshot("s", "missing", deadline=dl())
    with pytest.raises(errors.NotFound):
        e.clone("c", "missing", MiB, deadline=dl())
    e.create_volume("v", 2 * MiB, deadline=dl())
    e.create_snapshot("s", "v", deadline=dl())
    with pytest.raises(errors.InvalidArgument):
        e.create_snapshot("ss", "s", deadline=dl())
    with pytest.raises(errors.OutOfRange):
        e.clone("small", "v", MiB, deadline=dl())
    with pytest.raises(errors.InvalidArgument):
        e.create_snapshot("v", "v", deadline=dl())
    assert {d.name for d in e.list()} == {"v", "s"}
    check_consistent(e, before=committed(e))


def test_group_snapshot_is_idempotent_and_refuses_what_it_cannot_do(harness: Harness) -> None:
    e = harness.open()
    for name in ("a", "b", "c"):
        e.create_volume(name, 2 * MiB, deadline=dl())
    e.activate("a", deadline=dl())  # one active origin (held), one inactive
    e.create_snapshot("s", "c", deadline=dl())
    base = e.store.transaction_id()
    g = e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=dl())
    assert [(d.name, d.origin, d.group, d.kind) for d in g] == [
        ("g-a", "a", "g", model.DeviceKind.SNAPSHOT),
        ("g-b", "b", "g", model.DeviceKind.SNAPSHOT),
    ]
    assert all(d.state == model.DeviceState.READY for d in g) and len({d.created_at for d in g}) == 1
    assert e.store.transaction_id() == base + 1, "one group, one fenced mutation"
    assert e.create_group_snapshot("g", [("g-b", "b"), ("g-a", "a")], deadline=dl()) == g[::-1]
    assert e.store.transaction_id() == base + 1, "an idempotent repeat changes nothing"
    assert e.get_group("g") == g and e.get_group("other") == []
    assert {d.name for d in e.list(kind=model.DeviceKind.SNAPSHOT)} == {"s", "g-a", "g-b"}
    refused: list[tuple[type[errors.CsiThinError], str, list[tuple[str, str]], str]] = [
        (errors.AlreadyExists, "g", [("g-a", "a"), ("g-c", "c")], "exists with members"),
        (errors.AlreadyExists, "g", [("g-a", "a")], "exists with members"),
        (errors.NotFound, "h", [("h-a", "a"), ("h-x", "missing")], "'missing' is not in this pool"),
        (errors.InvalidArgument, "h", [("h-a", "a"), ("h-s", "s")], "is a snapshot, not a volume"),
        (errors.InvalidArgument, "h", [("h-a", "a"), ("h-b", "a")], "given twice"),
        (errors.InvalidArgument, "h", [("h-a", "a"), ("h-a", "b")], "given twice"),
        (errors.InvalidArgument, "h", [("b", "a"), ("h-b", "b")], "both a member snapshot and a source"),
        (errors.InvalidArgument, "h", [], "no member"),
        (errors.InvalidArgument, "h", [("h/a", "a")], "no '/'"),
        (errors.AlreadyExists, "h", [("s", "a")], "member name 's' is taken"),
    ]
    for exc, group, members, says in refused:
        with pytest.raises(exc, match=says):
            e.create_group_snapshot(group, members, deadline=dl())
    assert e.get_group("h") == [] and e.store.transaction_id() == base + 1, "a refusal changes nothing"
    restored = e.clone("r", "g-b", 4 * MiB, deadline=dl())  # a member restores like any snapshot
    assert restored.origin == "g-b" and restored.group is None
    check_consistent(e, before=committed(e))
    e.delete_group_snapshot("g", deadline=dl())
    e.delete_group_snapshot("g", deadline=dl())  # absent is done
    assert e.get_group("g") == [] and "g-a" not in {d.name for d in e.list()}
    e.deactivate("a", deadline=dl())
    check_consistent(e, before=committed(e))
    e = harness.reboot(e)  # the group field survives a reopen of the store
    assert e.create_group_snapshot("g", [("g-c", "c")], deadline=dl())[0].group == "g"
    e = harness.reboot(e)
    assert [d.group for d in e.get_group("g")] == ["g"]


def test_group_snapshot_holds_data_of_one_instant(harness: Harness) -> None:
    """Two mounted filesystems written without fsync, snapshotted as a group: each member restores
    with what its volume held at that instant (the hold flushed it), nothing written after.
    Backends with block devices only: imported by name where they run (not in __all__)."""
    assert harness.has_block_devices
    e = harness.open()
    mounts = []
    for name in ("db", "wal"):
        dev = e.activate(e.create_volume(name, 32 * MiB, deadline=dl()).name, deadline=dl())
        assert dev.path is not None
        mounts.append(harness.mount_new_fs(dev.path))
    for mount_point in mounts:  # page cache only: the group's hold must flush it
        with open(os.path.join(mount_point, "f"), "wb") as f:
            f.write(b"before " + mount_point.encode())
    g = e.create_group_snapshot("g", [("db-g", "db"), ("wal-g", "wal")], deadline=dl())
    assert harness.frozen_mounts() == [] and harness.leftovers(e) == []
    for mount_point in mounts:
        with open(os.path.join(mount_point, "f"), "wb") as f:
            f.write(b"after")
    for member, mount_point in zip(g, mounts, strict=True):
        clone = e.activate(
            e.clone(f"{member.name}-r", member.name, 32 * MiB, deadline=dl()).name, deadline=dl()
        )
        assert clone.path is not None
        restored = os.path.join(os.path.dirname(harness.state_dir), f"restored-{member.name}")
        os.makedirs(restored, exist_ok=True)
        subprocess.run(["mount", "-o", "ro", clone.path, restored], check=True, capture_output=True)
        harness.mounts.append(restored)
        with open(os.path.join(restored, "f"), "rb") as f:
            assert f.read() == b"before " + mount_point.encode(), member.name
    check_consistent(e, before=committed(e))


def test_group_snapshot_killed_while_held_is_let_go_at_start(harness: Harness) -> None:
    """The one state that hurts beyond the pool: a process killed while it holds a group's origins
    leaves them suspended (dm-thin) or their filesystems frozen (reflink), and every writer hangs.
    The next start (assemble, then recovery) lets them go, the writers go on, the group is undone
    whole and can be made again. Backends with block devices only (imported by name)."""
    assert harness.has_block_devices
    e = harness.open()
    mounts = []
    for name in ("a", "b"):
        dev = e.activate(e.create_volume(name, 32 * MiB, deadline=dl()).name, deadline=dl())
        assert dev.path is not None
        mounts.append(harness.mount_new_fs(dev.path))
    before = committed(e)
    harness.close(e)
    point = "create_group_snapshot/release"  # both members made, nothing let go yet
    killed = in_child(
        harness,
        Injector(kill_name=point),
        lambda c: c.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=dl()),
    )
    assert killed == point
    e = harness.open(assemble=False, recover=False)
    # dm-thin: leftovers lists the suspended devices (a freeze there would hang); reflink: frozen fs
    held = harness.leftovers(e) or harness.frozen_mounts()
    assert len(held) == 2, f"the killed process should have left both origins held: {held}"
    harness.close(e)
    e = harness.open()
    assert harness.leftovers(e) == [] and harness.frozen_mounts() == []
    done: list[str] = []

    def write(mount_point: str) -> None:
        with open(os.path.join(mount_point, "after"), "wb") as f:
            f.write(b"writes go on")
            os.fsync(f.fileno())
        done.append(mount_point)

    writers = [threading.Thread(target=write, args=(m,), daemon=True) for m in mounts]
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    assert sorted(done) == sorted(mounts), "a writer still hangs on a held origin"
    assert e.last_recovery is not None and e.last_recovery.rolled_back == ("create_group_snapshot g",)
    assert e.get_group("g") == []
    check_consistent(e, before=before)
    assert [d.name for d in e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=dl())] == [
        "g-a",
        "g-b",
    ]
    assert harness.leftovers(e) == [] and harness.frozen_mounts() == []
    check_consistent(e, before=committed(e))


def test_activate_deactivate_idempotent(harness: Harness) -> None:
    e = harness.open()
    e.create_volume("v", 2 * MiB, deadline=dl())
    a1 = e.activate("v", deadline=dl())
    a2 = e.activate("v", deadline=dl())
    assert a1.active and a1.path and a1 == a2
    assert a1.dev_id in e.backend.active_ids(deadline=dl())
    if harness.has_block_devices:
        assert blockio.device_size(a1.path) == a1.size_bytes
    check_consistent(e, before=committed(e))
    d1 = e.deactivate("v", deadline=dl())
    d2 = e.deactivate("v", deadline=dl())
    assert not d1.active and d1.path is None and d1 == d2
    with pytest.raises(errors.NotFound):
        e.activate("nope", deadline=dl())
    with pytest.raises(errors.NotFound):
        e.deactivate("nope", deadline=dl())
    assert e.store.transaction_id() == 1  # activation is not a pool-metadata mutation
    check_consistent(e, before=committed(e))


def test_delete_absent_active_and_lost(harness: Harness) -> None:
    e = harness.open()
    e.delete("never-was", deadline=dl())
    v = e.create_volume("v", MiB, deadline=dl())
    e.activate("v", deadline=dl())
    with pytest.raises(errors.FailedPrecondition):
        e.delete("v", deadline=dl())
    e.deactivate("v", deadline=dl())
    e.delete("v", deadline=dl())
    e.delete("v", deadline=dl())
    assert e.get("v") is None and v.dev_id not in e.backend.device_ids(deadline=dl())
    assert e.store.ids() == {}
    # a LOST record: the pool lost the device behind our back
    w = e.create_volume("w", MiB, deadline=dl())
    e.backend.delete(w.dev_id, deadline=dl())
    report = e.recover(deadline=dl())
    assert report.lost == ("w",)
    got = e.get("w")
    assert got is not None and got.state == model.DeviceState.LOST
    with pytest.raises(errors.FailedPrecondition):
        e.activate("w", deadline=dl())
    with pytest.raises(errors.FailedPrecondition):
        e.create_volume("w", MiB, deadline=dl())  # never re-created empty
    e.delete("w", deadline=dl())
    assert e.get("w") is None and e.store.ids() == {}
    check_consistent(e, before=committed(e))


def test_grow_while_active_and_refuse_shrink(harness: Harness) -> None:
    e = harness.open()
    e.create_volume("v", 2 * MiB, deadline=dl())
    dev = e.activate("v", deadline=dl())
    assert dev.path is not None
    if harness.has_block_devices:
        blockio.write_at(dev.path, 0, b"before-grow" * 100)
    g = e.grow("v", 5 * MiB, deadline=dl())
    assert g.size_bytes == 5 * MiB and g.active
    assert e.grow("v", 5 * MiB, deadline=dl()) == g
    with pytest.raises(errors.OutOfRange):
        e.grow("v", MiB, deadline=dl())
    if harness.has_block_devices:
        assert blockio.device_size(dev.path) == 5 * MiB
        assert blockio.read_at(dev.path, 0, 1100) == b"before-grow" * 100
        blockio.write_at(dev.path, 5 * MiB - 4096, b"z" * 4096)
    e.deactivate("v", deadline=dl())
    assert e.grow("v", 6 * MiB, deadline=dl()).size_bytes == 6 * MiB  # inactive: record only
    dev = e.activate("v", deadline=dl())
    if harness.has_block_devices:
        assert dev.path is not None and blockio.device_size(dev.path) == 6 * MiB
    with pytest.raises(errors.NotFound):
        e.grow("nope", MiB, deadline=dl())
    check_consistent(e, before=committed(e))


def test_snapshot_data_survives_origin_changes(harness: Harness) -> None:
    e = harness.open()
    v = e.activate(e.create_volume("v", 4 * MiB, deadline=dl()).name, deadline=dl())
    assert v.path is not None
    if harness.has_block_devices:
        blockio.write_at(v.path, 0, b"A" * 65536)
        blockio.write_at(v.path, MiB, b"B" * 4096)
    s_active = e.create_snapshot("s1", "v", deadline=dl())  # of an ACTIVE origin
    if harness.has_block_devices:
        blockio.write_at(v.path, 0, b"C" * 65536)
    e.deactivate("v", deadline=dl())
    s_inactive = e.create_snapshot("s2", "v", deadline=dl())  # of an INACTIVE origin
    assert s_active.dev_id != s_inactive.dev_id
    if not harness.has_block_devices:
        return
    v = e.activate("v", deadline=dl())
    assert v.path is not None
    blockio.write_at(v.path, 0, b"D" * 65536)
    s1 = e.activate("s1", deadline=dl())
    s2 = e.activate("s2", deadline=dl())
    assert s1.path and s2.path
    assert blockio.read_at(s1.path, 0, 65536) == b"A" * 65536
    assert blockio.read_at(s1.path, MiB, 4096) == b"B" * 4096
    assert blockio.read_at(s2.path, 0, 65536) == b"C" * 65536
    assert blockio.read_at(v.path, 0, 65536) == b"D" * 65536
    assert e.usage("s1", deadline=dl()) > 0
    check_consistent(e, before=committed(e))


def test_clone_and_restore_into_larger_volume(harness: Harness) -> None:
    e = harness.open()
    v = e.activate(e.create_volume("v", 2 * MiB, deadline=dl()).name, deadline=dl())
    if harness.has_block_devices:
        assert v.path is not None
        blockio.write_at(v.path, 0, b"orig" * 1024)
    e.deactivate("v", deadline=dl())
    e.create_snapshot("snap", "v", deadline=dl())
    restored = e.clone("restored", "snap", 8 * MiB, deadline=dl())
    cloned = e.clone("cloned", "v", 2 * MiB, deadline=dl())
    assert restored.kind == cloned.kind == model.DeviceKind.VOLUME
    assert restored.origin == "snap" and restored.size_bytes == 8 * MiB
    e.delete("snap", deadline=dl())  # the restored volume does not depend on the snapshot's record
    e.delete("v", deadline=dl())
    r = e.activate("restored", deadline=dl())
    c = e.activate("cloned", deadline=dl())
    if harness.has_block_devices:
        assert r.path and c.path
        assert blockio.device_size(r.path) == 8 * MiB
        assert blockio.read_at(r.path, 0, 4096) == b"orig" * 1024
        assert blockio.read_at(c.path, 0, 4096) == b"orig" * 1024
        blockio.write_at(r.path, 7 * MiB, b"tail" * 1024)
        assert blockio.read_at(r.path, 7 * MiB, 4096) == b"tail" * 1024
    check_consistent(e, before=committed(e))


def test_pool_exhausted_and_unhealthy(harness: Harness) -> None:
    """Fake backends only (not in __all__): a test cannot set a real pool's fullness and mode."""
    e = harness.open()
    e.create_volume("v", MiB, deadline=dl())
    harness.set_condition(e, data_used=int(64 * model.GiB * 0.96))
    with pytest.raises(errors.PoolExhausted, match="data"):
        e.create_volume("w", MiB, deadline=dl())
    with pytest.raises(errors.PoolExhausted):
        e.create_snapshot("s", "v", deadline=dl())
    # existing volumes keep working
    e.activate("v", deadline=dl())
    e.grow("v", 2 * MiB, deadline=dl())
    e.deactivate("v", deadline=dl())
    assert e.create_volume("v", 2 * MiB, deadline=dl()).name == "v"  # idempotent create still answers
    harness.set_condition(e, data_used=None, metadata_used_ratio=0.85)
    with pytest.raises(errors.PoolExhausted, match="metadata"):
        e.create_volume("w", MiB, deadline=dl())
    harness.set_condition(e, metadata_used_ratio=0.01, mode="ro")
    with pytest.raises(errors.Unavailable, match=r"read-only.*thin_repair"):
        e.create_volume("w", MiB, deadline=dl())
    with pytest.raises(errors.Unavailable):
        e.delete("v", deadline=dl())
    with pytest.raises(errors.Unavailable):
        e.grow("v", 4 * MiB, deadline=dl())
    assert e.activate("v", deadline=dl()).active  # reads keep working on a read-only pool
    e.deactivate("v", deadline=dl())
    harness.set_condition(e, mode="rw", needs_check=True)
    with pytest.raises(errors.Unavailable, match="needs_check"):
        e.create_volume("w", MiB, deadline=dl())
    harness.set_condition(e, needs_check=False)
    e.create_volume("w", MiB, deadline=dl())
    e.delete("v", deadline=dl())
    check_consistent(e, before=committed(e))


def test_pool_modes_follow_the_table(harness: Harness) -> None:
    """Fake backends only (not in __all__). Out of data space: what allocates is PoolFull
    (RESOURCE_EXHAUSTED) naming what is full, deletes/activate/deactivate run. Failed: every change
    is Unavailable with a hint, activate too, but deactivate runs (an offline repair needs it)."""
    e = harness.open()
    e.create_volume("v", MiB, deadline=dl())
    e.create_snapshot("s", "v", deadline=dl())
    e.create_snapshot("s2", "v", deadline=dl())
    harness.set_condition(e, mode="out_of_data_space", data_used=64 * model.GiB)
    for call in (
        lambda: e.create_volume("w", MiB, deadline=dl()),
        lambda: e.create_snapshot("s3", "v", deadline=dl()),
        lambda: e.clone("c", "s", MiB, deadline=dl()),
        lambda: e.grow("v", 2 * MiB, deadline=dl()),
    ):
        with pytest.raises(errors.PoolFull, match="data space is full"):
            call()
    assert e.activate("v", deadline=dl()).active  # staged volumes keep working
    e.delete("s", deadline=dl())  # deletes free space: they must run
    assert e.get("s") is None
    harness.set_condition(e, mode="fail", data_used=None)
    with pytest.raises(errors.Unavailable, match="failed"):
        e.delete("s2", deadline=dl())
    with pytest.raises(errors.Unavailable, match="failed"):
        e.activate("s2", deadline=dl())
    assert not e.deactivate("v", deadline=dl()).active
    harness.set_condition(e, mode="rw")
    e.delete("s2", deadline=dl())
    e.delete("v", deadline=dl())
    check_consistent(e, before=committed(e))


def test_restart_on_a_read_only_pool(harness: Harness) -> None:
    """Fake backends only (not in __all__). A pool the kernel turned read-only (metadata full, a
    metadata error) takes no messages, so its device ids cannot be read while it is live. The driver
    must still start after a restart, so the existing volumes keep working: recovery takes the
    active flags from the kernel and leaves the id check for when the pool is writable again."""
    e = harness.open()
    v = e.create_volume("v", MiB, deadline=dl())
    e.activate("v", deadline=dl())
    harness.set_condition(e, mode="ro")
    harness.close(e)
    e = harness.open(assemble=False)  # the restarted driver; the pool stays live (and read-only)
    report = e.last_recovery
    assert report is not None and not report.ids_checked
    assert report.lost == () and report.orphans == ()
    assert e.get("v") == dataclasses.replace(v, active=True, path=e.backend.device_path(v.dev_id))
    e.deactivate("v", deadline=dl())
    assert e.activate("v", deadline=dl()).active  # existing volumes keep working
    with pytest.raises(errors.Unavailable):
        e.create_volume("w", MiB, deadline=dl())
    harness.set_condition(e, mode="rw")
    assert e.recover(deadline=dl()).ids_checked
    check_consistent(e, before=committed(e))


def test_reassembly_after_reboot(harness: Harness) -> None:
    e = harness.open()
    v = e.activate(e.create_volume("v", 4 * MiB, deadline=dl()).name, deadline=dl())
    if harness.has_block_devices:
        assert v.path is not None
        blockio.write_at(v.path, 0, b"keep" * 1024)
    e.create_snapshot("s", "v", deadline=dl())
    e.clone("c", "s", 6 * MiB, deadline=dl())
    e.create_volume("idle", MiB, deadline=dl())
    before = {d.name: d for d in e.list()}
    txid = e.store.transaction_id()
    e = harness.reboot(e)
    after = {d.name: d for d in e.list()}
    assert set(after) == set(before)
    for name, d in after.items():
        b = before[name]
        assert (d.dev_id, d.kind, d.size_bytes, d.origin, d.state) == (
            b.dev_id,
            b.kind,
            b.size_bytes,
            b.origin,
            b.state,
        )
        assert not d.active  # teardown deactivated everything; recovery took the flags from the kernel
    assert e.store.transaction_id() == txid == e.backend.transaction_id(deadline=dl())
    check_consistent(e, before=committed(e))
    c = e.activate("c", deadline=dl())
    if harness.has_block_devices:
        assert c.path is not None and blockio.read_at(c.path, 0, 4096) == b"keep" * 1024
    e.create_volume("after-reboot", MiB, deadline=dl())
    check_consistent(e, before=committed(e))


def test_orphans_reported_and_gc(harness: Harness) -> None:
    e = harness.open()
    e.create_volume("v", MiB, deadline=dl())
    orphan_id = 4242
    e.backend.create_thin(orphan_id, MiB, deadline=dl())  # a device no record owns
    report = e.recover(deadline=dl())
    assert report.orphans == (orphan_id,) and e.orphans() == [orphan_id]
    assert orphan_id in e.backend.device_ids(deadline=dl())  # reported, never silently deleted
    e.recover(deadline=dl())  # re-runnable
    check_consistent(e, before=committed(e), allowed_orphans=frozenset({orphan_id}))
    # an orphan id is never handed out while it is reserved
    with e.store.write() as w:
        w._txn.put(b"next_id", str(orphan_id).encode(), db=w._dbs["meta"])
    assert e.create_volume("w", MiB, deadline=dl()).dev_id != orphan_id
    assert e.gc_orphans(deadline=dl()) == [orphan_id]
    assert e.orphans() == [] and orphan_id not in e.backend.device_ids(deadline=dl())
    assert e.gc_orphans(deadline=dl()) == []
    check_consistent(e, before=committed(e))


def test_attributes_are_kept_and_part_of_create_compatibility(harness: Harness) -> None:
    e = harness.open()
    attrs = {"fs": "ext4", "access": "mount"}
    v = e.create_volume("v", MiB, deadline=dl(), attributes=attrs)
    assert dict(v.attributes) == attrs
    assert e.create_volume("v", MiB, deadline=dl(), attributes=dict(reversed(attrs.items()))) == v
    for other in ({"fs": "xfs", "access": "mount"}, None):
        with pytest.raises(errors.AlreadyExists):
            e.create_volume("v", MiB, deadline=dl(), attributes=other)
    c = e.clone("c", "v", 2 * MiB, deadline=dl(), attributes={"access": "block"})
    harness.close(e)
    e = harness.open()  # kept across a restart
    assert e.get("v") == v and dict(e.get("c").attributes) == {"access": "block"}  # type: ignore[union-attr]
    assert c.attributes == (("access", "block"),)


def test_lost_store_adopts_the_pool_and_reports_orphans(harness: Harness) -> None:
    """LMDB lost: a fresh store over the pool adopts its transaction id; every device is an orphan,
    reported and reserved, never deleted by recovery."""
    e = harness.open()
    ids = {e.create_volume(f"v{i}", MiB, deadline=dl()).dev_id for i in range(3)}
    txid = e.store.transaction_id()
    harness.close(e)
    for name in ("data.mdb", "lock.mdb"):
        os.unlink(os.path.join(harness.state_dir, "lmdb", name))
    e = harness.open(recover=False)
    report = e.recover(deadline=dl())
    assert report.adopted_txid and report.pool_txid == report.store_txid == txid
    assert set(report.orphans) == ids == set(e.orphans()) == set(e.backend.device_ids(deadline=dl()))
    check_consistent(e, before={}, allowed_orphans=frozenset(ids))
    new = e.create_volume("new", MiB, deadline=dl())
    assert new.dev_id not in ids
    # the orphans are the lost store's volumes, not garbage: gc refuses them without force
    with pytest.raises(errors.FailedPrecondition, match="lost"):
        e.gc_orphans(deadline=dl())
    assert set(e.backend.device_ids(deadline=dl())) == ids | {new.dev_id}
    assert sorted(e.gc_orphans(deadline=dl(), force=True)) == sorted(ids)
    assert e.store.adopted() is None  # forced once: an ordinary store again
    check_consistent(e, before=committed(e))


def test_recovery_rebuilds_skewed_totals_and_index(harness: Harness) -> None:
    """The running totals and the index are derived from the records, in the records' own write
    transactions. Skewed from outside the engine (a hand edit of the store, a bug), a change that
    would take a total below zero is refused before the pool is touched, and start-up recovery finds
    every difference and rebuilds them from the records."""
    e = harness.open()
    e.create_volume("v1", MiB, deadline=dl())
    e.create_volume("v2", 2 * MiB, deadline=dl())
    e.create_snapshot("s1", "v1", deadline=dl())
    want = e.totals()
    ids = set(e.backend.device_ids(deadline=dl()))
    harness.close(e)
    env = lmdb.open(os.path.join(harness.state_dir, "lmdb"), max_dbs=8, subdir=True)
    try:
        with env.begin(write=True) as txn:
            totals = env.open_db(b"totals", txn=txn)
            index = env.open_db(b"index", txn=txn)
            txn.put(b"volume/ready", struct.pack(">QQQ", 1, MiB, 0), db=totals)
            txn.delete(b"kvolume\0v2", db=index)
            txn.put(b"kvolume\0ghost", b"", db=index)
    finally:
        env.close()
    e = harness.open(recover=False)
    with pytest.raises(lmdb_store.StoreCorrupt, match="below zero"):
        e.delete("v2", deadline=dl())
    assert set(e.backend.device_ids(deadline=dl())) == ids  # refused before the pool was touched
    with pytest.raises(lmdb_store.StoreCorrupt, match="ghost"):
        e.list(kind=model.DeviceKind.VOLUME)
    report = e.recover(deadline=dl())
    assert len(report.index_repaired) == 3, report.index_repaired
    assert e.totals() == want
    assert [d.name for d in e.list(kind=model.DeviceKind.VOLUME)] == ["v1", "v2"]
    assert e.recover(deadline=dl()).index_repaired == ()
    e.delete("v2", deadline=dl())
    check_consistent(e, before=committed(e))


def test_transaction_id_mismatch_is_refused(harness: Harness) -> None:
    e = harness.open()
    e.create_volume("v", MiB, deadline=dl())
    e.backend.set_transaction_id(1, 5, deadline=dl())  # someone else moved the pool on
    with pytest.raises(errors.Internal, match="disagree"):
        e.recover(deadline=dl())
    with pytest.raises(errors.CsiThinError):  # the fence's compare-and-swap refuses the mutation
        e.create_volume("w", MiB, deadline=dl())
    assert e.get("w") is None and e.intents() == []
    e.backend.set_transaction_id(5, 1, deadline=dl())
    e.recover(deadline=dl())
    check_consistent(e, before=committed(e))


def test_transaction_id_drift_refuses_delete_and_gc_before_the_pool_is_touched(harness: Harness) -> None:
    """The pool's transaction id moved under a running engine (another process, or the wrong pool for
    this state dir): the records' ids may name someone else's devices, so a delete or gc must be
    refused BEFORE its delete step, not by the fence after it."""
    e = harness.open()
    v = e.create_volume("v", MiB, deadline=dl())
    orphan_id = 4242
    e.backend.create_thin(orphan_id, MiB, deadline=dl())
    e.recover(deadline=dl())
    e.backend.set_transaction_id(1, 5, deadline=dl())  # someone else moved the pool on
    with pytest.raises(errors.Internal, match="disagree"):
        e.delete("v", deadline=dl())
    with pytest.raises(errors.Internal, match="disagree"):
        e.gc_orphans(deadline=dl())
    ids = e.backend.device_ids(deadline=dl())
    assert v.dev_id in ids and orphan_id in ids  # nothing was deleted
    assert e.get("v") == v and e.intents() == []
    e.backend.set_transaction_id(5, 1, deadline=dl())
    e.recover(deadline=dl())
    check_consistent(e, before=committed(e), allowed_orphans=frozenset({orphan_id}))


# ---- fault injection ----------------------------------------------------------------------------

#: Volumes every fault scenario keeps beside its own: written before any fault, read after each one.
#: "base-active" is active with a mounted filesystem (the origin of the snapshot/clone-of-active
#: scenarios: dm-thin suspends it, reflink freezes it); "keep" is an inactive volume.
WITNESS_FILE = "witness.bin"
WITNESS_BYTES = b"csi-thin witness " * 4096
KEEP_BYTES = b"kept-data-" * 6000


@dataclasses.dataclass
class Witnesses:
    harness: Harness
    mount_point: str | None = None

    def ensure(self, e: engine_mod.PoolEngine) -> None:
        """Create the witnesses once per pool (cheap when they exist)."""
        h = self.harness
        keep = e.get("keep")
        if keep is None:
            e.create_volume("keep", 2 * MiB, deadline=dl())
            if h.has_block_devices:
                path = e.activate("keep", deadline=dl()).path
                assert path is not None
                blockio.write_at(path, 0, KEEP_BYTES)
                e.deactivate("keep", deadline=dl())
        active = e.get("base-active")
        if active is None or not active.active:
            active = e.activate(e.create_volume("base-active", 8 * MiB, deadline=dl()).name, deadline=dl())
        if h.has_block_devices and self.mount_point is None:
            assert active.path is not None
            self.mount_point = h.mount_new_fs(active.path)
            path = os.path.join(self.mount_point, WITNESS_FILE)
            with open(path, "wb") as f:
                f.write(WITNESS_BYTES)
                f.flush()
                os.fsync(f.fileno())

    def check(self, e: engine_mod.PoolEngine, *, full: bool = False) -> None:
        """The mounted witness still holds its bytes (read from the device, not the page cache);
        with `full`, the inactive one too (activated for the read)."""
        if not self.harness.has_block_devices:
            return
        assert self.mount_point is not None
        fd = os.open(os.path.join(self.mount_point, WITNESS_FILE), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, len(WITNESS_BYTES) + 1, 0) == WITNESS_BYTES, "witness file changed"
        finally:
            os.close(fd)
        if full:
            path = e.activate("keep", deadline=dl()).path
            assert path is not None
            assert blockio.read_at(path, 0, len(KEEP_BYTES)) == KEEP_BYTES, "inactive volume changed"
            e.deactivate("keep", deadline=dl())


def check_after_fault(
    harness: Harness,
    e: engine_mod.PoolEngine,
    witnesses: Witnesses,
    *,
    before: dict[str, int],
    may_vanish: frozenset[str] = frozenset(),
    allowed_orphans: frozenset[int] = frozenset(),
    may_freeze: bool = False,
) -> None:
    """check_consistent, and: no kernel leftovers (suspended device, inactive table, frozen
    filesystem, temp file), every record's size is the kernel's, the witnesses hold their bytes."""
    check_consistent(e, before=before, may_vanish=may_vanish, allowed_orphans=allowed_orphans)
    left = harness.leftovers(e)
    assert not left, left
    if may_freeze:  # after the suspend check: a suspended device would hang the freeze
        assert harness.frozen_mounts() == []
    sizes = harness.kernel_sizes(e)
    wrong = {
        d.name: (d.size_bytes, sizes[d.dev_id])
        for d in e.list()
        if sizes.get(d.dev_id, d.size_bytes) != d.size_bytes
    }
    assert not wrong, f"record size != kernel size: {wrong}"
    witnesses.check(e)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A mutation: `prep` builds what it needs (in-process, committed), `run` is the mutation."""

    name: str
    prep: Callable[[engine_mod.PoolEngine, str], None]
    run: Callable[[engine_mod.PoolEngine, str], object]
    may_vanish: Callable[[str], frozenset[str]] = lambda tag: frozenset()
    orphan: bool = False
    #: suspends (dm-thin) or freezes (reflink) the mounted witness: check it is not left frozen
    freezes: bool = False


def _ensure_volume(e: engine_mod.PoolEngine, name: str, *, active: bool = False) -> None:
    e.create_volume(name, 2 * MiB, deadline=dl())
    if active:
        e.activate(name, deadline=dl())


def _prep_base(e: engine_mod.PoolEngine, tag: str) -> None:
    _ensure_volume(e, "base")
    e.create_snapshot("base-snap", "base", deadline=dl())


def _prep_orphan(e: engine_mod.PoolEngine, tag: str) -> None:
    if not e.orphans():
        pool_ids = e.backend.device_ids(deadline=dl())
        dev_id = max([*pool_ids, *e.store.ids(), 0]) + 1000
        e.backend.create_thin(dev_id, MiB, deadline=dl())
        e.recover(deadline=dl())


def _prep_snapshot(e: engine_mod.PoolEngine, tag: str) -> None:
    _prep_base(e, tag)
    e.create_snapshot(f"ds-{tag}", "base", deadline=dl())


# containerd snapshots (csi_thin.pool.layers). containerd's calls are not idempotent (a second
# Prepare of a key is AlreadyExists), so each run does its call only when it is still to be done:
# the retry after a fault completes the mutation, whichever way recovery resolved it.

#: the committed layer the snapshot scenarios start from (kept between scenarios, like "base")
LAYER_BASE = "sha256:lbase"
#: tag -> the device of the scenario's snapshot (random names: what a remove may make vanish)
_LAYER_DEVICES: dict[str, str] = {}


def layer_fmt(path: str, deadline: deadline_mod.Deadline) -> None:
    """A real ext4 on real block devices (the fake backend's paths do not exist)."""
    if os.path.exists(path):
        subprocess.run(["mkfs.ext4", "-q", "-F", path], check=True, capture_output=True)


def layer_discard(path: str, deadline: deadline_mod.Deadline) -> None:
    if os.path.exists(path):
        subprocess.run(["blkdiscard", path], check=True, capture_output=True)


def _layers(e: engine_mod.PoolEngine) -> layers_mod.Layers:
    return layers_mod.Layers(e)


def _prepare_layer(
    e: engine_mod.PoolEngine, key: str, *, parent: str = "", kind: model.LayerKind = model.LayerKind.ACTIVE
) -> None:
    if _layers(e).get(key) is None:
        _layers(e).prepare(
            key,
            parent=parent,
            kind=kind,
            labels={"containerd.io/gc.root": key},
            size_bytes=4 * MiB,
            fmt=layer_fmt,
            attributes={},
            deadline=dl(),
        )


def _prep_layer_base(e: engine_mod.PoolEngine, tag: str) -> None:
    if _layers(e).get(LAYER_BASE) is None:
        _prepare_layer(e, "extract-lbase")
        _layers(e).commit(LAYER_BASE, "extract-lbase", labels={}, deadline=dl())


def _prep_layer_active(e: engine_mod.PoolEngine, tag: str) -> None:
    _prep_layer_base(e, tag)
    _prepare_layer(e, f"default/{tag}/la", parent=LAYER_BASE)
    _LAYER_DEVICES[tag] = _layers(e).require(f"default/{tag}/la").device


def _prep_layer_committed(e: engine_mod.PoolEngine, tag: str) -> None:
    _prep_layer_active(e, tag)
    if _layers(e).get(f"sha256:{tag}") is None:  # (recording runs every scenario with one tag)
        _layers(e).commit(f"sha256:{tag}", f"default/{tag}/la", labels={}, deadline=dl())
    _LAYER_DEVICES[tag] = _layers(e).require(f"sha256:{tag}").device


def _prep_layer_forgotten(e: engine_mod.PoolEngine, tag: str) -> None:
    _prep_layer_committed(e, tag)
    _layers(e).remove(f"sha256:{tag}", deferred=True, discard=None, deadline=dl())


def _run_layer_commit(e: engine_mod.PoolEngine, tag: str) -> None:
    if _layers(e).get(f"sha256:{tag}") is None:
        _layers(e).commit(f"sha256:{tag}", f"default/{tag}/la", labels={"l": "1"}, deadline=dl())


def _run_layer_remove(e: engine_mod.PoolEngine, key: str) -> None:
    if _layers(e).get(key) is not None:
        _layers(e).remove(key, deferred=False, discard=layer_discard, deadline=dl())


def _layer_device(tag: str) -> frozenset[str]:
    return frozenset({_LAYER_DEVICES.get(tag, "")})


SCENARIOS = [
    Scenario("create_volume", lambda e, t: None, lambda e, t: e.create_volume(f"v-{t}", MiB, deadline=dl())),
    Scenario(
        "create_snapshot",
        _prep_base,
        lambda e, t: e.create_snapshot(f"s-{t}", "base", deadline=dl()),
    ),
    Scenario(
        "create_snapshot_of_active",
        lambda e, t: None,  # of the mounted witness "base-active"
        lambda e, t: e.create_snapshot(f"sa-{t}", "base-active", deadline=dl()),
        freezes=True,
    ),
    Scenario(
        "restore_larger",
        _prep_base,
        lambda e, t: e.clone(f"r-{t}", "base-snap", 4 * MiB, deadline=dl()),
    ),
    Scenario(
        "clone_of_volume",
        _prep_base,
        lambda e, t: e.clone(f"cv-{t}", "base", 2 * MiB, deadline=dl()),
    ),
    Scenario(
        "clone_of_active",
        lambda e, t: None,
        lambda e, t: e.clone(f"ca-{t}", "base-active", 8 * MiB, deadline=dl()),
        freezes=True,
    ),
    Scenario(
        "delete",
        lambda e, t: _ensure_volume(e, f"d-{t}"),
        lambda e, t: e.delete(f"d-{t}", deadline=dl()),
        may_vanish=lambda t: frozenset({f"d-{t}"}),
    ),
    Scenario(
        "delete_snapshot",
        _prep_snapshot,
        lambda e, t: e.delete(f"ds-{t}", deadline=dl()),
        may_vanish=lambda t: frozenset({f"ds-{t}"}),
    ),
    Scenario(
        "grow_active",
        lambda e, t: _ensure_volume(e, f"g-{t}", active=True),
        lambda e, t: e.grow(f"g-{t}", 4 * MiB, deadline=dl()),
    ),
    Scenario(
        "grow_inactive",
        lambda e, t: _ensure_volume(e, f"gi-{t}"),
        lambda e, t: e.grow(f"gi-{t}", 4 * MiB, deadline=dl()),
    ),
    Scenario(
        "activate",
        lambda e, t: _ensure_volume(e, f"a-{t}"),
        lambda e, t: e.activate(f"a-{t}", deadline=dl()),
    ),
    Scenario(
        "deactivate",
        lambda e, t: _ensure_volume(e, f"da-{t}", active=True),
        lambda e, t: e.deactivate(f"da-{t}", deadline=dl()),
    ),
    Scenario("gc_orphans", _prep_orphan, lambda e, t: e.gc_orphans(deadline=dl()), orphan=True),
    Scenario(
        "create_group_snapshot",
        _prep_base,  # of the mounted witness "base-active" (held) and the inactive "base" (not held)
        lambda e, t: e.create_group_snapshot(
            f"grp-{t}", [(f"gm1-{t}", "base-active"), (f"gm2-{t}", "base")], deadline=dl()
        ),
        freezes=True,
    ),
    Scenario("layer_prepare", lambda e, t: None, lambda e, t: _prepare_layer(e, f"default/{t}/extract")),
    Scenario(
        "layer_snap", _prep_layer_base, lambda e, t: _prepare_layer(e, f"default/{t}/c", parent=LAYER_BASE)
    ),
    Scenario(
        "layer_view",
        _prep_layer_base,
        lambda e, t: _prepare_layer(e, f"default/{t}/v", parent=LAYER_BASE, kind=model.LayerKind.VIEW),
    ),
    Scenario("layer_commit", _prep_layer_active, _run_layer_commit),
    Scenario(
        "layer_remove_active",
        _prep_layer_active,
        lambda e, t: _run_layer_remove(e, f"default/{t}/la"),
        may_vanish=_layer_device,
    ),
    Scenario(
        "layer_remove_committed",
        _prep_layer_committed,
        lambda e, t: _run_layer_remove(e, f"sha256:{t}"),
        may_vanish=_layer_device,
    ),
    Scenario(
        "layer_cleanup",
        _prep_layer_forgotten,
        lambda e, t: _layers(e).cleanup(discard=layer_discard, deadline=dl()),
        may_vanish=_layer_device,
    ),
]


#: what the fault runs keep between scenarios (everything else a run made is deleted after it)
_KEPT = frozenset({"keep", "base-active", "base", "base-snap"})
_KEPT_LAYERS = frozenset({LAYER_BASE})


class InjectedFault(Exception):
    pass


@contextlib.contextmanager
def hooked(hook: Callable[[str], None] | None) -> Iterator[None]:
    faults.hook = hook
    try:
        yield
    finally:
        faults.hook = None


class Injector:
    """A fault hook. Counts the points reached (`seen`); at the call indexes in `plan` it fails the
    step (raises InjectedFault) or SIGKILLs the process (after writing the point to `pipe`); with
    `fail_first`, it also fails the first point the predicate accepts, once."""

    def __init__(
        self,
        plan: dict[int, str] | None = None,
        *,
        fail_first: Callable[[str], bool] | None = None,
        kill_name: str | None = None,
    ) -> None:
        self.plan = plan or {}
        self.fail_first = fail_first
        self.kill_name = kill_name
        self.pipe: int | None = None
        self.seen: list[str] = []
        self.failed: list[str] = []

    def __call__(self, point: str) -> None:
        i = len(self.seen)
        self.seen.append(point)
        action = self.plan.get(i)
        if action is None and point == self.kill_name:
            action = "kill"
        if action is None and self.fail_first is not None and self.fail_first(point):
            self.fail_first = None
            action = "fail"
        if action == "kill":
            if self.pipe is not None:
                os.write(self.pipe, point.encode() + b"\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if action is not None:
            self.failed.append(point)
            raise InjectedFault(point)


def in_child(
    harness: Harness,
    injector: Injector,
    body: Callable[[engine_mod.PoolEngine], object],
    *,
    reopen: bool = False,
) -> str | None:
    """Fork a child that opens its own engine (`reopen`: assembling and recovering, as at start-up)
    and runs `body` under `injector`; return the point it was SIGKILLed at, None if it ran out."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            os.close(r)
            injector.pipe = w
            faults.hook = injector
            body(harness.open(assemble=reopen, recover=reopen))
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        said = f.read().strip()
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL and said, (status, said)
        return said
    assert os.WEXITSTATUS(status) in (2, 3), status
    return None


def record_points(harness: Harness, witnesses: Witnesses) -> dict[str, list[str]]:
    """Run every mutation once with a recording hook: the points it passes, in order."""
    points: dict[str, list[str]] = {}
    e = harness.open()
    witnesses.ensure(e)
    for sc in SCENARIOS:
        sc.prep(e, "rec")
        seen: list[str] = []
        with hooked(seen.append):
            sc.run(e, "rec")
        assert seen, sc.name
        points[sc.name] = seen
    harness.close(e)
    return points


def _allowed_orphans(e: engine_mod.PoolEngine, sc: Scenario) -> frozenset[int]:
    return frozenset(e.orphans()) if sc.orphan else frozenset()


@dataclasses.dataclass
class _Coverage:
    declared: frozenset[str]
    killed: set[str] = dataclasses.field(default_factory=set)
    failed: set[str] = dataclasses.field(default_factory=set)
    kills: int = 0
    fails: int = 0
    #: points already faulted in an undo, and in a start-up recovery (each is faulted there once)
    undo_killed: set[str] = dataclasses.field(default_factory=set)
    undo_failed: set[str] = dataclasses.field(default_factory=set)
    recovery_failed: set[str] = dataclasses.field(default_factory=set)
    #: a point reached in recovery, not killed yet -> (scenario, the child plan whose recovery reached it)
    to_kill_in_recovery: dict[str, tuple[Scenario, dict[int, str]]] = dataclasses.field(default_factory=dict)

    def note_kill(self, point: str) -> None:
        self.killed.add(point)
        self.kills += 1

    def note_fails(self, points: list[str]) -> None:
        self.failed.update(points)
        self.fails += len(points)


class _FaultRun:
    """The state of one fault-injection run over every scenario on one pool."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.w = Witnesses(harness)
        self.cov = _Coverage(faults.for_backend(harness.make_backend().kind))
        self.e: engine_mod.PoolEngine | None = None
        self.n = 0

    def engine(self) -> engine_mod.PoolEngine:
        if self.e is None:
            self.e = self.h.open()
        return self.e

    def close(self) -> None:
        if self.e is not None:
            self.h.close(self.e)
            self.e = None

    def prep(self, sc: Scenario) -> tuple[str, dict[str, int], frozenset[int]]:
        self.n += 1
        tag = f"{sc.name[:3]}{self.n}"
        e = self.engine()
        self.w.ensure(e)
        sc.prep(e, tag)
        return tag, committed(e), _allowed_orphans(e, sc)

    def check_and_retry(
        self,
        sc: Scenario,
        tag: str,
        before: dict[str, int],
        orphans: frozenset[int],
        *,
        checked: bool = False,
    ) -> None:
        e = self.engine()
        if not checked:
            self.check(sc, tag, before, orphans)
        sc.run(e, tag)  # whatever the fault left, the mutation can be retried to completion
        # (the pool's ids are compared with the records by the next fault's check, and at the end)
        assert e.intents() == [] and e.store.transaction_id() == e.backend.transaction_id(deadline=dl())
        for d in e.list():  # loop devices are the whole machine's: hold few
            if d.active and d.name not in _KEPT:
                e.deactivate(d.name, deadline=dl())

    def tidy(self) -> None:
        """Delete what the runs made (every check reads the whole pool: keep it small)."""
        e = self.engine()
        lay = _layers(e)
        while left := [x for x in lay.list() if x.key not in _KEPT_LAYERS]:
            parents = {x.parent for x in lay.list()}
            for x in left:
                if x.key not in parents:  # leaves first
                    lay.remove(x.key, deferred=False, discard=None, deadline=dl())
        kept = _KEPT | {x.device for x in lay.list()}
        for d in e.list():
            if d.name not in kept:
                if d.active:  # a forgotten snapshot's device (async remove) may be active
                    e.deactivate(d.name, deadline=dl())
                e.delete(d.name, deadline=dl())

    def check(self, sc: Scenario, tag: str, before: dict[str, int], orphans: frozenset[int]) -> None:
        vanish = sc.may_vanish(tag)
        e = self.engine()
        check_after_fault(
            self.h,
            e,
            self.w,
            before=before,
            may_vanish=vanish,
            allowed_orphans=orphans,
            may_freeze=sc.freezes,
        )

    def recover(self, sc: Scenario, plan: dict[int, str] | None) -> None:
        """Start-up after a crash (assemble + recovery), failing each of its points once per scenario
        (then starting up again); remember the points it reached for a later kill there."""
        assert self.e is None
        while True:
            inj = Injector(fail_first=lambda p: p not in self.cov.recovery_failed)
            try:
                with hooked(inj):
                    self.e = self.h.open()
            except InjectedFault:
                pass
            self.cov.note_fails(inj.failed)
            self.cov.recovery_failed.update(inj.failed)
            if plan is not None:
                for p in inj.seen:
                    if p not in self.cov.killed:
                        self.cov.to_kill_in_recovery.setdefault(p, (sc, plan))
            if self.e is not None:
                return

    def resolve_in_process(self, sc: Scenario) -> None:
        """After an in-process failure: recovery resolves whatever an undo left open, failing each of
        its points once per scenario on the way."""
        e = self.engine()
        while True:
            inj = Injector(fail_first=lambda p: p not in self.cov.recovery_failed)
            try:
                with hooked(inj):
                    e.recover(deadline=dl())
            except InjectedFault:
                pass
            self.cov.note_fails(inj.failed)
            self.cov.recovery_failed.update(inj.failed)
            if not inj.failed:
                return

    def fail(self, sc: Scenario, plan: dict[int, str]) -> list[str]:
        """Run the mutation in-process, failing at the plan's points; return the points reached
        after the first fault (its undo)."""
        tag, before, orphans = self.prep(sc)
        inj = Injector(plan)
        with hooked(inj), contextlib.suppress(InjectedFault, errors.CsiThinError):
            sc.run(self.engine(), tag)
        assert len(inj.failed) == len(plan), (sc.name, plan, inj.seen)
        self.cov.note_fails(inj.failed)
        after = inj.seen[min(plan) + 1 :]
        if len(plan) == 1:  # a single fault: the undo ran in-process, consistent without recovery
            self.check(sc, tag, before, orphans)
        else:  # a failed undo left its intent open: recovery (or the next call) resolves it
            self.resolve_in_process(sc)
        self.check_and_retry(sc, tag, before, orphans, checked=len(plan) == 1)
        return after

    def kill(self, sc: Scenario, plan: dict[int, str], expect: str | None = None) -> str:
        """Run the mutation in a child killed by the plan; start up again (recovery) and check."""
        tag, before, orphans = self.prep(sc)
        self.close()
        inj = Injector(plan)
        killed = in_child(self.h, inj, lambda child: sc.run(child, tag))
        assert killed is not None and killed == (expect or killed), (sc.name, plan, killed, expect)
        self.cov.note_kill(killed)
        self.recover(sc, plan)
        self.check_and_retry(sc, tag, before, orphans)
        return killed

    def kill_in_recovery(self, point: str) -> None:
        """Crash the plan's mutation again, then kill the start-up after it at `point`."""
        sc, plan = self.cov.to_kill_in_recovery[point]
        tag, before, orphans = self.prep(sc)
        self.close()
        assert in_child(self.h, Injector(plan), lambda child: sc.run(child, tag)) is not None
        killed = in_child(self.h, Injector(kill_name=point), lambda child: None, reopen=True)
        assert killed == point, (sc.name, plan, point, killed)
        self.cov.note_kill(killed)
        self.recover(sc, None)
        self.check_and_retry(sc, tag, before, orphans)


@pytest.mark.timeout(1800)  # some 250 faults; minutes under software emulation on a loaded machine
def test_fault_at_every_point(harness: Harness) -> None:
    """Every point declared in csi_thin.pool.faults for this backend is SIGKILLed at least once and
    failed (one step raising) at least once: on the main path of every mutation (each point of it,
    each way), during every undo (a failure first, then the kill or a failing undo), and during the
    start-up recovery after a crash. After each: the pool and LMDB agree, the kernel holds no
    leftover, records carry the kernel's sizes, the witness volumes hold their bytes, and the
    mutation can be retried."""
    run = _FaultRun(harness)
    points = record_points(harness, run.w)
    cov = run.cov
    for sc in SCENARIOS:
        for k, point in enumerate(points[sc.name]):
            undo = run.fail(sc, {k: "fail"})
            for j, u in enumerate(undo):
                if u not in cov.undo_failed:
                    cov.undo_failed.add(u)
                    run.fail(sc, {k: "fail", k + 1 + j: "fail"})
            run.close()
            run.kill(sc, {k: "kill"}, expect=point)
            for j, u in enumerate(undo):
                if u not in cov.undo_killed:
                    cov.undo_killed.add(u)
                    run.kill(sc, {k: "fail", k + 1 + j: "kill"}, expect=u)
            run.close()
        run.w.check(run.engine(), full=True)
        run.tidy()
    for point in sorted(cov.to_kill_in_recovery):
        if point not in cov.killed:
            run.kill_in_recovery(point)
    e = run.engine()
    check_consistent(e, before=committed(e), allowed_orphans=frozenset(e.orphans()))
    run.close()
    label = f"{harness.label}: fault injection: {len(cov.declared)} declared points"
    assert cov.declared - cov.killed == set(), (
        f"{label}: never SIGKILLed: {sorted(cov.declared - cov.killed)}"
    )
    assert cov.declared - cov.failed == set(), f"{label}: never failed: {sorted(cov.declared - cov.failed)}"
    assert cov.killed | cov.failed <= cov.declared
    conftest.report(
        f"{label}, every one SIGKILLed and failed once: {cov.kills} kills, {cov.fails} failed steps, "
        f"{len(SCENARIOS)} mutations: consistent, no kernel leftovers, witnesses intact"
    )


def _fail_at(*points: str) -> Callable[[str], None]:
    def hook(p: str) -> None:
        if p in points:
            raise InjectedFault(p)

    return hook


def test_failed_undo_is_resolved_by_the_next_call(harness: Harness) -> None:
    """A step fails AND its undo fails: the intent stays open, the record keeps its "-ing" state,
    and the next call on the name (or any fenced call) resolves it from the pool's evidence."""
    e = harness.open()
    with (
        hooked(_fail_at("create_volume/fence:done", "create_volume/undo:fence:done")),
        pytest.raises(InjectedFault) as exc,
    ):
        e.create_volume("x", MiB, deadline=dl())
    assert any("undo" in n for n in exc.value.__notes__)
    stale = e.get("x")
    assert stale is not None and stale.state == model.DeviceState.CREATING and e.intents()
    assert stale.dev_id in e.backend.device_ids(deadline=dl())
    with pytest.raises(errors.NotFound):
        e.activate("x", deadline=dl())  # resolves the stale create (rolled back): x does not exist
    assert e.intents() == [] and stale.dev_id not in e.backend.device_ids(deadline=dl())
    x = e.create_volume("x", MiB, deadline=dl())
    assert x.state == model.DeviceState.READY
    check_consistent(e, before=committed(e))

    # a stale fenced intent on one name is resolved by a fenced call on another
    with (
        hooked(_fail_at("create_volume/fence:done", "create_volume/undo:fence:done")),
        pytest.raises(InjectedFault),
    ):
        e.create_volume("x2", MiB, deadline=dl())
    e.create_volume("y", MiB, deadline=dl())
    assert e.get("x2") is None
    check_consistent(e, before=committed(e))

    # delete: the step never ran, the (no-op) undo "failed": the record stays DELETING until the next call
    with hooked(_fail_at("delete/delete", "delete/undo:delete")), pytest.raises(InjectedFault):
        e.delete("y", deadline=dl())
    got = e.get("y")
    assert got is not None and got.state == model.DeviceState.DELETING
    e.delete("y", deadline=dl())
    assert e.get("y") is None
    check_consistent(e, before=committed(e))

    # grow: resized in the kernel, then the failure and a failed undo: the next call rolls forward
    e.activate("x", deadline=dl())
    with hooked(_fail_at("grow/grow:done", "grow/undo:grow")), pytest.raises(InjectedFault):
        e.grow("x", 3 * MiB, deadline=dl())
    assert e.intents()
    assert e.grow("x", 3 * MiB, deadline=dl()).size_bytes == 3 * MiB
    check_consistent(e, before=committed(e))


def test_kill_during_recovery_is_rerunnable(harness: Harness) -> None:
    """Crash a create after its kernel step, then crash recovery itself at each of its boundaries."""
    for stop in ("create_volume/create_thin:done", "create_volume/fence:done"):
        e = harness.open()
        _prep_base(e, "x")
        e.delete("d-x", deadline=dl())
        before = committed(e)
        harness.close(e)
        for kill_recovery_at in ("recover/create_volume/delete", "recover/create_volume/delete:done", None):
            name = f"rr-{stop.split('/')[1].split(':')[0]}-{kill_recovery_at}".replace("/", "_")
            for point, phase in ((stop, "run"), (kill_recovery_at, "recover")):
                if point is None:
                    continue
                pid = os.fork()
                if pid == 0:
                    code = 3
                    try:
                        child = harness.open(assemble=False, recover=False)

                        def kill_at(p: str, point: str = point) -> None:
                            if p == point:
                                os.kill(os.getpid(), signal.SIGKILL)

                        faults.hook = kill_at
                        if phase == "run":
                            child.create_volume(name, MiB, deadline=dl())
                        else:
                            child.recover(deadline=dl())
                    except BaseException:
                        code = 2
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                # recovery of a fenced create rolls forward and never reaches its delete points
                assert os.WIFSIGNALED(status) or (phase == "recover" and os.WEXITSTATUS(status) == 3)
            e = harness.open()
            check_consistent(e, before=before)
            harness.close(e)


def test_source_claimed_during_snapshot(harness: Harness) -> None:
    e = harness.open()
    e.create_volume("src", MiB, deadline=dl())
    seen: list[BaseException] = []

    def during(p: str) -> None:
        if p == "create_snapshot/create_snap":
            for call in (
                lambda: e.delete("src", deadline=dl()),
                lambda: e.grow("src", 2 * MiB, deadline=dl()),
                lambda: e.deactivate("src", deadline=dl()),
                lambda: e.create_snapshot("snap", "src", deadline=dl()),
            ):
                try:
                    call()
                except errors.OperationPending as exc:
                    seen.append(exc)

    with hooked(during):
        e.create_snapshot("snap", "src", deadline=dl())
    assert len(seen) == 4
    check_consistent(e, before=committed(e))


def _threads(n: int, fn: Callable[[int], object]) -> list[object]:
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_creates_of_one_name(harness: Harness) -> None:
    e = harness.open()
    results = _threads(50, lambda i: e.create_volume("same", 2 * MiB, deadline=dl()))
    devices = [r for r in results if isinstance(r, model.Device)]
    pending = [r for r in results if isinstance(r, errors.OperationPending)]
    other = [r for r in results if not isinstance(r, model.Device | errors.OperationPending)]
    assert not other, other
    assert devices and all(d == devices[0] for d in devices)
    assert [d.name for d in e.list()] == ["same"]
    assert e.store.transaction_id() == 1
    conftest.report(
        f"{harness.label}: concurrency: 50 creates of one name -> 1 device; "
        f"{len(devices)} got it, {len(pending)} ABORTED"
    )
    check_consistent(e, before=committed(e))


def test_concurrent_creates_of_different_names(harness: Harness) -> None:
    e = harness.open()
    results = _threads(50, lambda i: e.create_volume(f"vol-{i}", MiB, deadline=dl()))
    errs = [r for r in results if not isinstance(r, model.Device)]
    assert not errs, errs[:3]
    devs = e.list()
    assert len(devs) == 50 and len({d.dev_id for d in devs}) == 50
    assert e.store.transaction_id() == 50 == e.backend.transaction_id(deadline=dl())
    results = _threads(50, lambda i: e.delete(f"vol-{i}", deadline=dl()))
    assert all(r is None for r in results), [r for r in results if r is not None][:3]
    conftest.report(f"{harness.label}: concurrency: 50 names in parallel -> 50 devices, 50 deletes -> 0")
    check_consistent(e, before={})
    assert e.list() == [] and e.backend.device_ids(deadline=dl()) == {}


# ---- containerd snapshots (csi_thin.pool.layers) ---------------------------------------------------


def test_layers_follow_containerd_and_commit_deactivates(harness: Harness) -> None:
    """Prepare/View/Commit/Remove on the engine: a committed layer's device is inactive and is the
    (inactive) origin of its children; only leaves are removed; a key or name is never taken twice;
    a stale Prepare (its undo failed too) is undone by the next call on the key; the layers count
    in the provisioned bytes, so GetCapacity and the thresholds see them."""
    e = harness.open()
    lay = _layers(e)
    _prepare_layer(e, "extract-1")
    assert e.provisioned_bytes() == 4 * MiB
    active = lay.require("extract-1")
    assert lay.device(active).active
    lay.commit("sha256:1", "extract-1", labels={"c": "1"}, deadline=dl())
    done = lay.require("sha256:1")
    assert lay.get("extract-1") is None and done.labels == (("c", "1"),) and not lay.device(done).active
    _prepare_layer(e, "ctr", parent="sha256:1")
    _prepare_layer(e, "view", parent="sha256:1", kind=model.LayerKind.VIEW)
    assert lay.device(lay.require("ctr")).origin == done.device
    with pytest.raises(errors.AlreadyExists):
        _layers(e).prepare(
            "ctr",
            parent="",
            kind=model.LayerKind.ACTIVE,
            labels={},
            size_bytes=MiB,
            fmt=layer_fmt,
            attributes={},
            deadline=dl(),
        )
    with pytest.raises(errors.AlreadyExists):
        lay.commit("sha256:1", "ctr", labels={}, deadline=dl())
    with pytest.raises(errors.FailedPrecondition):
        lay.commit("sha256:v", "view", labels={}, deadline=dl())
    with pytest.raises(errors.InvalidArgument):
        _prepare_layer(e, "on-active", parent="ctr")
    with pytest.raises(errors.NotFound):
        _prepare_layer(e, "orphan", parent="sha256:none")
    with pytest.raises(errors.FailedPrecondition):
        lay.remove("sha256:1", deferred=False, discard=None, deadline=dl())
    check_consistent(e, before=committed(e))

    # a Prepare whose step and undo both failed: pending until the next call on the key undoes it
    with (
        hooked(_fail_at("layer_snap/activate:done", "layer_snap/undo:activate")),
        pytest.raises(InjectedFault),
    ):
        _prepare_layer(e, "stale", parent="sha256:1")
    pending = e.store.layer("stale")
    assert pending is not None and pending.pending == model.LayerPending.PREPARE and e.intents()
    assert lay.get("stale") is None and "stale" not in {x.key for x in lay.list()}
    _prepare_layer(e, "stale", parent="sha256:1")
    assert lay.require("stale").pending == model.LayerPending.NONE and e.intents() == []
    check_consistent(e, before=committed(e))

    for key in ("stale", "view", "ctr", "sha256:1"):
        lay.remove(key, deferred=False, discard=layer_discard, deadline=dl())
    assert e.list() == [] and e.store.layers() == []
    check_consistent(e, before={})


def test_layer_mounts_never_activates_a_committed_layer(harness: Harness) -> None:
    """Mounts of an inactive active snapshot (after a node restart) activates its device; a Commit
    of the same key must not run between Mounts' check of the kind and that activation, else the
    committed layer's device is left active (the seed's bug). The Commit is run exactly there."""
    e = harness.open()
    lay = _layers(e)
    sn = service.Snapshotter(e, config.SnapshotterConfig())
    _prepare_layer(e, "extract-m")
    e.deactivate(lay.require("extract-m").device, deadline=dl())  # as after a node restart
    real_activate = e.activate
    outcome: list[str] = []

    def activate(name: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        if not outcome:
            try:
                lay.commit("sha256:m", "extract-m", labels={}, deadline=dl())
                outcome.append("committed")
            except errors.OperationPending:
                outcome.append("refused")
        return real_activate(name, deadline=deadline)

    e.activate = activate  # type: ignore[method-assign]
    try:
        mounts = sn.mounts("extract-m", deadline=dl())
    finally:
        del e.activate
    assert outcome == ["refused"], outcome  # the Commit waits for Mounts (containerd retries it)
    assert mounts and lay.device(lay.require("extract-m")).active
    check_consistent(e, before=committed(e))
    lay.commit("sha256:m", "extract-m", labels={}, deadline=dl())
    assert not lay.device(lay.require("sha256:m")).active
    lay.remove("sha256:m", deferred=False, discard=None, deadline=dl())
    check_consistent(e, before={})


def test_layer_commit_left_open_is_resolved_before_the_key_is_used(harness: Harness) -> None:
    """A Commit whose deactivate and undo both failed stays open (recovery finishes it: the key
    becomes the committed name). The next call on the key must resolve it first: a second Commit
    of the key under another name would give one device two committed snapshots (removing one
    deletes the other's data), and a Mounts would activate the committed layer's device."""
    e = harness.open()
    lay = _layers(e)
    _prepare_layer(e, "extract-o")
    with (
        hooked(_fail_at("layer_commit/deactivate:done", "layer_commit/undo:deactivate")),
        pytest.raises(InjectedFault),
    ):
        lay.commit("sha256:o1", "extract-o", labels={}, deadline=dl())
    assert e.intents()
    with pytest.raises(errors.NotFound):  # the open commit went forward: the key is committed now
        lay.commit("sha256:o2", "extract-o", labels={}, deadline=dl())
    assert lay.get("sha256:o2") is None and lay.get("extract-o") is None
    assert not lay.device(lay.require("sha256:o1")).active
    check_consistent(e, before=committed(e))
    lay.remove("sha256:o1", deferred=False, discard=None, deadline=dl())
    check_consistent(e, before={})


def test_layer_prepares_on_one_parent_run_together_and_hold_off_its_remove(harness: Harness) -> None:
    """Two containers of one image start at once: two Prepares with the same committed parent. Both
    must succeed (containerd does not retry ABORTED); a Remove of the parent meanwhile must not
    (the child it would orphan is not recorded yet). The second Prepare and the Remove run while
    the first holds its claims, before its transaction."""
    e = harness.open()
    lay = _layers(e)
    _prepare_layer(e, "extract-p")
    lay.commit("sha256:p", "extract-p", labels={}, deadline=dl())
    real_parent_device = lay._parent_device
    seen: list[str] = []

    def parent_device(parent: str) -> model.Device:
        if not seen:
            seen.append("inside")
            _layers(e).prepare(
                "ctr-2",
                parent="sha256:p",
                kind=model.LayerKind.ACTIVE,
                labels={},
                size_bytes=4 * MiB,
                fmt=layer_fmt,
                attributes={},
                deadline=dl(),
            )
            seen.append("second prepared")
            with pytest.raises(errors.OperationPending):
                _layers(e).remove("sha256:p", deferred=False, discard=None, deadline=dl())
            with pytest.raises(errors.OperationPending):
                _layers(e).remove("sha256:p", deferred=True, discard=None, deadline=dl())
        return real_parent_device(parent)

    lay._parent_device = parent_device  # type: ignore[method-assign]
    lay.prepare(
        "ctr-1",
        parent="sha256:p",
        kind=model.LayerKind.ACTIVE,
        labels={},
        size_bytes=4 * MiB,
        fmt=layer_fmt,
        attributes={},
        deadline=dl(),
    )
    assert seen == ["inside", "second prepared"]
    assert {x.key for x in lay.list()} == {"sha256:p", "ctr-1", "ctr-2"}
    check_consistent(e, before=committed(e))
    with pytest.raises(errors.FailedPrecondition):  # now the children are there to see
        _layers(e).remove("sha256:p", deferred=False, discard=None, deadline=dl())
    for key in ("ctr-1", "ctr-2", "sha256:p"):
        _layers(e).remove(key, deferred=False, discard=None, deadline=dl())
    check_consistent(e, before={})


def test_committed_layers_take_no_thin_headroom(harness: Harness) -> None:
    """GetCapacity's thin headroom and the overprovision check count what writable devices may
    grow to. A committed layer is read-only for good (inactive; its mapped blocks are in the pool's
    data used already), like a CSI snapshot: counting each at the full base_image_size (10GiB) would
    refuse new volumes on a node holding a few hundred image layers. Active snapshots and views of
    it count (each may be written up to its size), also after a committed parent's recovery."""
    e = harness.open()
    lay = _layers(e)
    _prepare_layer(e, "extract-h")
    assert provisioner._provisioned(e) == 4 * MiB
    lay.commit("sha256:h", "extract-h", labels={}, deadline=dl())
    assert provisioner._provisioned(e) == 0
    _prepare_layer(e, "ctr-h", parent="sha256:h")
    assert provisioner._provisioned(e) == 4 * MiB
    lay.commit("sha256:h2", "ctr-h", labels={}, deadline=dl())
    _prepare_layer(e, "view-h", parent="sha256:h2", kind=model.LayerKind.VIEW)
    assert provisioner._provisioned(e) == 4 * MiB
    # a commit finished by recovery (its undo failed) marks the device the same way
    _prepare_layer(e, "extract-h3")
    with (
        hooked(_fail_at("layer_commit/deactivate:done", "layer_commit/undo:deactivate")),
        pytest.raises(InjectedFault),
    ):
        lay.commit("sha256:h3", "extract-h3", labels={}, deadline=dl())
    harness.close(e)
    e = harness.open()  # recovery finishes the commit
    assert _layers(e).get("sha256:h3") is not None
    assert provisioner._provisioned(e) == 4 * MiB
    check_consistent(e, before=committed(e))
    for key in ("view-h", "sha256:h2", "sha256:h", "sha256:h3"):
        _layers(e).remove(key, deferred=False, discard=None, deadline=dl())
    check_consistent(e, before={})


def test_layer_remove_is_not_held_off_by_a_stale_child(harness: Harness) -> None:
    """A child's Prepare failed and so did its undo: its pending record names the parent until a
    fenced call resolves it. A Remove of the parent (the child never existed for containerd) must
    resolve it, not answer FailedPrecondition; with async_remove no Remove is ever fenced, so the
    parent could not be removed at all until a restart."""
    e = harness.open()
    lay = _layers(e)
    _prepare_layer(e, "extract-s")
    lay.commit("sha256:s", "extract-s", labels={}, deadline=dl())
    with (
        hooked(_fail_at("layer_snap/activate:done", "layer_snap/undo:activate")),
        pytest.raises(InjectedFault),
    ):
        _prepare_layer(e, "ctr-s", parent="sha256:s")
    assert e.intents() and lay.get("ctr-s") is None
    lay.remove("sha256:s", deferred=True, discard=None, deadline=dl())
    assert lay.list() == [] and e.store.layers() == [] and e.intents() == []
    assert lay.cleanup(discard=None, deadline=dl())
    check_consistent(e, before={})
