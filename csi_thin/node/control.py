"""The node agent's private control socket (Kubernetes mode): how `csi-thin pool gc --orphans
--node-id N` reaches the running agent. The agent owns the pool (its owner lock keeps every other
process from changing it) and has the API server at hand to check each orphan against the CRs, so
the command asks it instead of opening the pool itself.

Who may ask is decided by the filesystem and the kernel: the socket is `<state_dir>/agent.sock`,
mode 0600 (the state dir is made 0700), and the peer must run as the agent's own uid (SO_PEERCRED,
checked on every connection, so a looser directory changes nothing): whoever may open the pool's
own files (root on the node, e.g. `kubectl exec` into the node pod), as for the standalone
`pool gc`. No network, no token to leak.

One JSON line each way:
    {"op": "gc-orphans", "node": "<node id>", "grace_seconds": 3600, "timeout_seconds": 60}
    -> {"deleted": [...], "waiting": [{"name", "orphan_seconds", "eligible_in_seconds"}],
        "kept": [{"name", "reason"}], "failed": [{"name", "reason"}]}
    or {"error": {"code": "<gRPC code name>", "message": "..."}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import socketserver
import struct
import threading
from typing import TYPE_CHECKING, Any

from csi_thin import deadline as deadline_mod
from csi_thin import errors

if TYPE_CHECKING:  # the CLI imports this module: the agent (and the kubernetes client) stay unloaded
    from csi_thin.node import agent as agent_mod

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
#: an orphan is deleted only after it has been one this long, unless the request says otherwise: time
#: for an operator to see it reported (ThinPool status, metrics) and restore a CR deleted by mistake
DEFAULT_GRACE_SECONDS = 3600.0
#: sun_path holds 108 bytes with its terminating NUL
_SUN_PATH_MAX = 107
_LINE_MAX = 64 * 1024
#: a request may ask for at most this long (the CLI's --timeout)
MAX_TIMEOUT_SECONDS = 600.0
#: how long the request line may take to arrive, and the answer to be taken: a client that stalls
#: (a killed `kubectl exec`, a stray socat) must not hold a thread and a descriptor forever
IO_SECONDS = 10.0


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class Server:
    """Serves one agent's requests on its state dir's socket until stopped."""

    def __init__(self, state_dir: str, *, agent: agent_mod.Agent, node: str) -> None:
        self.path = socket_path(state_dir)
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise errors.InvalidArgument(
                f"the control socket {self.path} is longer than a unix socket path may be "
                f"({_SUN_PATH_MAX} bytes): choose a shorter state_dir"
            )
        self._agent = agent
        self._node = node
        self._srv: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # this process holds the pool's owner lock: a socket file here is a dead agent's
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        serve_one = self._serve_one

        class Handler(socketserver.StreamRequestHandler):
            timeout = IO_SECONDS  # on the connection's reads and writes; gc itself reads no socket

            def handle(self) -> None:
                serve_one(self.connection, self.rfile, self.wfile)

        srv = socketserver.ThreadingUnixStreamServer(self.path, Handler, bind_and_activate=False)
        srv.daemon_threads = True
        srv.server_bind()
        # the state dir is 0700 already; the mode keeps the socket private wherever the dir's goes
        os.chmod(self.path, 0o600)
        srv.server_activate()
        self._srv = srv
        self._thread = threading.Thread(target=srv.serve_forever, name="agent-control", daemon=True)
        self._thread.start()
        log.info("event=control-listening path=%s", self.path)

    def stop(self) -> None:
        if self._srv is None:
            return
        self._srv.shutdown()
        self._srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._srv = None

    def _serve_one(self, conn: socket.socket, rfile: Any, wfile: Any) -> None:
        try:
            answer = self._answer(conn, rfile)
        except errors.CsiThinError as exc:
            answer = {"error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.exception("event=control-request-crashed")
            answer = {"error": {"code": "INTERNAL", "message": repr(exc)}}
        with contextlib.suppress(OSError):
            wfile.write(json.dumps(answer).encode() + b"\n")

    def _answer(self, conn: socket.socket, rfile: Any) -> dict[str, Any]:
        if _peer_uid(conn) != os.getuid():
            raise errors.PermissionDenied("the agent's control socket answers its own uid only")
        try:
            line = rfile.readline(_LINE_MAX)
        except TimeoutError:
            raise errors.InvalidArgument(f"no request line within {IO_SECONDS:.0f}s") from None
        try:
            req = json.loads(line)
        except ValueError as exc:
            raise errors.InvalidArgument(f"not a JSON request line: {exc}") from exc
        return self.handle(req if isinstance(req, dict) else {})

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("op") != "gc-orphans":
            raise errors.InvalidArgument(f"unknown request {req.get('op')!r} (known: gc-orphans)")
        if req.get("node") != self._node:
            raise errors.FailedPrecondition(
                f"this is the agent of node {self._node!r}, not of {req.get('node')!r}: check --node-id "
                "and --config"
            )
        grace = req.get("grace_seconds")
        timeout = req.get("timeout_seconds")
        if not isinstance(grace, int | float) or not 0 <= grace < float("inf"):
            raise errors.InvalidArgument(f"grace_seconds must be a number >= 0, not {grace!r}")
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_SECONDS:
            raise errors.InvalidArgument(f"timeout_seconds must be in (0, {MAX_TIMEOUT_SECONDS:.0f}]")
        log.info("event=gc-orphans-requested grace_seconds=%s", grace)
        report = self._agent.gc_orphans(
            grace_seconds=float(grace), deadline=deadline_mod.Deadline.after(float(timeout))
        )
        return dataclasses.asdict(report)


_ERRORS: tuple[type[errors.CsiThinError], ...] = (
    errors.InvalidArgument,
    errors.NotFound,
    errors.FailedPrecondition,
    errors.PermissionDenied,
    errors.Unavailable,
    errors.DeadlineExceeded,
)


def request_gc(state_dir: str, *, node: str, grace_seconds: float, timeout: float) -> dict[str, Any]:
    """Ask the running agent of this state dir to collect orphans; its answer (see the module doc).
    Raises the agent's error, or Unavailable when no agent answers."""
    path = socket_path(state_dir)
    req = {"op": "gc-orphans", "node": node, "grace_seconds": grace_seconds, "timeout_seconds": timeout}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout + 5.0)  # the agent answers within the timeout it was given
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise errors.Unavailable(
                f"no node agent answers on {path}: in Kubernetes mode the running node agent "
                "(`csi-thin node`) collects orphans, as only it can check them against the CRs"
            ) from exc
        except OSError as exc:
            raise errors.Unavailable(f"{path}: {exc}") from exc
        try:
            sock.sendall(json.dumps(req).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading the request (a refused peer): read the answer
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(f"the node agent did not answer within {timeout:.0f}s") from exc
        try:
            with sock.makefile("rb") as rfile:
                line = rfile.readline()
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(f"the node agent did not answer within {timeout:.0f}s") from exc
        except OSError as exc:
            raise errors.Unavailable(f"the node agent closed {path} without an answer: {exc}") from exc
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise errors.Unavailable(f"the node agent's answer is not JSON: {line[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise errors.Unavailable(f"the node agent's answer is not an object: {line[:200]!r}")
    if "error" in answer:
        err = answer["error"]
        cls = next((c for c in _ERRORS if c.code == err.get("code")), errors.Internal)
        raise cls(str(err.get("message", "")))
    return answer
