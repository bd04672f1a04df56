"""Pool operations side by side, in one VM boot, on loop-backed pools of the same size:

  engine   csi_thin's PoolEngine on the dm-thin backend (journal, txid fence, LMDB, DM ioctls)
  dmsetup  the same kernel steps as bare `dmsetup` commands (no journal, no records)
  lvm      LVM thin (`lvcreate --thin`, `lvcreate -s`, `lvremove`) from Debian's lvm2

Prints p50/p95 per operation and the ratios. Targets (issue 3): engine <= 1.5x bare dmsetup and
>= 10x faster than LVM. Run with `make bench` (needs real dm-thin, so it boots the VM).
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
from collections.abc import Callable

from csi_thin import app, config, deadline, model
from csi_thin.pool import engine

N = int(os.environ.get("BENCH_N", "25"))
POOL_SIZE = "2GiB"
VOL = 64 * model.MiB
OPS = ("create", "snapshot (inactive origin)", "snapshot (active origin)", "delete")
DMS = ["dmsetup", "--noudevsync", "--noudevrules"]
LVM_CONF = (
    "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } "
    "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 } "
    "global { use_lvmetad = 0 }"
)


def sh(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def timed(samples: dict[str, list[float]], op: str, fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    fn()
    samples.setdefault(op, []).append((time.perf_counter() - t0) * 1000)


def bench_engine(work: pathlib.Path) -> dict[str, list[float]]:
    cfg = config.pool_from_dict(
        {
            "name": "bench",
            "backend": "dmthin",
            "state_dir": str(work / "state"),
            "dmthin": {"data_file": str(work / "data.img"), "data_size": POOL_SIZE},
        }
    )
    dl = deadline.Deadline.after(3600)
    with app.open_engine(cfg, deadline=dl) as eng:
        samples = _engine_ops(eng, dl)
    app.destroy(cfg, deadline=dl)
    return samples


def _engine_ops(eng: engine.PoolEngine, dl: deadline.Deadline) -> dict[str, list[float]]:
    s: dict[str, list[float]] = {}
    for i in range(N):
        timed(s, OPS[0], lambda i=i: eng.create_volume(f"v{i}", VOL, deadline=dl))
        timed(s, OPS[1], lambda i=i: eng.create_snapshot(f"s{i}", f"v{i}", deadline=dl))
        eng.activate(f"v{i}", deadline=dl)
        timed(s, OPS[2], lambda i=i: eng.create_snapshot(f"a{i}", f"v{i}", deadline=dl))
        eng.deactivate(f"v{i}", deadline=dl)
    for i in range(N):
        timed(s, OPS[3], lambda i=i: eng.delete(f"s{i}", deadline=dl))
        eng.delete(f"a{i}", deadline=dl)
        eng.delete(f"v{i}", deadline=dl)
    return s


def bench_dmsetup(work: pathlib.Path) -> dict[str, list[float]]:
    data = work / "data.img"
    meta = work / "meta.img"
    subprocess.run(["truncate", "-s", POOL_SIZE.replace("iB", ""), str(data)], check=True)
    subprocess.run(["truncate", "-s", "64M", str(meta)], check=True)
    dloop = sh(["losetup", "-f", "--show", str(data)]).strip()
    mloop = sh(["losetup", "-f", "--show", str(meta)]).strip()
    sectors = int(sh(["blockdev", "--getsz", dloop]))
    pool = "bench-bare-pool"
    sh([*DMS, "create", pool, "--table", f"0 {sectors} thin-pool {mloop} {dloop} 128 0"])
    msg = [*DMS, "message", pool, "0"]
    s: dict[str, list[float]] = {}
    for i in range(N):
        vid, sid, aid = 3 * i + 1, 3 * i + 2, 3 * i + 3
        timed(s, OPS[0], lambda vid=vid: sh([*msg, f"create_thin {vid}"]))
        timed(s, OPS[1], lambda vid=vid, sid=sid: sh([*msg, f"create_snap {sid} {vid}"]))
        name = f"bench-bare-{vid}"
        sh([*DMS, "create", name, "--table", f"0 {VOL // 512} thin /dev/mapper/{pool} {vid}"])

        def active_snap(name: str = name, vid: int = vid, aid: int = aid) -> None:
            sh([*DMS, "suspend", name])
            try:
                sh([*msg, f"create_snap {aid} {vid}"])
            finally:
                sh([*DMS, "resume", name])

        timed(s, OPS[2], active_snap)
        sh([*DMS, "remove", name])
    for i in range(N):
        vid, sid, aid = 3 * i + 1, 3 * i + 2, 3 * i + 3
        timed(s, OPS[3], lambda sid=sid: sh([*msg, f"delete {sid}"]))
        sh([*msg, f"delete {aid}"])
        sh([*msg, f"delete {vid}"])
    sh([*DMS, "remove", pool])
    sh(["losetup", "-d", dloop, mloop])
    return s


def bench_lvm(work: pathlib.Path) -> dict[str, list[float]]:
    data = work / "lvm.img"
    subprocess.run(["truncate", "-s", "3G", str(data)], check=True)
    loop = sh(["losetup", "-f", "--show", str(data)]).strip()
    c = ["--config", LVM_CONF]
    vg = "benchvg"
    sh(["vgcreate", *c, "-q", vg, loop])
    sh(
        [
            "lvcreate",
            *c,
            "-q",
            "--type",
            "thin-pool",
            "-L",
            POOL_SIZE.replace("iB", ""),
            "--chunksize",
            "64k",
            "-n",
            "tp",
            vg,
        ]
    )
    s: dict[str, list[float]] = {}
    for i in range(N):
        v, sn, an = f"{vg}/v{i}", f"s{i}", f"a{i}"
        timed(
            s,
            OPS[0],
            lambda i=i: sh(["lvcreate", *c, "-q", "-V", f"{VOL}b", "-T", f"{vg}/tp", "-n", f"v{i}"]),
        )
        sh(["lvchange", *c, "-q", "-an", v])
        timed(s, OPS[1], lambda v=v, sn=sn: sh(["lvcreate", *c, "-q", "-s", v, "-n", sn]))
        sh(["lvchange", *c, "-q", "-ay", v])
        timed(s, OPS[2], lambda v=v, an=an: sh(["lvcreate", *c, "-q", "-s", v, "-n", an]))
        sh(["lvchange", *c, "-q", "-an", v])
    for i in range(N):
        timed(s, OPS[3], lambda i=i: sh(["lvremove", *c, "-q", "-y", f"{vg}/s{i}"]))
        sh(["lvremove", *c, "-q", "-y", f"{vg}/a{i}", f"{vg}/v{i}"])
    sh(["vgremove", *c, "-q", "-y", vg])
    sh(["losetup", "-d", loop])
    return s


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def main() -> int:
    if not os.path.exists("/dev/mapper/control"):
        print("bench: needs device-mapper (run `make bench`, which boots the VM)", file=sys.stderr)
        return 2
    base = pathlib.Path("/scratch" if os.path.isdir("/scratch") else tempfile.gettempdir())
    results: dict[str, dict[str, list[float]]] = {}
    for label, fn in (("engine", bench_engine), ("dmsetup", bench_dmsetup), ("lvm", bench_lvm)):
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{label}-", dir=base))
        t0 = time.perf_counter()
        results[label] = fn(work)
        shutil.rmtree(work, ignore_errors=True)
        print(f"bench: {label} done in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"\npool operations, N={N} each, {POOL_SIZE} loop-backed pool, 64 KiB blocks (ms)")
    print(
        f"{'operation':<28}{'engine p50/p95':>18}{'dmsetup p50/p95':>18}{'lvm p50/p95':>18}"
        f"{'engine/dmsetup':>16}{'lvm/engine':>12}"
    )
    for op in OPS:
        e, d, lv = (results[k][op] for k in ("engine", "dmsetup", "lvm"))
        print(
            f"{op:<28}{pct(e, 50):8.1f}/{pct(e, 95):<9.1f}{pct(d, 50):8.1f}/{pct(d, 95):<9.1f}"
            f"{pct(lv, 50):8.1f}/{pct(lv, 95):<9.1f}{pct(e, 50) / pct(d, 50):14.2f}x"
            f"{pct(lv, 50) / pct(e, 50):11.1f}x"
        )
    print("targets: engine/dmsetup <= 1.5x, lvm/engine >= 10x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
