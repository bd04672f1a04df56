"""Pool operations side by side, in one VM boot, on loop-backed pools of the same size:

  engine   csi_thin's PoolEngine on the dm-thin backend (journal, txid fence, LMDB, DM ioctls)
  dmsetup  the same kernel steps as bare `dmsetup` commands (no journal, no records)
  lvm      LVM thin (`lvcreate -V`, `lvcreate -s`, `lvremove`) from Debian's lvm2

Like with like: each operation leaves the same devices active in all three, checked after every
sample (outside the timing). `create` activates nothing (`lvcreate -an`); `create + activate` is
the engine's create then activate against `dmsetup` create_thin + a thin table, and against plain
`lvcreate -V`, which activates the new LV. LVM thin snapshots are created inactive (LVM's
activation-skip flag), like the engine's; a keeper LV holds LVM's pool active throughout, as the
engine's pool is. Loop devices use direct IO in all three (the engine's default).

Everything (LMDB, the pools' loop files, LVM's metadata) sits on CSI_THIN_VM_DISK when set (`make
bench` attaches a virtio disk: fsyncs reach a real disk), else on tmpfs, where fsyncs cost nothing
(printed). The engine's share of time in fsync-family calls is traced (bench/synctrace.py).

Exits non-zero when a target is missed (issue 3): engine <= 1.5x bare dmsetup and LVM >= 10x the
engine, p50, every operation. Run with `make bench` (needs real dm-thin, so it boots the VM).
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

import synctrace

from csi_thin import app, config, deadline, model
from csi_thin.pool import engine

N = int(os.environ.get("BENCH_N", "25"))
POOL_SIZE = "2GiB"
VOL = 64 * model.MiB
OPS = ("create", "create + activate", "snapshot, inactive origin", "snapshot, active origin", "delete")
MAX_ENGINE_VS_DMSETUP = 1.5
MIN_LVM_VS_ENGINE = 10.0
DMS = ["dmsetup", "--noudevsync", "--noudevrules"]
LVM_CONF = (
    "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } "
    "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 } "
    "global { use_lvmetad = 0 }"
)

Windows = dict[str, list[tuple[float, float]]]


def sh(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def timed(windows: Windows, op: str, fn: Callable[[], object]) -> None:
    t0 = time.monotonic()
    fn()
    windows.setdefault(op, []).append((t0, time.monotonic()))


def dm_active(name: str) -> bool:
    return subprocess.run([*DMS, "info", name], capture_output=True, check=False).returncode == 0


def expect(what: str, active: bool, want: bool) -> None:
    if active != want:
        raise RuntimeError(f"bench: {what} is {'active' if active else 'inactive'}, expected otherwise")


def bench_engine(work: pathlib.Path, disk: str | None) -> tuple[Windows, synctrace.Traced | None]:
    cfg = config.pool_from_dict(
        {
            "name": "bench",
            "backend": "dmthin",
            "state_dir": str(work / "state"),
            "dmthin": {"data_file": str(work / "data.img"), "data_size": POOL_SIZE},
        }
    )
    dl = deadline.Deadline.after(3600)
    # traced from after the store opened: its O_DSYNC descriptors are known then
    with app.open_engine(cfg, deadline=dl) as eng, synctrace.traced([os.getpid()], disk) as trace:
        w = _engine_ops(eng, dl)
        traced = trace.collect() if trace else None
    app.destroy(cfg, deadline=dl)
    if traced is not None and not traced.syncs:
        raise RuntimeError("bench: no LMDB sync traced, though every engine mutation commits to LMDB")
    return w, traced


def traced_run(
    fn: Callable[[pathlib.Path], Windows], disk: str | None
) -> Callable[[pathlib.Path], tuple[Windows, synctrace.Traced | None]]:
    def run(work: pathlib.Path) -> tuple[Windows, synctrace.Traced | None]:
        with synctrace.traced([], disk) as trace:
            w = fn(work)
            return w, trace.collect() if trace else None

    return run


def _engine_ops(eng: engine.PoolEngine, dl: deadline.Deadline) -> Windows:
    w: Windows = {}

    def active(name: str) -> bool:
        dev = eng.get(name)
        return dev is not None and dev.active

    for i in range(N):
        timed(w, OPS[0], lambda i=i: eng.create_volume(f"v{i}", VOL, deadline=dl))
        expect(f"v{i}", active(f"v{i}"), False)
        timed(
            w,
            OPS[1],
            lambda i=i: (eng.create_volume(f"w{i}", VOL, deadline=dl), eng.activate(f"w{i}", deadline=dl)),
        )
        expect(f"w{i}", active(f"w{i}"), True)
        eng.deactivate(f"w{i}", deadline=dl)
        timed(w, OPS[2], lambda i=i: eng.create_snapshot(f"s{i}", f"v{i}", deadline=dl))
        expect(f"s{i}", active(f"s{i}"), False)
        eng.activate(f"v{i}", deadline=dl)
        timed(w, OPS[3], lambda i=i: eng.create_snapshot(f"a{i}", f"v{i}", deadline=dl))
        expect(f"a{i}", active(f"a{i}"), False)
        eng.deactivate(f"v{i}", deadline=dl)
    for i in range(N):
        timed(w, OPS[4], lambda i=i: eng.delete(f"s{i}", deadline=dl))
        for name in (f"a{i}", f"v{i}", f"w{i}"):
            eng.delete(name, deadline=dl)
    return w


def losetup(path: pathlib.Path) -> str:
    return sh(["losetup", "--direct-io=on", "-f", "--show", str(path)]).strip()


def bench_dmsetup(work: pathlib.Path) -> Windows:
    data = work / "data.img"
    meta = work / "meta.img"
    subprocess.run(["truncate", "-s", POOL_SIZE.replace("iB", ""), str(data)], check=True)
    subprocess.run(["truncate", "-s", "64M", str(meta)], check=True)
    dloop, mloop = losetup(data), losetup(meta)
    sectors = int(sh(["blockdev", "--getsz", dloop]))
    pool = "bench-bare-pool"
    sh([*DMS, "create", pool, "--table", f"0 {sectors} thin-pool {mloop} {dloop} 128 0"])
    msg = [*DMS, "message", pool, "0"]

    def thin_table(dev_id: int) -> str:
        return f"0 {VOL // 512} thin /dev/mapper/{pool} {dev_id}"

    w: Windows = {}
    for i in range(N):
        vid, wid, sid, aid = 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4
        timed(w, OPS[0], lambda vid=vid: sh([*msg, f"create_thin {vid}"]))
        expect(f"thin {vid}", dm_active(f"bench-bare-{vid}"), False)
        timed(
            w,
            OPS[1],
            lambda wid=wid: (
                sh([*msg, f"create_thin {wid}"]),
                sh([*DMS, "create", f"bench-bare-{wid}", "--table", thin_table(wid)]),
            ),
        )
        expect(f"thin {wid}", dm_active(f"bench-bare-{wid}"), True)
        sh([*DMS, "remove", f"bench-bare-{wid}"])
        timed(w, OPS[2], lambda vid=vid, sid=sid: sh([*msg, f"create_snap {sid} {vid}"]))
        name = f"bench-bare-{vid}"
        sh([*DMS, "create", name, "--table", thin_table(vid)])

        def active_snap(name: str = name, vid: int = vid, aid: int = aid) -> None:
            sh([*DMS, "suspend", name])
            try:
                sh([*msg, f"create_snap {aid} {vid}"])
            finally:
                sh([*DMS, "resume", name])

        timed(w, OPS[3], active_snap)
        sh([*DMS, "remove", name])
    for i in range(N):
        vid, wid, sid, aid = 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4
        timed(w, OPS[4], lambda sid=sid: sh([*msg, f"delete {sid}"]))
        for dev_id in (aid, vid, wid):
            sh([*msg, f"delete {dev_id}"])
    sh([*DMS, "remove", pool])
    sh(["losetup", "-d", dloop, mloop])
    return w


def bench_lvm(work: pathlib.Path) -> Windows:
    data = work / "lvm.img"
    subprocess.run(["truncate", "-s", "3G", str(data)], check=True)
    loop = losetup(data)
    c = ["--config", LVM_CONF]
    vg = "benchvg"
    sh(["vgcreate", *c, "-q", vg, loop])
    pool_size = POOL_SIZE.replace("iB", "")
    sh(["lvcreate", *c, "-q", "--type", "thin-pool", "-L", pool_size, "--chunksize", "64k", "-n", "tp", vg])
    thin = ["lvcreate", *c, "-q", "-V", f"{VOL}b", "-T", f"{vg}/tp"]
    # an active thin LV keeps LVM's pool active, as the engine's pool is, for the whole run
    sh([*thin, "-n", "keeper"])
    expect("keeper", dm_active(f"{vg}-keeper"), True)
    w: Windows = {}
    for i in range(N):
        v = f"{vg}/v{i}"
        timed(w, OPS[0], lambda i=i: sh([*thin, "-an", "-n", f"v{i}"]))
        expect(v, dm_active(f"{vg}-v{i}"), False)
        timed(w, OPS[1], lambda i=i: sh([*thin, "-n", f"w{i}"]))
        expect(f"{vg}/w{i}", dm_active(f"{vg}-w{i}"), True)
        sh(["lvchange", *c, "-q", "-an", f"{vg}/w{i}"])
        timed(w, OPS[2], lambda v=v, i=i: sh(["lvcreate", *c, "-q", "-s", v, "-n", f"s{i}"]))
        expect(f"{vg}/s{i}", dm_active(f"{vg}-s{i}"), False)
        sh(["lvchange", *c, "-q", "-ay", v])
        timed(w, OPS[3], lambda v=v, i=i: sh(["lvcreate", *c, "-q", "-s", v, "-n", f"a{i}"]))
        expect(f"{vg}/a{i}", dm_active(f"{vg}-a{i}"), False)
        sh(["lvchange", *c, "-q", "-an", v])
    for i in range(N):
        timed(w, OPS[4], lambda i=i: sh(["lvremove", *c, "-q", "-y", f"{vg}/s{i}"]))
        sh(["lvremove", *c, "-q", "-y", f"{vg}/a{i}", f"{vg}/v{i}", f"{vg}/w{i}"])
    sh(["vgremove", *c, "-q", "-y", "-ff", vg])
    sh(["losetup", "-d", loop])
    return w


def ms(windows: list[tuple[float, float]]) -> list[float]:
    return [(t1 - t0) * 1000 for t0, t1 in windows]


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def where(base: pathlib.Path) -> str:
    if os.environ.get("CSI_THIN_VM_DISK"):
        return f"on a virtio disk (ext4 at {base}): fsyncs reach the host's disk"
    return f"on {base} (tmpfs?): fsyncs cost nothing here; `make bench` puts them on a disk"


def exec_ms() -> float:
    """How fast this machine is right now: p50 of one fork+exec of `true` (about 70 ms in a quiet VM
    under TCG); a loaded host shows here first."""
    samples = []
    for _ in range(10):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> int:
    if not os.path.exists("/dev/mapper/control"):
        print("bench: needs device-mapper (run `make bench`, which boots the VM)", file=sys.stderr)
        return 2
    disk = os.environ.get("CSI_THIN_VM_DISK")
    base = pathlib.Path(disk or ("/scratch" if os.path.isdir("/scratch") else tempfile.gettempdir()))
    with open("/proc/loadavg", encoding="ascii") as f:
        load = " ".join(f.read().split()[:3])
    speed = exec_ms()
    results: dict[str, Windows] = {}
    shares: dict[str, dict[str, synctrace.Share]] = {}
    benches: dict[str, Callable[[pathlib.Path], tuple[Windows, synctrace.Traced | None]]] = {
        "engine": lambda work: bench_engine(work, disk),
        "dmsetup": traced_run(bench_dmsetup, disk),
        "lvm": traced_run(bench_lvm, disk),
    }
    for label, fn in benches.items():
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{label}-", dir=base))
        t0 = time.perf_counter()
        results[label], traced = fn(work)
        if traced is not None:
            shares[label] = {op: traced.share(results[label][op]) for op in OPS}
        shutil.rmtree(work, ignore_errors=True)
        print(f"bench: {label} done in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"\npool operations, N={N} each, {POOL_SIZE} loop-backed pools, 64 KiB blocks, p50/p95 (ms)")
    print(f"state and loop files {where(base)}; guest load average at start: {load}; exec p50 {speed:.0f} ms")
    print(f"{'operation':<27}{'engine':>15}{'dmsetup':>15}{'lvm':>15}{'eng/dms':>9}{'lvm/eng':>9}")
    missed: list[str] = []
    for op in OPS:
        e, d, lv = (ms(results[k][op]) for k in ("engine", "dmsetup", "lvm"))
        e_d, lv_e = pct(e, 50) / pct(d, 50), pct(lv, 50) / pct(e, 50)
        print(
            f"{op:<27}{pct(e, 50):7.1f}/{pct(e, 95):<7.1f}{pct(d, 50):7.1f}/{pct(d, 95):<7.1f}"
            f"{pct(lv, 50):7.1f}/{pct(lv, 95):<7.1f}{e_d:8.2f}x{lv_e:8.1f}x"
        )
        if e_d > MAX_ENGINE_VS_DMSETUP:
            missed.append(f"{op}: engine/dmsetup {e_d:.2f}x > {MAX_ENGINE_VS_DMSETUP}x")
        if lv_e < MIN_LVM_VS_ENGINE:
            missed.append(f"{op}: lvm/engine {lv_e:.1f}x < {MIN_LVM_VS_ENGINE}x")
    print(
        "active after each op, all three: create none; create + activate the new device; snapshots "
        "none (the active-origin one leaves its origin active); delete of an inactive snapshot"
    )
    if shares:
        print(
            "\nwhere the time goes (traced, share of each op's time): the engine's LMDB syncs (fsync/"
            "fdatasync/O_DSYNC writes) and syncs per op; a flush in flight on the disk (LMDB's and "
            "dm-thin's metadata commits); any request in flight on the disk"
        )
        print(
            f"{'operation':<27}{'eng LMDB sync':>14}{'syncs/op':>9}"
            f"{'flush: eng':>12}{'dms':>6}{'lvm':>6}{'disk: eng':>11}{'dms':>6}{'lvm':>6}"
        )
        for op in OPS:
            e_s, d_s, l_s = (shares[k][op] for k in ("engine", "dmsetup", "lvm"))
            print(
                f"{op:<27}{e_s.fraction:14.0%}{e_s.per_op:9.1f}{e_s.flush_fraction:12.0%}"
                f"{d_s.flush_fraction:6.0%}{l_s.flush_fraction:6.0%}{e_s.disk_fraction:11.0%}"
                f"{d_s.disk_fraction:6.0%}{l_s.disk_fraction:6.0%}"
            )
    print(
        "targets (p50, every operation): "
        f"engine/dmsetup <= {MAX_ENGINE_VS_DMSETUP}x, lvm/engine >= {MIN_LVM_VS_ENGINE}x"
    )
    for line in missed:
        print(f"target NOT met: {line}")
    if missed:
        return 1
    print("targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
