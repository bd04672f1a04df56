"""Root tier fixtures. With CSI_THIN_STRESS=1 (`make test-stress`) the whole tier runs beside a
node's normal noise (tests/stress.py): a stale loop device answering EIO, loop devices of someone
else's coming and going, and blkid-like readers opening our devices."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import conftest, stress


@pytest.fixture(scope="session", autouse=True)
def node_noise(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if not stress.enabled():
        yield
        return
    own = tmp_path_factory.mktemp("stress")
    seconds = float(os.environ.get("CSI_THIN_STRESS_SECONDS", stress.DEFAULT_SECONDS))
    rate = float(os.environ.get("CSI_THIN_STRESS_RATE", stress.DEFAULT_RATE))
    with (
        stress.stale_eio_loop(own) as stale,
        stress.Churn(own / "churn", [tmp_path_factory.getbasetemp()], seconds=seconds, rate=rate) as churn,
    ):
        yield
    conftest.report(f"stress: stale EIO loops {' '.join(stale)}; churn {churn.summary}")
