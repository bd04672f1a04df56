"""The node agent in-process (real API server, real reflink pool): a status write that races another
writer (409 Conflict on the resourceVersion) is re-read and redone, never lost and never forced; a
status someone else overwrote is put back by the next reconcile."""

from __future__ import annotations

import dataclasses
import pathlib
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import app, config, demo
from csi_thin import deadline as deadline_mod
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.kube import watch
from csi_thin.node import agent as agent_mod
from csi_thin.pool import engine as engine_mod
from tests import kubeenv
from tests.kube.conftest import _pool_yaml


@pytest.fixture
def engine(tmp_path: pathlib.Path) -> Iterator[engine_mod.PoolEngine]:
    path = _pool_yaml(tmp_path, "1GiB")
    try:
        with app.open_engine(config.load_pool(str(path))) as eng:
            yield eng
    finally:
        problems = demo.cleanup(tmp_path, path)
        assert not problems, problems


def test_status_conflicts_are_reread_and_redone(kube: kubeenv.KubeEnv, engine: engine_mod.PoolEngine) -> None:
    api = client_mod.Client(kube.api_client())
    node = f"nc-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    name = f"v-pvc-{node}"
    api.create(
        res.ThinVolume(
            meta=res.Meta(name=name), spec=res.VolumeSpec(node_name=node, pool="p", size_bytes=1 << 26)
        ),
        deadline=dl,
    )
    agent = agent_mod.Agent(api=api, engine=engine, node=node, pool="p", overprovision_ratio=10.0)
    agent.start(deadline=dl)
    try:
        ready = api.get(res.ThinVolume, name, deadline=dl)
        assert ready.status.phase == res.Phase.READY and res.FINALIZER in ready.meta.finalizers

        # another writer changes the status behind the agent's back ...
        api.put_status(ready, {**ready.status.to_dict(), "message": "overwritten"}, deadline=dl)
        # ... and the agent reconciles from the copy it had (its cache is one version behind)
        stale = dataclasses.replace(ready, status=dataclasses.replace(ready.status, message="stale"))
        agent._volumes[name] = stale  # the race, made deterministic
        agent._queue.put((res.Kind.VOLUME, name))
        fixed = watch.wait_for(
            api,
            res.ThinVolume,
            name,
            lambda o: o is not None and o.status.message == "" and o.status.phase == res.Phase.READY,
            deadline=deadline_mod.Deadline.after(30),
            what="the agent putting the status back",
        )
        assert fixed is not None and fixed.status.device_id == ready.status.device_id
        assert agent.conflicts >= 1
    finally:
        agent.stop()
        api.delete(res.ThinVolume, name, deadline=dl)
        got = api.find(res.ThinVolume, name, deadline=dl)
        if got is not None:
            api.set_finalizers(got, (), deadline=dl)
        engine.delete(name, deadline=dl)
        for pool in api.list(res.ThinPool, deadline=dl, node=node)[0]:
            api.delete(res.ThinPool, pool.name, deadline=dl)
