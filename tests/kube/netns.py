"""A network namespace with nothing but its own loopback, for upstream programs that bind every
interface (the csi-snapshot-metadata sidecar listens on ":port"): run inside it, they can bind
nothing the host sees. Chosen host ports are bridged into it (its 127.0.0.1:port -> the host's
127.0.0.1:port: the API server), so the programs reach only what the test lets them reach.

The namespace is held by a sleeping process (unshare, util-linux); programs join it with nsenter.
What the test itself does inside it (bring lo up, a bridge's listening socket, a probe) is done by a
thread that enters the namespace (setns applies to the calling thread only) and dies right after;
the connections to the host are made by threads that never entered it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


T = TypeVar("T")
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


class Netns:
    def __init__(self) -> None:
        self._holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "100000"])
        self._listeners: list[socket.socket] = []
        self._stop = threading.Event()
        self.path = f"/proc/{self._holder.pid}/ns/net"
        end = time.monotonic() + 10
        while True:  # until unshare has made the namespace and exec'd sleep in it
            with contextlib.suppress(OSError):
                exe = os.readlink(f"/proc/{self._holder.pid}/exe")
                if exe.endswith("sleep") and os.readlink(self.path) != os.readlink("/proc/self/ns/net"):
                    break
            if time.monotonic() > end:
                self.close()
                raise RuntimeError("the network namespace's holder did not start")
            time.sleep(0.02)
        self._inside(_loopback_up)

    def _inside(self, fn: Callable[[], T]) -> T:
        """fn's result, run by a thread that entered the namespace (and dies with it)."""
        result: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as exc:  # raised in the caller's thread below
                failure.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if failure:
            raise failure[0]
        return result[0]

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def bridge(self, port: int) -> None:
        """The namespace's 127.0.0.1:port reaches the host's 127.0.0.1:port."""

        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", port))
            s.listen(16)
            return s

        listener = self._inside(listen)
        self._listeners.append(listener)
        threading.Thread(target=self._accept, args=(listener, port), daemon=True).start()

    def _accept(self, listener: socket.socket, port: int) -> None:
        while not self._stop.is_set():
            try:
                inside, _ = listener.accept()
            except OSError:
                return  # closed
            outside = socket.create_connection(("127.0.0.1", port))
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def connectable(self, port: int) -> bool:
        """Whether something listens on the namespace's 127.0.0.1:port."""

        def probe() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        return self._inside(probe)

    def close(self) -> None:
        self._stop.set()
        for s in self._listeners:
            s.close()
        self._holder.kill()
        self._holder.wait()


def _loopback_up() -> None:
    """A new network namespace's lo is down: up it (what `ip link set lo up` does)."""
    with socket.socket() as s:
        ifr = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def namespace() -> Iterator[Netns]:
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()
