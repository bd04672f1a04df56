"""CSI layer overhead, measured side by side in one run:

  csi     CreateVolume / CreateSnapshot / NodeStageVolume / DeleteVolume over a real gRPC channel
          (unix socket) to the standalone driver, plus concurrent CreateVolume throughput
  engine  the same pool work as direct PoolEngine calls in-process (no gRPC, no validation)

On dm-thin when the kernel has device-mapper (`make bench` runs it in the VM, under software
emulation), else on the reflink backend natively (`make bench-native`: real CPU speed).
Prints p50/p95 and the CSI/engine ratio. Target (issue 4): CreateVolume p50 < 50 ms standalone.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import statistics
import sys
import tempfile
import time

import grpc

from csi_thin import app, config, deadline, demo, model
from csi_thin.csi.pb import csi_pb2
from csi_thin.pool import engine

N = int(os.environ.get("BENCH_N", "25"))
CONCURRENCY = 8
OPS = ("CreateVolume", "CreateSnapshot", "NodeStageVolume", "DeleteVolume")
VOL = 64 * model.MiB


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def ms(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) * 1000


def bench_csi(work: pathlib.Path, backend: str) -> tuple[dict[str, list[float]], float]:
    cfg = demo.pool_config(work, backend)
    sock = work / "csi.sock"
    s: dict[str, list[float]] = {op: [] for op in OPS}
    with demo.driver(cfg, sock) as proc, grpc.insecure_channel(f"unix://{sock}") as ch:
        d = demo.Demo(ch)
        demo.wait_ready(d, proc)
        cap = csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )

        def create(name: str) -> csi_pb2.Volume:
            return d.create(name, VOL, cap)

        vols: list[csi_pb2.Volume] = []
        for i in range(N):
            t0 = time.perf_counter()
            vols.append(create(f"b{i}"))
            s["CreateVolume"].append((time.perf_counter() - t0) * 1000)
            s["CreateSnapshot"].append(
                ms(
                    lambda i=i: d.controller.CreateSnapshot(
                        csi_pb2.CreateSnapshotRequest(source_volume_id=vols[-1].volume_id, name=f"bs{i}")
                    )
                )
            )
            stage = work / f"stage{i}"
            s["NodeStageVolume"].append(ms(lambda v=vols[-1], stage=stage: d.stage(v, cap, stage)))
            d.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=vols[-1].volume_id, staging_target_path=str(stage))
            )
        for snap in d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries:
            d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot.snapshot_id))
        for v in vols:
            s["DeleteVolume"].append(
                ms(lambda v=v: d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id)))
            )
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as ex:
            created = list(ex.map(create, [f"c{i}" for i in range(4 * N)]))
        throughput = len(created) / (time.perf_counter() - t0)
        for v in created:
            d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    problems = demo.cleanup(work, cfg)
    if problems:
        raise RuntimeError(f"cleanup: {problems}")
    return s, throughput


def bench_engine(work: pathlib.Path, backend: str) -> dict[str, list[float]]:
    cfg = config.load_pool(str(demo.pool_config(work, backend)))
    dl = deadline.Deadline.after(3600)
    with app.open_engine(cfg, deadline=dl) as eng:
        samples = _engine_ops(eng, dl)
    app.destroy(cfg, deadline=dl)
    return samples


def _engine_ops(eng: engine.PoolEngine, dl: deadline.Deadline) -> dict[str, list[float]]:
    s: dict[str, list[float]] = {op: [] for op in OPS}
    for i in range(N):
        s["CreateVolume"].append(ms(lambda i=i: eng.create_volume(f"b{i}", VOL, deadline=dl)))
        s["CreateSnapshot"].append(ms(lambda i=i: eng.create_snapshot(f"bs{i}", f"b{i}", deadline=dl)))
        s["NodeStageVolume"].append(ms(lambda i=i: eng.activate(f"b{i}", deadline=dl)))
        eng.deactivate(f"b{i}", deadline=dl)
    for i in range(N):
        eng.delete(f"bs{i}", deadline=dl)
        s["DeleteVolume"].append(ms(lambda i=i: eng.delete(f"b{i}", deadline=dl)))
    return s


def main() -> int:
    backend = "dmthin" if os.path.exists("/dev/mapper/control") else "reflink"
    where = "in the VM (software emulation)" if os.environ.get("CSI_THIN_IN_VM") else "native"
    base = "/scratch" if os.path.isdir("/scratch") else None
    e = bench_engine(pathlib.Path(tempfile.mkdtemp(prefix="bench-eng-", dir=base)), backend)
    c, throughput = bench_csi(pathlib.Path(tempfile.mkdtemp(prefix="bench-csi-", dir=base)), backend)
    print(f"\nCSI over gRPC vs engine alone, N={N}, block volumes of 64 MiB, {backend} {where} (ms)")
    print(f"{'operation':<18}{'csi p50/p95':>18}{'engine p50/p95':>18}{'csi/engine':>12}")
    for op in OPS:
        cp50, ep50 = pct(c[op], 50), pct(e[op], 50)
        cells = f"{cp50:8.1f}/{pct(c[op], 95):<9.1f}{ep50:8.1f}/{pct(e[op], 95):<9.1f}"
        print(f"{op:<18}{cells}{cp50 / ep50:10.2f}x")
    print(f"concurrent CreateVolume ({CONCURRENCY} clients): {throughput:.1f} volumes/s")
    print(f"target: CreateVolume p50 < 50 ms -> {'met' if pct(c['CreateVolume'], 50) < 50 else 'NOT met'}")
    print("(NodeStageVolume of a block volume vs engine.activate: the CSI side adds the bind/validation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
