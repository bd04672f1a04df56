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


def test_a_group_whose_member_vanished_goes_on_when_it_is_back(
    kube: kubeenv.KubeEnv, engine: engine_mod.PoolEngine
) -> None:
    """Step by step: the group's reconcile takes up the group, then finds a member gone from the
    API server (its cached copy stale: NotFound). The member made again (the controller's retry
    writes it before it waits) must let the group go on: it is what the group waits for, and nothing
    else reconciles the group again (its object does not change)."""
    api = client_mod.Client(kube.api_client())
    node = f"nc-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    vol, member, group = f"v-pvc-{node}", f"sh-{node}", f"g-{node}"
    mspec = res.SnapshotSpec(node_name=node, pool="p", source_volume=vol, group=group)
    gspec = res.GroupSpec(node_name=node, pool="p", members=(res.Member(snapshot=member, source_volume=vol),))
    engine.create_volume(vol, 1 << 26, deadline=dl)
    agent = agent_mod.Agent(api=api, engine=engine, node=node, pool="p", overprovision_ratio=10.0)
    try:
        agent._volumes[vol] = api.create(
            res.ThinVolume(meta=res.Meta(name=vol), spec=res.VolumeSpec(node, "p", 1 << 26)), deadline=dl
        )
        agent._snapshots[member] = api.create(
            res.ThinSnapshot(meta=res.Meta(name=member), spec=mspec), deadline=dl
        )
        agent._groups[group] = api.create(
            res.ThinGroupSnapshot(meta=res.Meta(name=group), spec=gspec), deadline=dl
        )
        api.delete(res.ThinSnapshot, member, deadline=dl)  # the agent's copy is now stale
        agent._reconcile_key((res.Kind.GROUP, group))
        assert engine.get(member) is None
        # made again, and seen by the agent's watch
        again = api.create(res.ThinSnapshot(meta=res.Meta(name=member), spec=mspec), deadline=dl)
        agent._seen_snapshot(again, False)
        while not agent._queue.empty():
            key = agent._queue.get()
            assert key is not None
            agent._reconcile_key(key)
        tg = api.get(res.ThinGroupSnapshot, group, deadline=dl)
        assert tg.status.phase == res.Phase.READY, tg.status
        assert engine.get(member) is not None
    finally:
        for cls, name in ((res.ThinGroupSnapshot, group), (res.ThinSnapshot, member), (res.ThinVolume, vol)):
            got = api.find(cls, name, deadline=dl)  # type: ignore[arg-type]
            if got is not None:
                api.set_finalizers(got, (), deadline=dl)
            api.delete(cls, name, deadline=dl)  # type: ignore[arg-type]
        engine.delete_group_snapshot(group, deadline=dl)
        engine.delete(vol, deadline=dl)
