"""The node agent's ThinPool object deleted under it (an operator cleaning up the ThinPools of
decommissioned nodes takes a live one too): the next status publish makes it again. Without it the
controller sees a node with no ThinPool, hence no capacity, until the node pod is restarted."""

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


def test_a_deleted_thinpool_object_is_made_again_by_the_next_publish(
    kube: kubeenv.KubeEnv, tmp_path: pathlib.Path
) -> None:
    api = client_mod.Client(kube.api_client())
    node = f"np-{uuid.uuid4().hex[:6]}"
    dl = deadline_mod.Deadline.after(60)
    path = _pool_yaml(tmp_path, "1GiB")
    agent: agent_mod.Agent | None = None
    try:
        with app.open_engine(config.load_pool(str(path))) as eng:
            agent = agent_mod.Agent(api=api, engine=eng, node=node, pool="p", overprovision_ratio=10.0)
            agent.start(deadline=dl)
            name = agent.pool_object_name
            assert api.get(res.ThinPool, name, deadline=dl).status.data_total_bytes > 0
            api.delete(res.ThinPool, name, deadline=dl)
            assert api.find(res.ThinPool, name, deadline=dl) is None

            eng.create_volume("v-after", 64 * MiB, deadline=dl)
            agent._refresh_pool(deadline=dl)  # what the status writer runs after a mark or its period
            again = api.find(res.ThinPool, name, deadline=dl)
            assert again is not None and again.spec.node_name == node
            assert again.status.volumes == 1 and again.status.data_total_bytes > 0
            agent.stop()
            agent = None
            eng.delete("v-after", deadline=dl)
    finally:
        if agent is not None:
            agent.stop()
        problems = demo.cleanup(tmp_path, path)
        assert not problems, problems
        api.delete(res.ThinPool, res.pool_object_name(node, "p"), deadline=dl)
