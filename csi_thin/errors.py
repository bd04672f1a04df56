"""Domain errors, each carrying the gRPC status code it maps to.

Every layer raises these (or subclasses); the CSI edge translates them into a gRPC status in exactly
one place, by isinstance, so a subclass keeps its parent's code. The code is held as the name of a
gRPC status code (a plain string) so that the lower layers never import grpc.
"""

from __future__ import annotations


class CsiThinError(Exception):
    """Base of all domain errors. `code` names the gRPC status code of this error."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CsiThinError):
    """Bad input: nothing was changed."""

    code = "INVALID_ARGUMENT"


class NotFound(CsiThinError):
    code = "NOT_FOUND"


class AlreadyExists(CsiThinError):
    """The name exists with incompatible parameters."""

    code = "ALREADY_EXISTS"


class OperationPending(CsiThinError):
    """Another operation on the same key is in flight; the caller should retry later."""

    code = "ABORTED"


class ResourceExhausted(CsiThinError):
    code = "RESOURCE_EXHAUSTED"


class PoolExhausted(ResourceExhausted):
    """The pool is above a configured data or metadata threshold: new devices are refused."""


class PoolFull(ResourceExhausted):
    """The pool's data space is full (out_of_data_space): what would allocate is refused, deletes run."""


class NodeSilent(ResourceExhausted):
    """Kubernetes mode: a node's agent has not reported its pool for longer than it said it would (a
    node down, a plugin crash-looping). Nothing new goes there: RESOURCE_EXHAUSTED, because nothing
    was made, so the external-provisioner may reschedule the claim to another node (UNAVAILABLE
    would keep retrying this one). Its capacity is 0 and its volumes' health PoolUnavailable."""


class FailedPrecondition(CsiThinError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(CsiThinError):
    """The caller may not ask this (the node agent's control socket: another uid)."""

    code = "PERMISSION_DENIED"


class OutOfRange(CsiThinError):
    code = "OUT_OF_RANGE"


class Unavailable(CsiThinError):
    """The pool (or another dependency) is not ready: retry later."""

    code = "UNAVAILABLE"


class DeadlineExceeded(CsiThinError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(CsiThinError):
    """An RPC the driver deliberately does not offer (and does not advertise)."""

    code = "UNIMPLEMENTED"


class Internal(CsiThinError):
    code = "INTERNAL"


class CommandFailed(Internal):
    """A subprocess exited non-zero; stderr is kept for the caller and the log."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{argv[0]} exited {returncode}: {stderr.strip()[-2000:]}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class CommandTimeout(DeadlineExceeded):
    def __init__(self, argv: list[str], timeout: float) -> None:
        super().__init__(f"{argv[0]} did not finish within {timeout:.1f}s")
        self.argv = argv
        self.timeout = timeout
