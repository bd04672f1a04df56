"""containerd's snapshotter conformance suite against `csi-thin snapshotter` on reflink pools
(tests/ctrd_scenarios.py; on dm-thin: tests/vm/test_ctrd_dmthin.py)."""

from __future__ import annotations

import pytest

from tests import ctrd_scenarios, snapshotterenv

pytestmark = pytest.mark.tools


@pytest.mark.timeout(3600)
def test_containerd_snapshotter_suite(tmp_path_factory: pytest.TempPathFactory) -> None:
    ctrd_scenarios.snapshotter_suite(
        tmp_path_factory.mktemp("cs"), snapshotterenv.reflink_pool, backend="reflink"
    )
