"""The gRPC edge's one interceptor: structured logging and the one domain-error -> status mapping.

Servicers raise domain errors (csi_thin.errors) and never call `context.abort`; this interceptor
turns them into a status by isinstance (a subclass keeps its parent's code, as `code` is inherited)
and logs one key=value line per call (and, given a csi_thin.metrics.Metrics, observes its latency by
operation and code). Unexpected exceptions become INTERNAL with the traceback logged.
Request fields marked `csi_secret` in the CSI spec (every `secrets` map) are redacted before a
request is logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import json_format, message

from csi_thin import deadline as deadline_mod
from csi_thin import errors
from csi_thin import metrics as metrics_mod
from csi_thin.csi.pb import csi_pb2

log = logging.getLogger("csi_thin.csi")

#: RPCs get at most this long even if the client gives more (or no deadline at all)
MAX_RPC_SECONDS = 110.0
REDACTED = "***"
#: Polled all day by kubelet and the sidecars: their successes are logged at DEBUG only.
QUIET_METHODS = frozenset(
    {
        "/csi.v1.Identity/Probe",
        "/csi.v1.Identity/GetPluginInfo",
        "/csi.v1.Identity/GetPluginCapabilities",
        "/csi.v1.Controller/ControllerGetCapabilities",
        "/csi.v1.Controller/GetCapacity",
        "/csi.v1.Node/NodeGetCapabilities",
        "/csi.v1.Node/NodeGetInfo",
        "/csi.v1.Node/NodeGetVolumeStats",
        # CSI 1.13's health RPCs: a health monitor polls them like the stats
        "/csi.v1.Controller/ControllerGetVolumeHealth",
        "/csi.v1.Controller/ControllerListVolumeHealth",
        "/csi.v1.Node/NodeGetVolumeHealth",
        "/csi.v1.Node/NodeGetStorageHealth",
        "/grpc.health.v1.Health/Check",
    }
)


def rpc_deadline(context: grpc.ServicerContext, *, cap: float = MAX_RPC_SECONDS) -> deadline_mod.Deadline:
    """A Deadline for the work of this RPC, a little short of the client's so the reply makes it."""
    remaining = context.time_remaining()
    seconds = cap if remaining is None else min(cap, remaining)
    return deadline_mod.Deadline.after(max(0.0, seconds - min(0.5, seconds * 0.1)))


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised by a servicer: the one place this mapping lives."""
    if isinstance(exc, errors.CsiThinError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), exc.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def redact(msg: message.Message) -> message.Message:
    """A copy of `msg` with every csi_secret field (at any depth) replaced by a marker."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    _redact_in_place(copy)
    return copy


def _redact_in_place(msg: message.Message) -> None:
    for field, value in msg.ListFields():
        if field.GetOptions().Extensions[csi_pb2.csi_secret]:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key in list(value):
                    value[key] = REDACTED
            else:
                msg.ClearField(field.name)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if field.is_repeated:
                for item in value:
                    _redact_in_place(item)
            else:
                _redact_in_place(value)


def _fields(request: Any) -> str:
    if not isinstance(request, message.Message):
        return "{}"
    as_dict = json_format.MessageToDict(redact(request), preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=(",", ":"), sort_keys=True)


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:  # grpc's classes are not subscriptable at run time
    _Interceptor = grpc.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


class EdgeInterceptor(_Interceptor):
    def __init__(self, metrics: metrics_mod.Metrics | None = None) -> None:
        self._metrics = metrics

    def _observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        if self._metrics is not None:
            # the method's last path element: a label from the fixed set of registered RPCs
            self._metrics.observe_rpc(method.rsplit("/", 1)[-1], code.name, seconds)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        # server streams of ours: CSI's SnapshotMetadata, containerd's Snapshots List
        ours = method.startswith(("/csi.", "/containerd.services.snapshots."))
        if handler is not None and handler.unary_stream is not None and ours:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler is None or handler.unary_unary is None:
            return handler  # other streams (health Watch): nothing of ours to translate
        inner = handler.unary_unary

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                response = inner(request, context)
            except Exception as exc:  # the one place errors become statuses
                self._abort(method, request, exc, started, context)
            self._ok(method, request, started)
            return response

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _streaming(
        self, method: str, inner: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        """A server-streaming method (SnapshotMetadata, Snapshots List): errors of the call and of
        each message become statuses here too; one log line when the stream ends, however it ends."""

        def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.monotonic()
            sent = 0
            try:
                for response in inner(request, context):
                    yield response
                    sent += 1
            except GeneratorExit:
                # grpc drops the iterator when the client cancelled or its deadline passed: the
                # stream ends here, with nothing of the pool held (see snapshot_metadata_service)
                code = grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.CANCELLED
                seconds = time.monotonic() - started
                self._observe(method, code, seconds)
                log.info(
                    "rpc=%s code=%s ms=%.1f messages=%d error=%s request=%s",
                    method,
                    code.name,
                    seconds * 1000,
                    sent,
                    json.dumps("the client stopped reading the stream"),
                    _fields(request),
                )
                raise
            except Exception as exc:  # the one place errors become statuses
                self._abort(method, request, exc, started, context)
            self._ok(method, request, started, messages=sent)

        return behavior

    def _ok(self, method: str, request: Any, started: float, *, messages: int | None = None) -> None:
        seconds = time.monotonic() - started
        self._observe(method, grpc.StatusCode.OK, seconds)
        log.log(
            logging.DEBUG if method in QUIET_METHODS else logging.INFO,
            "rpc=%s code=OK ms=%.1f%s request=%s",
            method,
            seconds * 1000,
            "" if messages is None else f" messages={messages}",
            _fields(request),
        )

    def _abort(
        self, method: str, request: Any, exc: Exception, started: float, context: grpc.ServicerContext
    ) -> NoReturn:
        code, text = status_of(exc)
        seconds = time.monotonic() - started
        self._observe(method, code, seconds)
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(
            level,
            "rpc=%s code=%s ms=%.1f error=%s request=%s",
            method,
            code.name,
            seconds * 1000,
            json.dumps(text),
            _fields(request),
            exc_info=not isinstance(exc, errors.CsiThinError),
        )
        context.abort(code, text)


#: how close to its deadline a stream the client dropped counts as one that ran out of time: the
#: client's clock started before the request travelled, so its deadline (and the RST_STREAM it sends
#: then) usually comes a little before the server's own timer fires
_DEADLINE_SLACK_SECONDS = 0.25


def _expired(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS
