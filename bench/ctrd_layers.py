"""containerd image layers on csi-thin: Prepare + Commit of one layer, as containerd does it for
every layer it unpacks, side by side in one run with the same kernel steps as bare dmsetup commands
and with the seed's published figure (containerd's devmapper snapshotter: about 0.14 s per layer on
a loop pool, issue 13).

  csi-thin  `csi-thin snapshotter` over its unix socket, through gRPC as containerd's proxy client
            calls it: Prepare(key, parent) (a journalled snapshot of the committed parent, activated,
            mounts returned), Commit(name, key) (the layer committed and deactivated)
  dmsetup   `create_snap <id> <parent id>` + `dmsetup create` of the thin table (Prepare), `dmsetup
            remove` (Commit): what the kernel has to do, with no records, journal or fence

Each sample is one layer on top of the previous one (a chain, like an image's layers); the first
layer of a chain (a new device and its mkfs, csi-thin only) is timed on its own. Needs real dm-thin:
`make bench` runs it in the VM, pools and LMDB on the VM's virtio disk (CSI_THIN_VM_DISK). Natively
(no device-mapper) it measures csi-thin on a reflink pool alone: no dmsetup side, no target.

Exits non-zero when csi-thin's per-layer p50 is more than 1.5x bare dmsetup's (issue 3's target
for the engine against dmsetup).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from csi_thin.snapshotter.pb import snapshots_pb2, snapshots_pb2_grpc
from tests import snapshotterenv

N = int(os.environ.get("BENCH_N", "25"))
SEED_S_PER_LAYER = 0.14
MAX_VS_DMSETUP = 1.5
MiB = 1024 * 1024
LAYER = 64 * MiB  # the snapshotter's base_image_size below, and the dmsetup side's thin devices
DMS = ["dmsetup", "--noudevsync", "--noudevrules"]
NAME = "ctrd-bench"  # the snapshotter's name in each request (a proxy plugin's name in containerd)


def sh(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def csi_thin_layers(work: pathlib.Path, *, dmthin: bool) -> tuple[float, list[float]]:
    """Seconds for the first layer (new device + mkfs), and per layer for the N on top of it."""
    make_pool = snapshotterenv.dmthin_pool if dmthin else snapshotterenv.reflink_pool
    pool = make_pool(work, name="ctrd-bench", base_image_size=f"{LAYER // MiB}MiB")
    layers: list[float] = []
    with (
        snapshotterenv.snapshotter(work, pool) as sock,
        grpc.insecure_channel(f"unix://{sock}") as channel,
    ):
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)

        def layer(key: str, parent: str, name: str) -> float:
            t0 = time.perf_counter()
            stub.Prepare(
                snapshots_pb2.PrepareSnapshotRequest(snapshotter=NAME, key=key, parent=parent), timeout=120
            )
            stub.Commit(
                snapshots_pb2.CommitSnapshotRequest(snapshotter=NAME, name=name, key=key), timeout=120
            )
            return time.perf_counter() - t0

        first = layer("active-0", "", "layer-0")
        for i in range(1, N + 1):
            layers.append(layer(f"active-{i}", f"layer-{i - 1}", f"layer-{i}"))
        # leaves first: a parent with children cannot go
        for i in range(N, -1, -1):
            stub.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=NAME, key=f"layer-{i}"), timeout=120)
    return first, layers


def dmsetup_layers(work: pathlib.Path) -> list[float]:
    """Per layer: create_snap of the previous (inactive) layer + activate; then deactivate."""
    data, meta = work / "data.img", work / "meta.img"
    for path, size in ((data, 2048 * MiB), (meta, 16 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    loops = [sh(["losetup", "--find", "--show", "--direct-io=on", str(f)]).strip() for f in (meta, data)]
    pool = "ctrd-bench-dms"
    sectors = 2048 * MiB // 512
    layers: list[float] = []
    try:
        sh([*DMS, "create", pool, "--table", f"0 {sectors} thin-pool {loops[0]} {loops[1]} 128 0 0"])
        sh([*DMS, "message", pool, "0", "create_thin 0"])
        for i in range(1, N + 1):
            table = f"0 {LAYER // 512} thin /dev/mapper/{pool} {i}"
            t0 = time.perf_counter()
            sh([*DMS, "message", pool, "0", f"create_snap {i} {i - 1}"])
            sh([*DMS, "create", f"{pool}-{i}", "--table", table])
            sh([*DMS, "remove", f"{pool}-{i}"])
            layers.append(time.perf_counter() - t0)
    finally:
        subprocess.run([*DMS, "remove", pool], capture_output=True, check=False)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        data.unlink()
        meta.unlink()
    return layers


def main() -> int:
    dmthin = os.path.exists("/dev/mapper/control")
    base = pathlib.Path(os.environ.get("CSI_THIN_VM_DISK") or tempfile.gettempdir())
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctrd-", dir=base))
    first, ours = csi_thin_layers(work / "sn", dmthin=dmthin)
    bare = dmsetup_layers(work) if dmthin else []
    shutil.rmtree(work)  # the pool is destroyed, its LMDB and config remain

    where = "dm-thin" if dmthin else "reflink (no device-mapper here: csi-thin alone)"
    print(f"containerd layers, Prepare+Commit per layer, N={N} on {where}, kernel {os.uname().release}")
    print(f"{'':<34} {'p50':>9} {'p95':>9}")
    rows = [("csi-thin (gRPC, one layer)", ours)]
    if bare:
        rows.append(("bare dmsetup (same kernel steps)", bare))
    for label, values in rows:
        print(f"{label:<34} {p(values, 50) * 1000:>7.1f}ms {p(values, 95) * 1000:>7.1f}ms")
    print(f"{'seed (published, loop pool)':<34} {SEED_S_PER_LAYER * 1000:>7.1f}ms")
    print(f"first layer (new device + mkfs): {first * 1000:.1f} ms")
    print(f"csi-thin / seed: {p(ours, 50) / SEED_S_PER_LAYER:.2f}x")
    if not bare:
        return 0
    ratio = p(ours, 50) / p(bare, 50)
    verdict = "ok" if ratio <= MAX_VS_DMSETUP else "MISSED"
    print(f"csi-thin / bare dmsetup: {ratio:.2f}x (target <= {MAX_VS_DMSETUP}x): {verdict}")
    return 0 if ratio <= MAX_VS_DMSETUP else 1


if __name__ == "__main__":
    sys.exit(main())
