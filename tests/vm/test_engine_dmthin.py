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
from csi_thin.dm import ioctl, parse
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import dmthin
from csi_thin.pool import engine as engine_mod
from tests import blockio, enginesuite
from tests.enginesuite import *  # noqa: F403 - the suite's tests run here
from tests.enginesuite import (
    test_group_snapshot_holds_data_of_one_instant,  # noqa: F401 - backends with block devices
    test_group_snapshot_killed_while_held_is_let_go_at_start,  # noqa: F401 - ditto
)


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

    def _thins(self, ctl: ioctl.Control) -> dict[int, str]:
        prefix = f"csi-thin-{self.cfg.name}-"
        return {
            int(d.name[len(prefix) :]): d.name
            for d in ctl.list_devices()
            if d.name.startswith(prefix) and d.name[len(prefix) :].isdigit()
        }

    def kernel_sizes(self, engine: engine_mod.PoolEngine) -> dict[int, int]:
        """An active thin device's size, as the block layer reports it (BLKGETSIZE64 via lseek)."""
        with ioctl.Control() as ctl:
            return {
                dev_id: blockio.device_size(engine.backend.device_path(dev_id)) for dev_id in self._thins(ctl)
            }

    def leftovers(self, engine: engine_mod.PoolEngine) -> list[str]:
        out = []
        with ioctl.Control() as ctl:
            for name in [*self._thins(ctl).values(), f"csi-thin-{self.cfg.name}-pool"]:
                info = ctl.info(name)
                assert info is not None, name
                if info.suspended or info.inactive_table or not info.live_table:
                    out.append(f"{name}: {info}")
            [target] = ctl.status(f"csi-thin-{self.cfg.name}-pool", flush=False)
            held = parse.parse_pool_status(target.params).held_root
            if held is not None:
                out.append(f"metadata snapshot held at {held}")
        return out


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
