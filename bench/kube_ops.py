"""Kubernetes mode, measured on a real kube-apiserver + etcd (bin/) with the reflink backend natively
(root: loop devices and mounts):

  create    CreateVolume through the CR round trip: controller writes the ThinVolume, the node agent
            (another process) creates the device and writes status, the controller's watch sees it.
            Target (issue 9): p50 < 250 ms natively.
  start-up  a node agent restarted over 1,000 ThinVolumes whose devices exist: list + reconcile time
            (the agent's own measure) and the process RSS once it serves. Target: < 5 s, < 150 MiB.
"""

from __future__ import annotations

import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from csi_thin import deadline as deadline_mod  # noqa: E402
from csi_thin import demo, model  # noqa: E402
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_thin.kube import client as client_mod  # noqa: E402
from csi_thin.kube import resources as res  # noqa: E402
from tests import kubecrds, kubeenv  # noqa: E402
from tests.kube.conftest import Proc, _pool_yaml  # noqa: E402

N = int(os.environ.get("BENCH_N", "25"))
MANY = int(os.environ.get("BENCH_VOLUMES", "1000"))
NODE = "bench-node"
KEY = "csi-thin.io/node"
CAP = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ready(api: client_mod.Client, dl: deadline_mod.Deadline) -> int:
    vols, _ = api.list(res.ThinVolume, deadline=dl, node=NODE)
    return sum(v.status.phase == res.Phase.READY for v in vols)


def started_seconds(log: pathlib.Path) -> tuple[int, float]:
    hits = re.findall(r"event=agent-started node=\S+ volumes=(\d+) .* seconds=([0-9.]+)", log.read_text())
    volumes, seconds = hits[-1]
    return int(volumes), float(seconds)


def main() -> int:
    with kubeenv.running(ROOT / "bin") as env, tempfile.TemporaryDirectory(prefix="kube-bench-") as tmp:
        kubecrds.install(env)
        work = pathlib.Path(tmp)
        kubeconfig = env.write_kubeconfig(work / "kubeconfig")
        cfg = _pool_yaml(work, "4GiB")
        pyenv = {**os.environ, "PYTHONPATH": str(ROOT)}
        launch = [sys.executable, "-m", "tests.kube.agent_main"]
        node = Proc(
            [*launch, "node", "--endpoint", f"unix://{work}/node.sock", "--node-id", NODE,
             "--pool-config", str(cfg), "--kubeconfig", str(kubeconfig), "--log-level", "INFO",
             "--kubelet-dir", "", "--http-endpoint", ""],
            work / "node.sock", work / "node.log", pyenv,
        )  # fmt: skip
        ctl = Proc(
            [*launch, "controller", "--endpoint", f"unix://{work}/ctl.sock", "--kubeconfig", str(kubeconfig),
             "--log-level", "WARNING"],
            work / "ctl.sock", work / "ctl.log", pyenv,
        )  # fmt: skip
        try:
            node.start()
            ctl.start()
            with grpc.insecure_channel(f"unix://{work}/ctl.sock") as ch:
                stub = csi_pb2_grpc.ControllerStub(ch)
                topo = csi_pb2.TopologyRequirement(
                    requisite=[csi_pb2.Topology(segments={KEY: NODE})],
                    preferred=[csi_pb2.Topology(segments={KEY: NODE})],
                )
                times: list[float] = []
                ids: list[str] = []
                for i in range(N):
                    req = csi_pb2.CreateVolumeRequest(
                        name=f"pvc-bench-{i}",
                        capacity_range=csi_pb2.CapacityRange(required_bytes=8 * model.MiB),
                        volume_capabilities=[CAP],
                        accessibility_requirements=topo,
                    )
                    t0 = time.perf_counter()
                    ids.append(stub.CreateVolume(req).volume.volume_id)
                    times.append((time.perf_counter() - t0) * 1000)
                for vid in ids:
                    stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
            p50 = pct(times, 50)
            print(
                f"create    CreateVolume via CRs: n={N} p50={p50:.1f} ms p95={pct(times, 95):.1f} ms "
                f"(target < 250 ms: {'met' if p50 < 250 else 'MISSED'})"
            )

            api = client_mod.Client(env.api_client())
            dl = deadline_mod.Deadline.after(600)
            t0 = time.perf_counter()
            for i in range(MANY):
                spec = res.VolumeSpec(
                    node_name=NODE, pool="p", size_bytes=model.MiB, access_type=res.AccessType.BLOCK
                )
                api.create(res.ThinVolume(meta=res.Meta(name=f"v-many-{i:04d}"), spec=spec), deadline=dl)
            made = time.perf_counter() - t0
            t0 = time.perf_counter()
            while ready(api, dl) < MANY:
                time.sleep(1.0)  # a bench's progress check, not product code
            reconciled = time.perf_counter() - t0
            print(
                f"          {MANY} ThinVolumes written in {made:.1f} s; "
                f"the running agent made their devices in {reconciled:.1f} s"
            )

            node.stop()
            node.start()
            volumes, seconds = started_seconds(node.log)
            assert node.popen is not None
            rss = rss_mib(node.popen.pid)
            ok = seconds < 5 and rss < 150
            print(
                f"start-up  agent over {volumes} ThinVolumes: list + reconcile {seconds:.2f} s, "
                f"RSS {rss:.0f} MiB (targets < 5 s, < 150 MiB: {'met' if ok else 'MISSED'})"
            )
            for v in api.list(res.ThinVolume, deadline=dl, node=NODE)[0]:
                api.delete(res.ThinVolume, v.name, deadline=dl)
        finally:
            ctl.stop()
            node.stop()
            problems = demo.cleanup(work, cfg)
        if problems:
            print("cleanup:", problems, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
