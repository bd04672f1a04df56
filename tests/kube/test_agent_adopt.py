"""The node agent in-process (real API server, real reflink pool): a lost LMDB is rebuilt from the CRs
plus the pool, and an orphan id goes back only to the object that really owns it. A Lost object keeps
the device id it had in its status; once that id is free it can be handed to a new volume, so after a
second lost store two objects name the same id: the Lost one must never get the other's device (and
its data)."""

from __future__ import annotations

import os
import pathlib
import uuid

from csi_thin import app, config, demo
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
