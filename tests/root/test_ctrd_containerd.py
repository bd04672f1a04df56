"""Real containerd with csi-thin as its proxy snapshotter on a reflink pool: import, run, commit, run
again, remove everything (tests/ctrd_scenarios.py; on dm-thin: tests/vm/test_ctrd_dmthin.py)."""

from __future__ import annotations

import pytest

from tests import ctrd_scenarios, snapshotterenv


def test_containerd_runs_containers_on_csi_thin_layers(tmp_path_factory: pytest.TempPathFactory) -> None:
    ctrd_scenarios.containerd_lifecycle(tmp_path_factory.mktemp("cc"), snapshotterenv.reflink_pool)
