"""The backend-neutral engine suite (tests/enginesuite.py) on real dm-thin: DmThinBackend on a
loop-file pool in /scratch, inside the VM (`make vm-test`). Each test gets its own pool, destroyed
after it."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import config, model
from csi_thin import deadline as deadline_mod
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import dmthin
from tests import enginesuite
from tests.enginesuite import *  # noqa: F403 - the suite's tests run here


class DmThinHarness(enginesuite.Harness):
    has_block_devices = True
    label = "dm-thin (VM)"

    def __init__(self, root: pathlib.Path) -> None:
        super().__init__(str(root / "state"))
        self.cfg = config.PoolConfig(
            name=f"e{uuid.uuid4().hex[:6]}",
            backend=config.BackendKind.DMTHIN,
            state_dir=self.state_dir,
            dmthin=config.DmThinConfig(
                data_file=str(root / "data.img"), data_size=1 * model.GiB, block_size=self.block_size
            ),
        )

    def make_backend(self) -> backend_mod.Backend:
        return dmthin.DmThinBackend(self.cfg)


@pytest.fixture
def harness() -> Iterator[enginesuite.Harness]:
    root = pathlib.Path("/scratch") / f"eng-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    h = DmThinHarness(root)
    try:
        yield h
    finally:
        h.shutdown()
        dmthin.DmThinBackend(h.cfg).destroy(deadline=deadline_mod.Deadline.after(120))
