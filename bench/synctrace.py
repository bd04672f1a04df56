"""Time the measured operations spend waiting for durable writes, from the kernel's own syscall
tracepoints (ftrace): nothing is injected into the measured processes, so their timings stand.

Counted as a sync: fsync, fdatasync and msync by anyone, and pwrite64 on the file descriptors of the
measured processes opened with O_DSYNC (LMDB writes its meta page that way after the fdatasync of
its data pages: two durable writes per write transaction). Each call's interval is attributed to the
timed operation windows (CLOCK_MONOTONIC, the `mono` trace clock) it overlaps.

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
_LINE = re.compile(r"-(\d+)\s+\[\d+\]\s.*?(\d+\.\d+): sys_(\w+)(\(| -> )")


def usable() -> bool:
    return bool(os.environ.get("CSI_THIN_IN_VM")) and os.geteuid() == 0


@contextlib.contextmanager
def traced(pids: Iterable[int]) -> Iterator[Trace | None]:
    """A Trace of the syncs of `pids` where usable (the VM), else None."""
    if not usable():
        yield None
        return
    with Trace(pids) as trace:
        yield trace


@dataclasses.dataclass(frozen=True)
class Share:
    ops: int
    op_seconds: float
    sync_seconds: float
    syncs: int

    @property
    def fraction(self) -> float:
        return self.sync_seconds / self.op_seconds if self.op_seconds else 0.0

    @property
    def per_op(self) -> float:
        return self.syncs / self.ops if self.ops else 0.0


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


class Trace:
    """Syncs traced while the context is open. `calls()` returns and clears what was traced so far:
    (start, end) in CLOCK_MONOTONIC seconds."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._fds = sorted({fd for pid in pids for fd in dsync_fds(pid)})
        self._events = [f"syscalls/sys_{edge}_{call}" for call in SYNC_CALLS for edge in ("enter", "exit")]
        if self._fds:
            self._events += ["syscalls/sys_enter_pwrite64", "syscalls/sys_exit_pwrite64"]

    def __enter__(self) -> Trace:
        if not os.path.exists(f"{TRACEFS}/trace"):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
        _put("tracing_on", "0")
        _put("trace_clock", "mono")
        _put("buffer_size_kb", "8192")
        _put("trace", "")
        if self._fds:
            _put("events/syscalls/sys_enter_pwrite64/filter", " || ".join(f"fd == {fd}" for fd in self._fds))
        for event in self._events:
            _put(f"events/{event}/enable", "1")
        _put("tracing_on", "1")
        return self

    def __exit__(self, *exc: object) -> None:
        _put("tracing_on", "0")
        for event in self._events:
            _put(f"events/{event}/enable", "0")
        if self._fds:
            _put("events/syscalls/sys_enter_pwrite64/filter", "0")
        _put("trace", "")

    def calls(self) -> list[tuple[float, float]]:
        with open(f"{TRACEFS}/trace", encoding="utf-8", errors="replace") as f:
            text = f.read()
        _put("trace", "")
        if "LOST" in text:
            raise RuntimeError("synctrace: the trace buffer overflowed (events lost)")
        pending: dict[tuple[int, str], float] = {}
        out: list[tuple[float, float]] = []
        for line in text.splitlines():
            m = _LINE.search(line)
            if m is None:
                continue
            tid, ts, call, edge = int(m[1]), float(m[2]), m[3], m[4]
            if edge == "(":
                pending[(tid, call)] = ts
            elif (tid, call) in pending:  # pwrite64 exits of unfiltered descriptors have no entry
                out.append((pending.pop((tid, call)), ts))
        if not out:
            raise RuntimeError("synctrace: no sync call traced at all, though the operations write LMDB")
        return out


def share(windows: list[tuple[float, float]], calls: list[tuple[float, float]]) -> Share:
    """How much of the windows' time the sync calls took (overlap), and how many calls started in them."""
    sync = 0.0
    count = 0
    for w0, w1 in windows:
        for c0, c1 in calls:
            overlap = min(w1, c1) - max(w0, c0)
            if overlap > 0:
                sync += overlap
            if w0 <= c0 < w1:
                count += 1
    return Share(len(windows), sum(w1 - w0 for w0, w1 in windows), sync, count)
