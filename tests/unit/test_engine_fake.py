"""The backend-neutral engine suite against FakeBackend (a faithful in-memory dm-thin, file-backed so
that forked children and "reboots" see the same pool)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

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
        return []  # the fake has no kernel state beyond its devices and active sizes

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
