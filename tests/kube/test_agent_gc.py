"""`gc_orphans` of the node agent in-process (real API server, real reflink pool), its watch cache
left empty on purpose, as one that has not caught up: each orphan past its grace period is checked
against a fresh read from the API server right before it would be deleted, so a CR the cache does not
know yet still saves its device, by name or by its status.deviceId."""

from __future__ import annotations

import pathlib
import uuid

from csi_thin import app, config, demo
from csi_thin import deadline as deadline_mod
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.node import agent as agent_mod
from tests import kubeenv
from tests.kube.conftest import MiB, _pool_yaml


def test_gc_checks_each_orphan_against_a_fresh_read(kube: kubeenv.KubeEnv, tmp_path: pathlib.Path) -> None:
    api = client_mod.Client(kube.api_client())
    node = f"ng-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(120)
    gone, saved, named, free, other = (
        f"v-pvc-{node}-{x}" for x in ("gone", "saved", "named", "free", "other")
    )
    spec = res.VolumeSpec(node_name=node, pool="p", size_bytes=64 * MiB)
    path = _pool_yaml(tmp_path, "1GiB")
    cfg = config.load_pool(str(path))
    try:
        with app.open_engine(cfg) as eng:
            for n in (gone, saved, named, free):
                eng.create_volume(n, 64 * MiB, deadline=dl)
            # two records lost, their devices kept: pool ids no record owns
            ids = {n: eng.get(n).dev_id for n in (named, free)}  # type: ignore[union-attr]
            with eng.store.write() as w:
                for n in (named, free):
                    w.remove(n)
                    w.reserve_orphan(ids[n])
            # a CR whose status names one of those ids (its record lost, the CR kept)
            made = api.create(res.ThinVolume(meta=res.Meta(name=other), spec=spec), deadline=dl)
            api.put_status(
                made,
                {
                    "phase": "Lost",
                    "code": "FAILED_PRECONDITION",
                    "message": "its device is not in the pool",
                    "deviceId": ids[named],
                    "sizeBytes": 64 * MiB,
                    "observedGeneration": 1,
                },
                deadline=dl,
            )
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            everything = sorted([gone, saved, f"id:{ids[named]}", f"id:{ids[free]}"])

            # within the grace period: nothing deleted, each one says how long it still waits
            first = agent.gc_orphans(grace_seconds=3600, deadline=dl)
            assert first.deleted == () and first.kept == () and first.failed == ()
            assert sorted(w.name for w in first.waiting) == everything
            assert all(w.orphan_seconds < 60 and w.eligible_in_seconds > 3500 for w in first.waiting)

            # a CR for `saved` appears, which the agent's cache does not know
            api.create(res.ThinVolume(meta=res.Meta(name=saved), spec=spec), deadline=dl)
            second = agent.gc_orphans(grace_seconds=0, deadline=dl)
            assert sorted(second.deleted) == sorted([gone, f"id:{ids[free]}"])
            kept = {k.name: k.reason for k in second.kept}
            assert set(kept) == {saved, f"id:{ids[named]}"}, second
            assert kept[saved].startswith(f"ThinVolume {saved} (node {node})")
            assert kept[f"id:{ids[named]}"].startswith(f"ThinVolume {other} (its status.deviceId")
            assert second.waiting == () and second.failed == ()
            assert eng.get(gone) is None and eng.get(saved) is not None
            assert eng.orphans() == [ids[named]]

            # idempotent: nothing more to delete, the owned ones kept again
            third = agent.gc_orphans(grace_seconds=0, deadline=dl)
            assert third.deleted == () and {k.name for k in third.kept} == set(kept)
            eng.delete(saved, deadline=dl)
    finally:
        for name in (saved, other):
            got = api.find(res.ThinVolume, name, deadline=dl)
            if got is not None:
                api.set_finalizers(got, (), deadline=dl)
            api.delete(res.ThinVolume, name, deadline=dl)
        problems = demo.cleanup(tmp_path, path)
        assert not problems, problems


def test_gc_keeps_a_member_its_group_names(kube: kubeenv.KubeEnv, tmp_path: pathlib.Path) -> None:
    """A group member whose ThinSnapshot was removed by force is still its group's: the
    ThinGroupSnapshot (read afresh) names it, and deleting the group deletes it. gc keeps it."""
    api = client_mod.Client(kube.api_client())
    node = f"ng-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(120)
    vol, member, group = f"v-pvc-{node}", f"sh-{node}-m", f"g-{node}"
    path = _pool_yaml(tmp_path, "1GiB")
    cfg = config.load_pool(str(path))
    try:
        with app.open_engine(cfg) as eng:
            eng.create_volume(vol, 64 * MiB, deadline=dl)
            eng.create_group_snapshot(group, [(member, vol)], deadline=dl)
            vspec = res.VolumeSpec(node_name=node, pool="p", size_bytes=64 * MiB)
            api.create(res.ThinVolume(meta=res.Meta(name=vol), spec=vspec), deadline=dl)
            spec = res.GroupSpec(
                node_name=node, pool="p", members=(res.Member(snapshot=member, source_volume=vol),)
            )
            api.create(res.ThinGroupSnapshot(meta=res.Meta(name=group), spec=spec), deadline=dl)
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            report = agent.gc_orphans(grace_seconds=0, deadline=dl)
            kept = {k.name: k.reason for k in report.kept}
            assert report.deleted == () and set(kept) == {vol, member}, report
            assert kept[member].startswith(f"ThinGroupSnapshot {group}"), report
            assert eng.get(member) is not None
            eng.delete_group_snapshot(group, deadline=dl)
            eng.delete(vol, deadline=dl)
    finally:
        api.delete(res.ThinVolume, vol, deadline=dl)
        api.delete(res.ThinGroupSnapshot, group, deadline=dl)
        problems = demo.cleanup(tmp_path, path)
        assert not problems, problems
