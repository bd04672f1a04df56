"""The one error -> status mapping, secret redaction, and the RPC deadline."""

from __future__ import annotations

import grpc
import pytest

from csi_thin import errors
from csi_thin.controller import provisioner
from csi_thin.csi import interceptor
from csi_thin.csi.pb import csi_pb2

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("x"), S.INVALID_ARGUMENT),
        (errors.NotFound("x"), S.NOT_FOUND),
        (errors.AlreadyExists("x"), S.ALREADY_EXISTS),
        (errors.OperationPending("x"), S.ABORTED),
        (errors.ResourceExhausted("x"), S.RESOURCE_EXHAUSTED),
        (errors.PoolExhausted("x"), S.RESOURCE_EXHAUSTED),  # a subclass keeps its parent's code
        (errors.FailedPrecondition("x"), S.FAILED_PRECONDITION),
        (errors.OutOfRange("x"), S.OUT_OF_RANGE),
        (errors.Unavailable("x"), S.UNAVAILABLE),
        (errors.DeadlineExceeded("x"), S.DEADLINE_EXCEEDED),
        (errors.CommandTimeout(["mkfs.ext4"], 1.0), S.DEADLINE_EXCEEDED),
        (errors.CommandFailed(["mount"], 32, "boom"), S.INTERNAL),
        (errors.Internal("x"), S.INTERNAL),
        (provisioner.InvalidToken("x"), S.ABORTED),
        (ValueError("surprise"), S.INTERNAL),
        (KeyError("k"), S.INTERNAL),
        (errors.Unimplemented("no"), S.UNIMPLEMENTED),
    ],
)
def test_status_of(exc: Exception, code: grpc.StatusCode) -> None:
    got, message = interceptor.status_of(exc)
    assert got == code
    assert message


def test_unknown_code_name_is_internal() -> None:
    class Odd(errors.CsiThinError):
        code = "NOT_A_CODE"

    assert interceptor.status_of(Odd("x"))[0] == S.INTERNAL


def test_unexpected_exception_message_names_it() -> None:
    assert "ValueError: surprise" in interceptor.status_of(ValueError("surprise"))[1]


@pytest.mark.parametrize(
    "request_",
    [
        csi_pb2.CreateVolumeRequest(name="v", secrets={"password": "hunter2", "token": "s3cr3t"}),
        csi_pb2.DeleteVolumeRequest(volume_id="v", secrets={"password": "hunter2"}),
        csi_pb2.NodeStageVolumeRequest(volume_id="v", secrets={"password": "hunter2"}),
        csi_pb2.NodePublishVolumeRequest(volume_id="v", secrets={"password": "hunter2"}),
        csi_pb2.CreateSnapshotRequest(name="s", secrets={"password": "hunter2"}),
        csi_pb2.ControllerExpandVolumeRequest(volume_id="v", secrets={"password": "hunter2"}),
    ],
)
def test_secrets_are_redacted(request_: object) -> None:
    text = interceptor._fields(request_)
    assert "hunter2" not in text and "s3cr3t" not in text
    assert interceptor.REDACTED in text
    assert '"v"' in text or '"s"' in text  # the rest is still logged


def test_redact_leaves_the_original_alone() -> None:
    req = csi_pb2.CreateVolumeRequest(name="v", secrets={"password": "hunter2"})
    interceptor.redact(req)
    assert req.secrets["password"] == "hunter2"


class _Ctx:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


@pytest.mark.parametrize(
    ("remaining", "low", "high"),
    [(None, 100.0, 110.0), (1e9, 100.0, 110.0), (10.0, 9.0, 10.0), (1.0, 0.8, 1.0), (0.0, 0.0, 0.0)],
)
def test_rpc_deadline(remaining: float | None, low: float, high: float) -> None:
    left = interceptor.rpc_deadline(_Ctx(remaining)).remaining()  # type: ignore[arg-type]
    assert low - 0.05 <= left <= high


def test_quiet_methods_are_real_rpcs() -> None:
    """A misspelt name would log a poll at INFO forever: every quiet method must exist."""
    real = {
        f"/{s.full_name}/{m.name}" for s in csi_pb2.DESCRIPTOR.services_by_name.values() for m in s.methods
    }
    assert interceptor.QUIET_METHODS - {"/grpc.health.v1.Health/Check"} <= real
    assert "/csi.v1.Node/NodeGetStorageHealth" in interceptor.QUIET_METHODS
