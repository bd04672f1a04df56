"""The backend-neutral engine suite against FakeBackend (a faithful in-memory dm-thin, file-backed so
that forked children and "reboots" see the same pool)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import engine as engine_mod
from tests import enginesuite, fakes
from tests.enginesuite import *  # noqa: F403 - the suite's tests run here
from tests.enginesuite import (
    test_pool_exhausted_and_unhealthy,  # noqa: F401 - fake backends only
    test_pool_modes_follow_the_table,  # noqa: F401 - fake backends only
    test_restart_on_a_read_only_pool,  # noqa: F401 - fake backends only
)


class FakeHarness(enginesuite.Harness):
    has_block_devices = False
    label = "fake backend"

    def make_backend(self) -> backend_mod.Backend:
        return fakes.FakeBackend(os.path.join(self.state_dir, "fake-pool.json"), block_size=self.block_size)

    def kernel_sizes(self, engine: engine_mod.PoolEngine) -> dict[int, int]:
        assert isinstance(engine.backend, fakes.FakeBackend)
        sizes = {
            i: engine.backend.active_size(i) for i in engine.backend.active_ids(deadline=enginesuite.dl())
        }
        return {i: size for i, size in sizes.items() if size is not None}

    def leftovers(self, engine: engine_mod.PoolEngine) -> list[str]:
        # the fake's only kernel state beyond devices and active sizes: what a group snapshot holds
        assert isinstance(engine.backend, fakes.FakeBackend)
        return [f"device {i} held (suspended)" for i in engine.backend.held()]

    def set_condition(self, engine: engine_mod.PoolEngine, **fields: Any) -> None:
        assert isinstance(engine.backend, fakes.FakeBackend)
        engine.backend.set_condition(**fields)


@pytest.fixture
def harness(tmp_path: pathlib.Path) -> Iterator[enginesuite.Harness]:
    h = FakeHarness(str(tmp_path))
    yield h
    h.shutdown()


def test_grow_below_what_the_kernel_already_has_finishes_without_shrinking(
    harness: enginesuite.Harness,
) -> None:
    """The grow undo rolls forward when the kernel is larger than the record; recovery's grow then
    resizes to the intent's size. Where the kernel is larger than that too (a record that lags the
    kernel), that resize is a shrink, which every backend refuses: the grow must finish (the device
    already has the room), not stay open and fail every later call and every start-up."""
    e = harness.open()
    assert isinstance(e.backend, fakes.FakeBackend)
    dev = e.create_volume("vol", 4 * enginesuite.MiB, deadline=enginesuite.dl())
    e.activate("vol", deadline=enginesuite.dl())
    # the kernel holds 16 MiB, the record says 4 MiB
    e.backend.resize(dev.dev_id, 16 * enginesuite.MiB, deadline=enginesuite.dl())
    grown = e.grow("vol", 8 * enginesuite.MiB, deadline=enginesuite.dl())
    assert grown.size_bytes == 8 * enginesuite.MiB
    assert e.backend.active_size(dev.dev_id) == 16 * enginesuite.MiB  # never shrunk
    assert e.store.intents() == []
    e = harness.reboot(e)  # and a start-up has nothing left to trip on
    after = e.store.get("vol")
    assert after is not None and after.size_bytes == 8 * enginesuite.MiB


def test_changed_block_reads_hold_no_claim_and_notice_a_delete_meanwhile(
    harness: enginesuite.Harness,
) -> None:
    """The engine's changed-block reads take no claim and no pool lock: a delete of the very snapshot
    runs while the backend reads it (and succeeds), and the read then answers NotFound rather than
    ranges of a device that is gone (or whose id a new device may reuse)."""
    e = harness.open()
    dl = enginesuite.dl
    e.create_volume("vol", 4 * enginesuite.MiB, deadline=dl())
    e.create_volume("other", 4 * enginesuite.MiB, deadline=dl())
    e.create_snapshot("s1", "vol", deadline=dl())
    e.create_snapshot("s2", "vol", deadline=dl())
    e.create_snapshot("o1", "other", deadline=dl())
    calls: list[tuple[int, ...]] = []

    def allocated(
        dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        calls.append((dev_id,))
        return (model.Extent(0, 4096), model.Extent(1 * enginesuite.MiB, 4096))

    def delta_deleting(
        base_id: int, target_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        calls.append((base_id, target_id))
        e.delete("s2", deadline=dl())  # no claim of the reader's is in the way
        return (model.Extent(0, 4096),)

    e.backend.allocated = allocated  # type: ignore[method-assign]
    e.backend.delta = delta_deleting  # type: ignore[method-assign]
    got = e.allocated("s1", starting_offset=4096, deadline=dl())
    assert got == model.BlockMap(4 * enginesuite.MiB, (model.Extent(1 * enginesuite.MiB, 4096),))
    with pytest.raises(errors.NotFound, match="deleted while its blocks were read"):
        e.delta("s1", "s2", starting_offset=0, deadline=dl())
    assert e.get("s2") is None
    # refused before the backend is asked: not a snapshot, another volume's, offset out of range
    n = len(calls)
    with pytest.raises(errors.NotFound):
        e.allocated("vol", starting_offset=0, deadline=dl())
    with pytest.raises(errors.InvalidArgument, match="same volume"):
        e.delta("s1", "o1", starting_offset=0, deadline=dl())
    with pytest.raises(errors.OutOfRange):
        e.allocated("s1", starting_offset=4 * enginesuite.MiB + 1, deadline=dl())
    assert len(calls) == n


def test_an_origin_a_failed_hold_left_held_is_let_go_by_the_undo(
    harness: enginesuite.Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's hold fails, and letting go fails too for one origin (HoldLeft: a resume or a thaw
    that failed). The undo must try that origin again before it closes the group as undone: closed,
    nothing in the journal says the origin is held, and every writer on it hangs until a restart."""
    e = harness.open()
    for name in ("a", "b"):
        e.create_volume(name, 2 * model.MiB, deadline=enginesuite.dl())
        e.activate(name, deadline=enginesuite.dl())
    before = enginesuite.committed(e)
    backend = e.backend
    assert isinstance(backend, fakes.FakeBackend)
    quiesce = backend.quiesce

    def half_let_go(origin_ids: list[int], *, deadline: deadline_mod.Deadline) -> None:
        quiesce(origin_ids, deadline=deadline)
        backend.release(origin_ids[:1], deadline=deadline)  # the first resumed, the second not
        raise backend_mod.HoldLeft("injected", origin_ids=origin_ids[1:])

    monkeypatch.setattr(backend, "quiesce", half_let_go)
    with pytest.raises(backend_mod.HoldLeft):
        e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=enginesuite.dl())
    assert backend.held() == [], "an origin stays held after the group was undone"
    assert e.intents() == [] and e.get_group("g") == []
    enginesuite.check_consistent(e, before=before)


def test_a_group_with_a_member_in_use_is_not_deleted_in_part(harness: enginesuite.Harness) -> None:
    """DeleteVolumeGroupSnapshot of a group one of whose members is active (in use: FAILED_PRECONDITION,
    the spec's "Volume group snapshot in use") refuses the group whole: deleting the members before
    it one by one left a group of fewer snapshots than the CO knows, none of it asked for."""
    e = harness.open()
    for name in ("a", "b"):
        e.create_volume(name, 2 * model.MiB, deadline=enginesuite.dl())
    g = e.create_group_snapshot("g", [("g-a", "a"), ("g-b", "b")], deadline=enginesuite.dl())
    e.activate("g-b", deadline=enginesuite.dl())
    with pytest.raises(errors.FailedPrecondition, match="g-b"):
        e.delete_group_snapshot("g", deadline=enginesuite.dl())
    assert [d.name for d in e.get_group("g")] == [d.name for d in g]
    e.deactivate("g-b", deadline=enginesuite.dl())
    e.delete_group_snapshot("g", deadline=enginesuite.dl())
    assert e.get_group("g") == []
