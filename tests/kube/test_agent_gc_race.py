"""A CR made (a restore from a backup: spec only, no status) while `pool gc --orphans` deletes the
orphan record of the same name, after gc's fresh read found none. gc holds the agent's work lock, so
no reconcile takes the record up meanwhile; but once gc is done, the reconcile of that CR finds no
record and no status.deviceId: it must not hand the workload a new empty device where its data was
(as for any CR whose device is gone: Lost, never re-created empty)."""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

import pytest

from csi_thin import app, config, demo
from csi_thin import deadline as deadline_mod
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.node import agent as agent_mod
from tests import kubeenv
from tests.kube.conftest import MiB, _pool_yaml


def test_a_cr_made_during_the_gc_delete_of_its_record_is_lost_not_recreated_empty(
    kube: kubeenv.KubeEnv, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = client_mod.Client(kube.api_client())
    node = f"nr-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    name = f"v-pvc-{node}"
    key = (res.Kind.VOLUME, name)
    spec = res.VolumeSpec(node_name=node, pool="p", size_bytes=64 * MiB)
    path = _pool_yaml(tmp_path, "1GiB")
    try:
        with app.open_engine(config.load_pool(str(path))) as eng:
            eng.create_volume(name, 64 * MiB, deadline=dl)  # its CR was removed by force: an orphan
            old_id = eng.get(name).dev_id  # type: ignore[union-attr]
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            real_delete = eng.delete

            def delete_as_the_cr_comes_back(n: str, **kw: Any) -> None:
                # after gc's fresh read (none named it), before the device is gone
                api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=dl)
                real_delete(n, **kw)

            monkeypatch.setattr(eng, "delete", delete_as_the_cr_comes_back)
            report = agent.gc_orphans(grace_seconds=0, deadline=dl)
            monkeypatch.setattr(eng, "delete", real_delete)
            assert report.deleted == (name,), report
            assert eng.get(name) is None and old_id not in eng.backend.device_ids(deadline=dl)

            # the watch brings the CR; its reconcile
            agent._seen_volume(api.get(res.ThinVolume, name, deadline=dl), False)
            agent._reconcile_key(key)
            got = api.get(res.ThinVolume, name, deadline=dl)
            assert eng.get(name) is None, "a new empty device for a restored volume whose data gc deleted"
            assert got.status.phase == res.Phase.LOST, got.status
            assert "pool gc" in got.status.message
    finally:
        got_cr = api.find(res.ThinVolume, name, deadline=dl)
        if got_cr is not None:
            api.set_finalizers(got_cr, (), deadline=dl)
            api.delete(res.ThinVolume, name, deadline=dl)
        problems = demo.cleanup(tmp_path, path)
        assert not problems, problems
