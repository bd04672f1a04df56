"""The volume and storage health the node reports, over a fake engine (the real mounts, a
filesystem shut down by an error and a full pool are in tests/root/test_csi_node.py and
tests/fullpool.py)."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from csi_thin import deadline, errors, model
from csi_thin.node import volumes
from csi_thin.pool import health
from tests.unit import fake_engine

DL = deadline.Deadline.after(60)


def setup(tmp_path: pathlib.Path) -> tuple[volumes.NodeVolumes, fake_engine.FakeEngine, model.Device]:
    eng = fake_engine.FakeEngine()
    dev = eng.create_volume("v-a", model.MiB, deadline=DL)
    return volumes.NodeVolumes(engine=eng, thresholds=model.Thresholds()), eng, dev


def reasons(issues: tuple[health.Issue, ...]) -> list[str]:
    return [i.reason for i in issues]


def test_an_unstaged_healthy_volume_has_no_issue(tmp_path: pathlib.Path) -> None:
    """Not being staged is no health issue (the CO asks without paths): only asked at a path where
    the volume should be does its absence count."""
    nv, _, _ = setup(tmp_path)
    assert nv.volume_health("v-a", staging_path="", publish_path="", deadline=DL) == ()


def test_paths_that_do_not_show_the_volume(tmp_path: pathlib.Path) -> None:
    nv, _, _ = setup(tmp_path)
    (tmp_path / "staging").mkdir()
    issues = nv.volume_health(
        "v-a", staging_path=str(tmp_path / "staging"), publish_path=str(tmp_path / "gone"), deadline=DL
    )
    assert reasons(issues) == [volumes.NOT_STAGED, volumes.NOT_PUBLISHED]
    assert {i.severity for i in issues} == {health.Severity.INACCESSIBLE}
    assert str(tmp_path / "gone") in issues[1].message


def test_a_block_volume_has_nothing_at_its_staging_path(tmp_path: pathlib.Path) -> None:
    nv, eng, _ = setup(tmp_path)
    eng.create_volume("v-b", model.MiB, deadline=DL, attributes={model.ATTR_ACCESS_TYPE: "block"})
    (tmp_path / "staging").mkdir()
    assert nv.volume_health("v-b", staging_path=str(tmp_path / "staging"), publish_path="", deadline=DL) == ()


def test_an_active_volume_whose_device_node_is_gone(tmp_path: pathlib.Path) -> None:
    nv, eng, dev = setup(tmp_path)
    eng.devices["v-a"] = dataclasses.replace(dev, active=True, path=str(tmp_path / "no-such-device"))
    issues = nv.volume_health("v-a", staging_path="", publish_path="", deadline=DL)
    assert reasons(issues) == [volumes.DEVICE_MISSING] and "no-such-device" in issues[0].message
    (tmp_path / "no-such-device").touch()
    assert nv.volume_health("v-a", staging_path="", publish_path="", deadline=DL) == ()


@pytest.mark.parametrize(
    ("mode", "used", "expected"),
    [
        (model.PoolMode.RW, 0, []),
        (model.PoolMode.RO, 0, [health.READ_ONLY]),
        (model.PoolMode.OUT_OF_DATA_SPACE, 10 * model.GiB, [health.OUT_OF_DATA_SPACE]),
        (model.PoolMode.RW, int(9.9 * model.GiB), [health.DATA_ABOVE_THRESHOLD]),
    ],
)
def test_pool_state_is_reported(
    tmp_path: pathlib.Path, mode: model.PoolMode, used: int, expected: list[str]
) -> None:
    nv, eng, _ = setup(tmp_path)
    eng.mode, eng.data_used = mode, used
    assert reasons(nv.volume_health("v-a", staging_path="", publish_path="", deadline=DL)) == expected
    assert reasons(nv.storage_health(deadline=DL)) == expected


def test_storage_health_names_lost_devices_and_a_lost_volume_its_own(tmp_path: pathlib.Path) -> None:
    nv, eng, dev = setup(tmp_path)
    assert nv.storage_health(deadline=DL) == ()
    eng.create_volume("v-b", model.MiB, deadline=DL)
    eng.devices["v-a"] = dataclasses.replace(dev, state=model.DeviceState.LOST)
    (lost,) = nv.storage_health(deadline=DL)
    assert lost.reason == health.DEVICES_LOST and "v-a" in lost.message and "v-b" not in lost.message
    assert reasons(nv.volume_health("v-a", staging_path="", publish_path="", deadline=DL)) == [
        health.DEVICE_LOST
    ]
    assert nv.volume_health("v-b", staging_path="", publish_path="", deadline=DL) == ()


def test_a_pool_that_cannot_report_is_unreachable(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Health is reported, not failed: a pool whose status cannot be read is the answer."""
    nv, eng, _ = setup(tmp_path)

    def gone(*, deadline: deadline.Deadline) -> model.PoolStatus:
        raise errors.Unavailable("thin pool csi-thin-pool does not exist")

    monkeypatch.setattr(eng, "status", gone)
    for issues in (
        nv.storage_health(deadline=DL),
        nv.volume_health("v-a", staging_path="", publish_path="", deadline=DL),
    ):
        assert [(i.severity, i.reason) for i in issues] == [
            (health.Severity.INACCESSIBLE, health.UNAVAILABLE)
        ]
        assert "does not exist" in issues[0].message


def test_unknown_volume_is_not_found(tmp_path: pathlib.Path) -> None:
    nv, _, _ = setup(tmp_path)
    with pytest.raises(errors.NotFound):
        nv.volume_health("v-ghost", staging_path="", publish_path="", deadline=DL)
    with pytest.raises(errors.NotFound):
        nv.stats("v-ghost", str(tmp_path), deadline=DL)
    with pytest.raises(errors.NotFound):
        nv.stats("v-a", str(tmp_path / "missing"), deadline=DL)
    with pytest.raises(errors.NotFound):  # a path where the volume is not mounted
        nv.stats("v-a", str(tmp_path), deadline=DL)
