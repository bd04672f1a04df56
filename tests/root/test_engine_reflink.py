"""The backend-neutral engine suite (tests/enginesuite.py) on the reflink backend: ReflinkBackend on
a loop-mounted XFS (reflink=1) or btrfs image in the test's temp dir, natively as root. Each test gets its
own pool; every mount and loop device under the temp dir is removed after it, even on failure."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from csi_thin import config, model
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import reflink
from tests import enginesuite
from tests.enginesuite import *  # noqa: F403 - the suite's tests run here
from tests.root import test_reflink


class ReflinkHarness(enginesuite.Harness):
    has_block_devices = True

    def __init__(self, root: pathlib.Path, fs_type: str) -> None:
        super().__init__(str(root / "state"))
        self.label = f"reflink on {fs_type}"
        self.cfg = config.PoolConfig(
            name="engine",
            backend=config.BackendKind.REFLINK,
            state_dir=self.state_dir,
            reflink=config.ReflinkConfig(
                directory=str(root / "pool"),
                image_file=str(root / "pool.img"),
                image_size=512 * model.MiB,
                fs_type=fs_type,
                block_size=self.block_size,
            ),
        )

    def make_backend(self) -> backend_mod.Backend:
        return reflink.ReflinkBackend(self.cfg)


@pytest.fixture(params=["xfs", "btrfs"])
def harness(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[enginesuite.Harness]:
    h = ReflinkHarness(tmp_path, request.param)
    try:
        yield h
    finally:
        h.shutdown()
        try:
            reflink.ReflinkBackend(h.cfg).destroy(deadline=enginesuite.dl())
        finally:
            test_reflink.cleanup_under(tmp_path)
