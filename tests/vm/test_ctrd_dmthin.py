"""containerd on csi-thin on real dm-thin (tests/ctrd_scenarios.py): containerd's snapshotter
conformance suite against `csi-thin snapshotter`, and real containerd (Debian's, runc on the VM's
cgroup2, which vm/guest/stage2.sh mounts) running containers on its layers. The same scenarios run
natively on reflink pools in tests/root."""

from __future__ import annotations

import pytest

from tests import ctrd_scenarios, snapshotterenv


def test_containerd_runs_containers_on_dmthin_layers(tmp_path_factory: pytest.TempPathFactory) -> None:
    ctrd_scenarios.containerd_lifecycle(tmp_path_factory.mktemp("cc"), snapshotterenv.dmthin_pool)


@pytest.mark.tools
@pytest.mark.timeout(3600)
def test_containerd_snapshotter_suite_on_dmthin(tmp_path_factory: pytest.TempPathFactory) -> None:
    ctrd_scenarios.snapshotter_suite(
        tmp_path_factory.mktemp("cs"), snapshotterenv.dmthin_pool, backend="dm-thin"
    )
