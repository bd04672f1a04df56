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
    """Driven step by step (the agent's watch is not started, so nothing refreshes its cache behind
    the test's back): reconcile, another writer moves the object on, reconcile from the old copy."""
    api = client_mod.Client(kube.api_client())
    node = f"nc-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    name = f"v-pvc-{node}"
    key = (res.Kind.VOLUME, name)
    api.create(
        res.ThinVolume(
            meta=res.Meta(name=name), spec=res.VolumeSpec(node_name=node, pool="p", size_bytes=1 << 26)
        ),
        deadline=dl,
    )
    agent = agent_mod.Agent(api=api, engine=engine, node=node, pool="p", overprovision_ratio=10.0)
    try:
        agent._volumes[name] = api.get(res.ThinVolume, name, deadline=dl)
        agent._reconcile_key(key)
        ready = api.get(res.ThinVolume, name, deadline=dl)
        assert ready.status.phase == res.Phase.READY and res.FINALIZER in ready.meta.finalizers
        assert agent.conflicts == 0

        # another writer changes the status; the agent still holds the version before it
        api.put_status(ready, {**ready.status.to_dict(), "message": "overwritten"}, deadline=dl)
        agent._volumes[name] = dataclasses.replace(
            ready, status=dataclasses.replace(ready.status, message="stale")
        )
        agent._reconcile_key(key)  # its write is refused (409): counted, the object re-read
        assert agent.conflicts == 1
        assert api.get(res.ThinVolume, name, deadline=dl).status.message == "overwritten"  # nothing forced
        agent._reconcile_key(key)  # the requeued reconcile, from the fresh copy
        fixed = api.get(res.ThinVolume, name, deadline=dl)
        assert fixed.status.phase == res.Phase.READY and fixed.status.message == ""
        assert fixed.status.device_id == ready.status.device_id
        assert agent.conflicts == 1
    finally:
        got = api.find(res.ThinVolume, name, deadline=dl)
        if got is not None:
            api.set_finalizers(got, (), deadline=dl)
        api.delete(res.ThinVolume, name, deadline=dl)
        engine.delete(name, deadline=dl)
