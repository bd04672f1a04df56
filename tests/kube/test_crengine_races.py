"""The controller's CR engine against a real API server, with the race window held open: two
CreateVolume calls for one name (a retry after DEADLINE_EXCEEDED while the first still waits, or two
controller replicas) must never delete the object the other one made."""

from __future__ import annotations

import uuid

import pytest

from csi_thin import deadline as deadline_mod
from csi_thin import errors
from csi_thin.kube import client as client_mod
from csi_thin.kube import crengine
from csi_thin.kube import resources as res
from tests import kubeenv


def test_a_failed_create_deletes_only_the_object_it_saw_fail(
    kube: kubeenv.KubeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = client_mod.Client(kube.api_client())
    dl = deadline_mod.Deadline.after(60)
    name = f"v-pvc-race-{uuid.uuid4().hex[:6]}"
    spec = res.VolumeSpec(node_name="race-node", pool="p", size_bytes=1 << 26)
    first = api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=dl)
    failed = api.put_status(
        first,
        {"phase": "Failed", "code": "RESOURCE_EXHAUSTED", "message": "full", "observedGeneration": 1},
        deadline=dl,
    )
    # caller 1 saw it Failed; before it deletes, caller 2 deleted it and made the name afresh (which
    # its node may already have made Ready and handed out as a PV)
    api.delete(res.ThinVolume, name, deadline=dl)
    second = api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=dl)
    assert second.meta.uid != failed.meta.uid
    monkeypatch.setattr(crengine.watch, "wait_for", lambda *_a, **_k: failed)
    try:
        with pytest.raises(errors.ResourceExhausted):
            crengine.CrEngine(api)._settle("create_volume", res.ThinVolume, first, deadline=dl)
        still = api.find(res.ThinVolume, name, deadline=dl)
        assert still is not None and still.meta.uid == second.meta.uid and not still.meta.deleting
    finally:
        api.delete(res.ThinVolume, name, deadline=dl)
