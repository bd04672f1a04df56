"""Root tier fixtures. With CSI_THIN_STRESS=1 (`make test-stress`) the whole tier runs beside a
node's normal noise (tests/stress.py): loop devices of someone else's coming and going, and
blkid-like readers opening our devices. CSI_THIN_STRESS_STALE=1 adds stale loop devices answering
EIO for the whole run. That one is opt-in: on a machine shared with people running code without
the fix for it, their every reflink pool start fails while the stale devices exist."""

from __future__ import annotations

import contextlib
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
    with contextlib.ExitStack() as stack:
        stale = stack.enter_context(stress.stale_eio_loop(own)) if stress.stale_enabled() else []
        roots = [tmp_path_factory.getbasetemp()]
        churn = stack.enter_context(stress.Churn(own / "churn", roots, seconds=seconds, rate=rate))
        yield
    conftest.report(f"stress: stale EIO loops [{' '.join(stale)}]; churn {churn.summary}")
