"""The node agent in-process (real API server, real reflink pool), driven step by step: its cache of
an object can go back in time (the watch delivers, late, events of writes the agent itself made and
has already moved past). A stale copy must never make a device for an object that is gone."""

from __future__ import annotations

import dataclasses
import pathlib
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import app, config, demo, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.kube import client as client_mod
from csi_thin.kube import crengine
from csi_thin.kube import resources as res
from csi_thin.node import agent as agent_mod
from csi_thin.pool import engine as engine_mod
from csi_thin.pool import health
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


def test_a_late_event_of_a_deleted_volume_makes_no_device(
    kube: kubeenv.KubeEnv, engine: engine_mod.PoolEngine
) -> None:
    api = client_mod.Client(kube.api_client())
    node = f"ns-{uuid.uuid4().hex[:6]}"
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
        agent._seen_volume(api.get(res.ThinVolume, name, deadline=dl), False)
        agent._reconcile_key(key)
        ready = api.get(res.ThinVolume, name, deadline=dl)
        assert ready.status.phase == res.Phase.READY and engine.get(name) is not None
        # the version between the agent's finalizer write and its status write: finalizer, no status
        between = dataclasses.replace(ready, status=res.VolumeStatus())

        api.delete(res.ThinVolume, name, deadline=dl)  # DeleteVolume
        agent._seen_volume(api.get(res.ThinVolume, name, deadline=dl), False)
        agent._reconcile_key(key)  # device deleted, finalizer dropped: the object is gone
        assert api.find(res.ThinVolume, name, deadline=dl) is None
        assert engine.get(name) is None

        agent._seen_volume(between, False)  # the watch, late, delivers the in-between version
        agent._reconcile_key(key)
        assert engine.get(name) is None, "a device was made for a volume that no longer exists"
        assert name not in agent._volumes
    finally:
        got = api.find(res.ThinVolume, name, deadline=dl)
        if got is not None:
            api.set_finalizers(got, (), deadline=dl)
        api.delete(res.ThinVolume, name, deadline=dl)
        if engine.get(name) is not None:
            engine.delete(name, deadline=dl)


def test_a_late_deletion_of_an_old_object_spares_the_new_one_of_that_name(
    kube: kubeenv.KubeEnv, engine: engine_mod.PoolEngine
) -> None:
    """A Failed create is deleted and made afresh under the same name (a new uid): the old object's
    deletion event, delivered late, must not delete the device of the new one (a Ready volume lost)."""
    api = client_mod.Client(kube.api_client())
    node = f"ns-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    name = f"v-pvc-{node}"
    key = (res.Kind.VOLUME, name)
    spec = res.VolumeSpec(node_name=node, pool="p", size_bytes=1 << 26)
    api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=dl)
    agent = agent_mod.Agent(api=api, engine=engine, node=node, pool="p", overprovision_ratio=10.0)
    try:
        agent._seen_volume(api.get(res.ThinVolume, name, deadline=dl), False)
        agent._reconcile_key(key)
        api.delete(res.ThinVolume, name, deadline=dl)
        old_deleting = api.get(res.ThinVolume, name, deadline=dl)
        agent._seen_volume(old_deleting, False)
        agent._reconcile_key(key)
        assert api.find(res.ThinVolume, name, deadline=dl) is None and engine.get(name) is None

        api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=dl)
        agent._seen_volume(api.get(res.ThinVolume, name, deadline=dl), False)
        agent._reconcile_key(key)
        new = api.get(res.ThinVolume, name, deadline=dl)
        assert new.status.phase == res.Phase.READY and new.meta.uid != old_deleting.meta.uid
        device = engine.get(name)
        assert device is not None

        agent._seen_volume(old_deleting, False)  # the old object's deletion, delivered late
        agent._reconcile_key(key)
        agent._reconcile_key(key)  # and the requeued reconcile, from whatever the agent then holds
        assert engine.get(name) == device, "the new volume's device was deleted"
        now = api.get(res.ThinVolume, name, deadline=dl)
        assert now.meta.uid == new.meta.uid and now.status.phase == res.Phase.READY
    finally:
        got = api.find(res.ThinVolume, name, deadline=dl)
        if got is not None:
            api.set_finalizers(got, (), deadline=dl)
        api.delete(res.ThinVolume, name, deadline=dl)
        if engine.get(name) is not None:
            engine.delete(name, deadline=dl)


def test_a_long_failure_message_still_settles_the_object(
    kube: kubeenv.KubeEnv, engine: engine_mod.PoolEngine
) -> None:
    """The CRD bounds status messages (4096 characters): a longer error (a tool's stderr) must still
    be written as the Failed verdict, not refused by the API server on every retry (the object then
    stays Pending and CreateVolume times out forever)."""
    api = client_mod.Client(kube.api_client())
    node = f"ns-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    name = f"v-pvc-{node}"
    spec = res.VolumeSpec(node_name=node, pool="p", size_bytes=1 << 26)
    made = api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=dl)
    agent = agent_mod.Agent(api=api, engine=engine, node=node, pool="p", overprovision_ratio=10.0)
    try:
        agent._failed(made, errors.Internal("dmsetup: " + "x" * 6000), deadline=dl)
        got = api.get(res.ThinVolume, name, deadline=dl)
        assert got.status.phase == res.Phase.FAILED and got.status.code == "INTERNAL"
        assert got.status.message.startswith("dmsetup: x")
    finally:
        api.delete(res.ThinVolume, name, deadline=dl)


def test_a_pool_the_node_cannot_read_does_not_stay_healthy_in_its_thinpool(
    kube: kubeenv.KubeEnv, engine: engine_mod.PoolEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller judges a node's pool (capacity, placement, volume health) by its ThinPool
    status. A pool the node can no longer read (not assembled, gone) must show there as failed: left
    at its last healthy status, the controller would go on offering its capacity and reporting its
    volumes healthy while the node's own NodeGetStorageHealth says PoolUnavailable."""
    api = client_mod.Client(kube.api_client())
    node = f"nu-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    agent = agent_mod.Agent(api=api, engine=engine, node=node, pool="p", overprovision_ratio=10.0)
    controller_view = crengine.CrEngine(api).on(node)
    try:
        agent._ensure_pool_object(deadline=dl)
        assert agent._refresh_quietly()
        assert controller_view.status(deadline=dl).healthy

        def gone(*, deadline: deadline_mod.Deadline) -> model.PoolStatus:
            raise errors.Unavailable("reflink pool p is not assembled")

        monkeypatch.setattr(engine, "status", gone)
        assert not agent._refresh_quietly()  # still a failed refresh: logged and counted
        st = controller_view.status(deadline=dl)
        assert st.mode == model.PoolMode.FAIL and not st.healthy
        issues = health.pool(st, controller_view.space_thresholds(deadline=dl))
        assert [(i.severity, i.reason) for i in issues] == [(health.Severity.INACCESSIBLE, health.FAILED)]
        assert controller_view.space_thresholds(deadline=dl) == engine.thresholds  # still the node's own
    finally:
        api.delete(res.ThinPool, agent.pool_object_name, deadline=dl)
