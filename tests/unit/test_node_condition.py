"""The volume condition the node reports, over a fake engine."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from csi_thin import deadline, errors, model
from csi_thin.node import volumes
from tests.unit import fake_engine

DL = deadline.Deadline.after(60)


def setup(tmp_path: pathlib.Path) -> tuple[volumes.NodeVolumes, fake_engine.FakeEngine, model.Device]:
    eng = fake_engine.FakeEngine()
    dev = eng.create_volume("v-a", model.MiB, deadline=DL)
    return volumes.NodeVolumes(engine=eng, thresholds=model.Thresholds()), eng, dev


def test_missing_device_is_abnormal(tmp_path: pathlib.Path) -> None:
    nv, _, dev = setup(tmp_path)
    assert nv._condition(dev, deadline=DL).abnormal  # not active
    gone = dataclasses.replace(dev, active=True, path=str(tmp_path / "no-such-device"))
    cond = nv._condition(gone, deadline=DL)
    assert cond.abnormal and "missing" in cond.message


@pytest.mark.parametrize(
    ("mode", "used", "abnormal"),
    [
        (model.PoolMode.RW, 0, False),
        (model.PoolMode.RO, 0, True),
        (model.PoolMode.OUT_OF_DATA_SPACE, 0, True),
        (model.PoolMode.RW, int(9.9 * model.GiB), True),
    ],
)
def test_pool_state_is_reported(
    tmp_path: pathlib.Path, mode: model.PoolMode, used: int, abnormal: bool
) -> None:
    nv, eng, dev = setup(tmp_path)
    present = tmp_path / "dev"
    present.touch()
    eng.mode, eng.data_used = mode, used
    cond = nv._condition(dataclasses.replace(dev, active=True, path=str(present)), deadline=DL)
    assert cond.abnormal == abnormal


def test_unknown_volume_is_not_found(tmp_path: pathlib.Path) -> None:
    nv, _, _ = setup(tmp_path)
    with pytest.raises(errors.NotFound):
        nv.stats("v-ghost", str(tmp_path), deadline=DL)
    with pytest.raises(errors.NotFound):
        nv.stats("v-a", str(tmp_path / "missing"), deadline=DL)
    with pytest.raises(errors.NotFound):  # a path where the volume is not mounted
        nv.stats("v-a", str(tmp_path), deadline=DL)
