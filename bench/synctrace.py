"""Time the measured operations spend waiting for durable writes, from the kernel's own tracepoints
(ftrace): nothing is injected into the measured processes, so their timings stand.

Three views, each attributed to the timed operation windows (CLOCK_MONOTONIC, the `mono` trace
clock) it overlaps:
  syncs    fsync, fdatasync and msync calls, and pwrite64 on the file descriptors of the measured
           processes opened with O_DSYNC (LMDB writes its meta page that way after the fdatasync of
           its data pages: two durable writes per write transaction). The process's own share.
  flushes  cache flushes and FUA writes in flight on the disk (block layer, rwbs with an F): LMDB's
           syncs reach it, and so do dm-thin's metadata commits (through the loop device and the
           disk's filesystem), which are kernel work no syscall of ours shows.
  disk     any request in flight on the disk (flushes included): all the time the disk was busy.

Not a benchmark itself (`make bench` skips it). Used only inside the throw-away VM (`usable()`):
tracing is global kernel state, not a bench's to change on a shared host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
from collections.abc import Iterable, Iterator

TRACEFS = "/sys/kernel/tracing"
SYNC_CALLS = ("fsync", "fdatasync", "msync")
O_DSYNC = 0o10000
_SYSCALL = re.compile(r"-(\d+)\s+\[\d+\]\s.*?(\d+\.\d+): sys_(\w+)(\(| -> )")
# issue: "maj,min rwbs bytes (cmd) sector + nr [comm]"; complete: "maj,min rwbs (cmd) sector + nr [err]"
_BLOCK = re.compile(
    r"(\d+\.\d+): block_rq_(issue|complete): (\d+),(\d+) (\S+) (?:\d+ )?\(.*?\) (\d+) \+ (\d+)"
)

Interval = tuple[float, float]


def usable() -> bool:
    return bool(os.environ.get("CSI_THIN_IN_VM")) and os.geteuid() == 0


@contextlib.contextmanager
def traced(pids: Iterable[int], disk: str | None) -> Iterator[Trace | None]:
    """A Trace of the syncs of `pids` and of the flushes on the disk under path `disk`, where usable
    (the VM), else None."""
    if not usable():
        yield None
        return
    with Trace(pids, disk) as trace:
        yield trace


@dataclasses.dataclass(frozen=True)
class Share:
    ops: int
    op_seconds: float
    sync_seconds: float
    syncs: int
    flush_seconds: float
    disk_seconds: float

    @property
    def fraction(self) -> float:
        return self.sync_seconds / self.op_seconds if self.op_seconds else 0.0

    @property
    def per_op(self) -> float:
        return self.syncs / self.ops if self.ops else 0.0

    @property
    def flush_fraction(self) -> float:
        return self.flush_seconds / self.op_seconds if self.op_seconds else 0.0

    @property
    def disk_fraction(self) -> float:
        return self.disk_seconds / self.op_seconds if self.op_seconds else 0.0


@dataclasses.dataclass(frozen=True)
class Traced:
    syncs: list[Interval]
    flushes: list[Interval]  # merged: no two overlap
    disk: list[Interval]  # merged

    def share(self, windows: list[Interval]) -> Share:
        """How much of the windows' time the syncs, the flushes and any disk IO took (overlap), and
        how many syncs started in them."""
        sync = 0.0
        count = 0
        for w0, w1 in windows:
            for c0, c1 in self.syncs:
                sync += max(0.0, min(w1, c1) - max(w0, c0))
                count += w0 <= c0 < w1
        return Share(
            len(windows),
            sum(w1 - w0 for w0, w1 in windows),
            sync,
            count,
            _overlap(windows, self.flushes),
            _overlap(windows, self.disk),
        )


def _overlap(windows: list[Interval], merged: list[Interval]) -> float:
    return sum(max(0.0, min(w1, b) - max(w0, a)) for w0, w1 in windows for a, b in merged)


def dsync_fds(pid: int) -> list[int]:
    """File descriptors of `pid` opened with O_DSYNC (O_SYNC includes it)."""
    out = []
    base = f"/proc/{pid}/fdinfo"
    for name in os.listdir(base):
        try:
            with open(f"{base}/{name}", encoding="ascii") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (FileNotFoundError, StopIteration):
            continue
        if flags & O_DSYNC:
            out.append(int(name))
    return sorted(out)


def _put(path: str, value: str) -> None:
    with open(f"{TRACEFS}/{path}", "w", encoding="ascii") as f:
        f.write(value)


def _merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class Trace:
    """Syncs and disk flushes traced while the context is open; `collect()` returns and clears what
    was traced so far."""

    def __init__(self, pids: Iterable[int], disk: str | None) -> None:
        self._fds = sorted({fd for pid in pids for fd in dsync_fds(pid)})
        self._events = [f"syscalls/sys_{edge}_{call}" for call in SYNC_CALLS for edge in ("enter", "exit")]
        if self._fds:
            self._events += ["syscalls/sys_enter_pwrite64", "syscalls/sys_exit_pwrite64"]
        self._disk: tuple[int, int] | None = None
        if disk:
            dev = os.stat(disk).st_dev
            self._disk = (os.major(dev), os.minor(dev))
            self._events += ["block/block_rq_issue", "block/block_rq_complete"]

    def __enter__(self) -> Trace:
        if not os.path.exists(f"{TRACEFS}/trace"):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
        _put("tracing_on", "0")
        _put("trace_clock", "mono")
        _put("buffer_size_kb", "65536")
        _put("trace", "")
        if self._fds:
            _put("events/syscalls/sys_enter_pwrite64/filter", " || ".join(f"fd == {fd}" for fd in self._fds))
        if self._disk:
            # only the disk's requests (not the loop devices' nor the thin devices' above it)
            major, minor = self._disk
            only = f"dev == {(major << 20) | minor}"
            for event in ("block/block_rq_issue", "block/block_rq_complete"):
                _put(f"events/{event}/filter", only)
        for event in self._events:
            _put(f"events/{event}/enable", "1")
        _put("tracing_on", "1")
        return self

    def __exit__(self, *exc: object) -> None:
        _put("tracing_on", "0")
        for event in self._events:
            _put(f"events/{event}/enable", "0")
        for event in self._events:
            _put(f"events/{event}/filter", "0")
        _put("trace", "")

    def collect(self) -> Traced:
        with open(f"{TRACEFS}/trace", encoding="utf-8", errors="replace") as f:
            text = f.read()
        _put("trace", "")
        if "LOST" in text:
            raise RuntimeError("synctrace: the trace buffer overflowed (events lost)")
        pending: dict[tuple[int, str], float] = {}
        syncs: list[Interval] = []
        in_flight: dict[tuple[str, str, str], list[float]] = {}  # (rwbs, sector, size): issue times
        flushes: list[Interval] = []
        disk: list[Interval] = []
        for line in text.splitlines():
            if m := _SYSCALL.search(line):
                tid, ts, call, edge = int(m[1]), float(m[2]), m[3], m[4]
                if edge == "(":
                    pending[(tid, call)] = ts
                elif (tid, call) in pending:  # pwrite64 exits of unfiltered descriptors have no entry
                    syncs.append((pending.pop((tid, call)), ts))
            elif (b := _BLOCK.search(line)) and (int(b[3]), int(b[4])) == self._disk:
                # a flush carries no data; its sector reads 0 at issue and -1 at completion
                ts, key = float(b[1]), (b[5], "", "") if b[7] == "0" else (b[5], b[6], b[7])
                if b[2] == "issue":
                    in_flight.setdefault(key, []).append(ts)
                elif in_flight.get(key):
                    interval = (in_flight[key].pop(0), ts)
                    disk.append(interval)
                    if "F" in key[0]:
                        flushes.append(interval)
        if self._disk and not disk:
            raise RuntimeError("synctrace: no request traced on the disk: is the filter right?")
        return Traced(syncs=syncs, flushes=_merge(flushes), disk=_merge(disk))
