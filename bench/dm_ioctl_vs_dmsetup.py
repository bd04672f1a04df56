"""DM ioctl client vs dmsetup execs, side by side in one VM boot, on the same loop-backed thin pool.

Why csi_thin.dm.ioctl exists: every dmsetup call is a fork+exec (plus libdevmapper start-up), which
costs tens of milliseconds under emulation and real milliseconds on busy nodes; the ioctl itself
costs microseconds. This measures the four steps the dm-thin backend does most:

  create+load+resume   activate a thin device (dmsetup: one `create --table` exec)
  message              a pool message (set_transaction_id)
  status               the pool's status line
  remove               deactivate the thin device

Prints p50/p95 in milliseconds per step and the dmsetup/ioctl ratio. Needs real dm-thin: run it in
the VM (`make bench`, or `vm/run.sh -- .venv/bin/python bench/dm_ioctl_vs_dmsetup.py`).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from csi_thin.dm import ioctl, loop

N = int(os.environ.get("BENCH_N", "40"))
MiB = 1024 * 1024
DMS = ["dmsetup", "--noudevsync", "--noudevrules"]
STEPS = ("create+load+resume", "message", "status", "remove")


def sh(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def timed(samples: dict[str, list[float]], step: str, fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    fn()
    samples.setdefault(step, []).append((time.perf_counter() - t0) * 1000)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    base = pathlib.Path("/scratch") if os.path.isdir("/scratch") else pathlib.Path(tempfile.gettempdir())
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-dm-", dir=base))
    meta_file, data_file = work / "meta", work / "data"
    for path, size in ((meta_file, 8 * MiB), (data_file, 256 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    meta, data = loop.attach(str(meta_file)), loop.attach(str(data_file))
    ctl = ioctl.Control()
    pool = "bench-dm-pool"
    ctl.create(pool)
    ctl.load(pool, [ioctl.Target(0, 256 * MiB // 512, "thin-pool", f"{meta} {data} 128 0 0")])
    ctl.resume(pool)
    ctl.message(pool, "create_thin 0")
    thin_table = f"0 {16 * MiB // 512} thin /dev/mapper/{pool} 0"
    txid = 0

    io: dict[str, list[float]] = {}
    dms: dict[str, list[float]] = {}
    try:
        for _ in range(N):
            # ioctl
            timed(
                io,
                STEPS[0],
                lambda: (
                    ctl.create("bench-thin"),
                    ctl.load(
                        "bench-thin", [ioctl.Target(0, 16 * MiB // 512, "thin", f"/dev/mapper/{pool} 0")]
                    ),
                    ctl.resume("bench-thin"),
                ),
            )
            timed(io, STEPS[1], lambda t=txid: ctl.message(pool, f"set_transaction_id {t} {t + 1}"))
            txid += 1
            timed(io, STEPS[2], lambda: ctl.status(pool))
            timed(io, STEPS[3], lambda: ctl.remove("bench-thin"))
            # the same through dmsetup
            timed(dms, STEPS[0], lambda: sh([*DMS, "create", "bench-thin", "--table", thin_table]))
            timed(
                dms,
                STEPS[1],
                lambda t=txid: sh([*DMS, "message", pool, "0", f"set_transaction_id {t} {t + 1}"]),
            )
            txid += 1
            timed(dms, STEPS[2], lambda: sh([*DMS, "status", pool]))
            timed(dms, STEPS[3], lambda: sh([*DMS, "remove", "bench-thin"]))
    finally:
        for name in ("bench-thin", pool):
            if ctl.info(name) is not None:
                ctl.remove(name)
        loop.detach(meta)
        loop.detach(data)
        for path in (meta_file, data_file):
            path.unlink()
        work.rmdir()

    print(f"dm ioctl vs dmsetup, N={N} per step, kernel {os.uname().release}")
    head = ("step", "ioctl p50", "ioctl p95", "dmsetup p50", "dmsetup p95", "ratio p50")
    print(f"{head[0]:<20} {head[1]:>10} {head[2]:>10} {head[3]:>12} {head[4]:>12} {head[5]:>10}")
    for step in STEPS:
        i50, i95 = pct(io[step], 50), pct(io[step], 95)
        d50, d95 = pct(dms[step], 50), pct(dms[step], 95)
        print(f"{step:<20} {i50:>8.2f}ms {i95:>8.2f}ms {d50:>10.2f}ms {d95:>10.2f}ms {d50 / i50:>9.1f}x")
    total_io = sum(pct(io[s], 50) for s in STEPS)
    total_dms = sum(pct(dms[s], 50) for s in STEPS)
    ratio = total_dms / total_io
    print(
        f"{'all four (p50 sum)':<20} {total_io:>8.2f}ms {'':>10} {total_dms:>10.2f}ms {'':>12} {ratio:>9.1f}x"
    )


if __name__ == "__main__":
    main()
