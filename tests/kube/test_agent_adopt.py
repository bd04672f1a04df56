"""The node agent in-process (real API server, real reflink pool): a lost LMDB is rebuilt from the CRs
plus the pool, and an orphan id goes back only to the object that really owns it. A Lost object keeps
the device id it had in its status; once that id is free it can be handed to a new volume, so after a
second lost store two objects name the same id: the Lost one must never get the other's device (and
its data)."""

from __future__ import annotations

import os
import pathlib
import uuid

import pytest

from csi_thin import app, config, demo, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.node import agent as agent_mod
from tests import kubeenv
from tests.kube.conftest import _pool_yaml


def test_a_lost_objects_stale_device_id_is_not_adopted(kube: kubeenv.KubeEnv, tmp_path: pathlib.Path) -> None:
    api = client_mod.Client(kube.api_client())
    node = f"na-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(120)
    lost, live = f"v-pvc-{node}-a", f"v-pvc-{node}-b"  # the Lost one lists first
    spec = res.VolumeSpec(node_name=node, pool="p", size_bytes=1 << 26)
    path = _pool_yaml(tmp_path, "1GiB")
    cfg = config.load_pool(str(path))
    try:
        with app.open_engine(cfg) as eng:
            api.create(res.ThinVolume(meta=res.Meta(name=live), spec=spec), deadline=dl)
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            agent._seen_volume(api.get(res.ThinVolume, live, deadline=dl), False)
            agent._reconcile_key((res.Kind.VOLUME, live))
            ready = api.get(res.ThinVolume, live, deadline=dl)
            assert ready.status.phase == res.Phase.READY
            dev_id = ready.status.device_id
        # an older volume, Lost, whose status still names the id the live one got since
        made = api.create(res.ThinVolume(meta=res.Meta(name=lost), spec=spec), deadline=dl)
        made = api.set_finalizers(made, (res.FINALIZER,), deadline=dl)
        api.put_status(
            made,
            {
                "phase": "Lost",
                "code": "FAILED_PRECONDITION",
                "message": "its device is not in the pool",
                "deviceId": dev_id,
                "sizeBytes": 1 << 26,
                "observedGeneration": 1,
            },
            deadline=dl,
        )
        state = tmp_path / "state"
        for name in ("data.mdb", "lock.mdb"):
            os.unlink(state / name)  # the store is lost

        with app.open_engine(cfg) as eng:
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            report = agent.start(deadline=dl)
            try:
                assert report.adopted == (live,)
                assert eng.get(live) is not None and eng.get(live).dev_id == dev_id  # type: ignore[union-attr]
                assert eng.get(lost) is None
                assert api.get(res.ThinVolume, live, deadline=dl).status.phase == res.Phase.READY
                assert api.get(res.ThinVolume, lost, deadline=dl).status.phase == res.Phase.LOST
            finally:
                agent.stop()
            eng.delete(live, deadline=dl)
    finally:
        for name in (lost, live):
            got = api.find(res.ThinVolume, name, deadline=dl)
            if got is not None:
                api.set_finalizers(got, (), deadline=dl)
            api.delete(res.ThinVolume, name, deadline=dl)
        problems = demo.cleanup(tmp_path, path)
        assert not problems, problems


def test_a_device_not_adopted_in_time_is_not_lost(
    kube: kubeenv.KubeEnv, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adoption at start-up can fail for a while (a deadline on a busy pool: each adoption lists the
    pool's devices). The device is still in the pool, an orphan: its object must not be declared Lost
    (the controller and the workload would give it up); it is adopted by a later reconcile."""
    api = client_mod.Client(kube.api_client())
    node = f"na-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(120)
    name = f"v-pvc-{node}"
    spec = res.VolumeSpec(node_name=node, pool="p", size_bytes=1 << 26)
    path = _pool_yaml(tmp_path, "1GiB")
    cfg = config.load_pool(str(path))
    try:
        with app.open_engine(cfg) as eng:
            api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=dl)
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            agent._seen_volume(api.get(res.ThinVolume, name, deadline=dl), False)
            agent._reconcile_key((res.Kind.VOLUME, name))
            dev_id = api.get(res.ThinVolume, name, deadline=dl).status.device_id
        for f in ("data.mdb", "lock.mdb"):
            os.unlink(tmp_path / "state" / f)

        with app.open_engine(cfg) as eng:
            real_adopt = eng.adopt
            failing = [True]

            def adopt(dev: model.Device, *, deadline: deadline_mod.Deadline) -> model.Device:
                if failing[0]:
                    raise errors.DeadlineExceeded("listing the pool's devices took too long")
                return real_adopt(dev, deadline=deadline)

            monkeypatch.setattr(eng, "adopt", adopt)
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            # start-up, step by step (no watch, no worker: nothing reconciles behind the test's back)
            vols = agent._vol_follower.list_now(deadline=dl)
            agent._listed_volumes(vols)
            assert agent._adopt(vols, [], deadline=dl) == []  # the pool too busy
            agent._reconcile_key((res.Kind.VOLUME, name))  # start-up reconcile, still busy
            assert api.get(res.ThinVolume, name, deadline=dl).status.phase == res.Phase.READY
            failing[0] = False
            agent._reconcile_key((res.Kind.VOLUME, name))  # the retry
            got = api.get(res.ThinVolume, name, deadline=dl)
            assert got.status.phase == res.Phase.READY and got.status.device_id == dev_id
            assert eng.get(name) is not None and eng.get(name).dev_id == dev_id  # type: ignore[union-attr]
            eng.delete(name, deadline=dl)
    finally:
        got = api.find(res.ThinVolume, name, deadline=dl)
        if got is not None:
            api.set_finalizers(got, (), deadline=dl)
        api.delete(res.ThinVolume, name, deadline=dl)
        problems = demo.cleanup(tmp_path, path)
        assert not problems, problems
