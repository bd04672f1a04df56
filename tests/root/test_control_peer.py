"""The node agent's control socket answers its own uid only (SO_PEERCRED, checked on every
connection): a process of another uid that reaches the socket, through a directory and a socket
mode loosened by mistake, is refused before its request is read, and the agent is asked nothing."""

from __future__ import annotations

import itertools
import os
import pathlib
import socket
import time

import pytest

from csi_thin import deadline as deadline_mod
from csi_thin.node import agent as agent_mod
from csi_thin.node import control

NOBODY = 65534


class _Agent:
    def __init__(self) -> None:
        self.asked: list[float] = []

    def gc_orphans(self, *, grace_seconds: float, deadline: deadline_mod.Deadline) -> agent_mod.GcReport:
        self.asked.append(grace_seconds)
        return agent_mod.GcReport(deleted=(), waiting=(), kept=(), failed=())


def _ask_as(uid: int, state: str) -> str:
    """`control.request_gc` as the CLI runs it, from a forked child running as `uid`: what it raised.

    The child's request is sent only once the agent has had ample time to refuse and close (a slow
    client, a busy machine): the refusal must still reach it, not a broken pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest from here, only os._exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            send = socket.socket.sendall

            def late_sendall(sock: socket.socket, data: bytes) -> None:
                time.sleep(0.5)
                send(sock, data)

            socket.socket.sendall = late_sendall  # type: ignore[assignment,method-assign]
            control.request_gc(state, node="n1", grace_seconds=0, timeout=5)
            os.write(w, b"answered")
        except BaseException as exc:
            os.write(w, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as rf:
        got = rf.read().decode()
    os.waitpid(pid, 0)
    return got


def test_another_uid_is_refused_even_through_loosened_modes(
    tmp_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    fake = _Agent()
    srv = control.Server(str(state), agent=fake, node="n1")  # type: ignore[arg-type]
    srv.start()
    path = control.socket_path(str(state))
    # the way to the socket opened to everyone, and the socket world-writable: only the peer check is left
    base = tmp_path_factory.getbasetemp()
    dirs = [state, *itertools.takewhile(lambda p: p != base.parent, [tmp_path, *tmp_path.parents])]
    modes = {d: os.stat(d).st_mode & 0o7777 for d in dirs}
    try:
        for d in dirs:
            os.chmod(d, modes[d] | 0o011)
        os.chmod(path, 0o666)
        got = _ask_as(NOBODY, str(state))
        assert got.startswith("PermissionDenied: the agent's control socket answers its own uid only"), got
        assert fake.asked == []
        # its own uid is answered through the same socket
        assert control.request_gc(str(state), node="n1", grace_seconds=0, timeout=5)["deleted"] == []
        assert fake.asked == [0]
    finally:
        srv.stop()
        for d, mode in modes.items():
            os.chmod(d, mode)
