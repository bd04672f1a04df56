"""The only code that talks to the API server: typed CRUD, status patches, watches and Events.

Every call carries the caller's deadline as the request timeout (`_request_timeout`), so nothing here
blocks past it. API errors become domain errors at this edge: 404 -> NotFound, 409 -> Conflict
(an update raced another writer: re-read and decide again) or AlreadyExists (a create found the
name taken), 410 on a watch -> Gone (relist), 422/400 -> Invalid, 403 -> Forbidden, anything else
(5xx, a dropped connection) -> Unavailable, which callers may retry within their deadline.

Watches resume from the last resourceVersion they saw (bookmarks keep it fresh on a quiet stream);
a watch the API server no longer serves (410 Gone) makes the caller relist. Nothing here polls.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import kubernetes
import urllib3

from csi_thin import deadline as deadline_mod
from csi_thin import errors
from csi_thin.kube import resources

log = logging.getLogger(__name__)

R = TypeVar(
    "R", resources.ThinVolume, resources.ThinSnapshot, resources.ThinGroupSnapshot, resources.ThinPool
)

#: a watch is re-opened at least this often (the API server ends it anyway after a while)
WATCH_SECONDS = 300
#: connect timeout of every request (the read timeout is the deadline)
CONNECT_SECONDS = 5.0
LIST_PAGE = 500
#: reads that have no caller deadline (the controller Protocol's get and list) get this long
READ_SECONDS = 30.0


class Conflict(errors.CsiThinError):
    """The object changed since it was read (resourceVersion mismatch): re-read and try again."""

    code = "ABORTED"


class Gone(errors.CsiThinError):
    """A watch's resourceVersion is too old for the API server: relist."""

    code = "ABORTED"


class Forbidden(errors.CsiThinError):
    """RBAC or an admission policy refused the request."""

    code = "PERMISSION_DENIED"


class Invalid(errors.CsiThinError):
    """The API server's validation (schema, CEL rules) refused the object."""

    code = "INVALID_ARGUMENT"


_BY_STATUS: dict[int, type[errors.CsiThinError]] = {
    404: errors.NotFound,
    410: Gone,
    403: Forbidden,
    400: Invalid,
    422: Invalid,
}


def _translate(exc: Exception, what: str) -> errors.CsiThinError:
    if isinstance(exc, kubernetes.client.exceptions.ApiException):
        status = int(exc.status or 0)
        text = f"{what}: {_message(exc)}"
        if status == 409:
            return errors.AlreadyExists(text) if _reason(exc) == "AlreadyExists" else Conflict(text)
        cls = _BY_STATUS.get(status)
        return cls(text) if cls is not None else errors.Unavailable(f"{text} (HTTP {status})")
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return errors.DeadlineExceeded(f"{what}: the API server did not answer in time")
    return errors.Unavailable(f"{what}: {exc}")


def _body(exc: Any) -> dict[str, Any]:
    try:
        value = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _message(exc: Any) -> str:
    return str(_body(exc).get("message") or exc.reason or exc)


def _reason(exc: Any) -> str:
    return str(_body(exc).get("reason") or "")


def _timeout(deadline: deadline_mod.Deadline, what: str) -> tuple[float, float]:
    left = deadline.remaining()
    if left <= 0:
        raise errors.DeadlineExceeded(f"deadline exceeded before {what}")
    return (min(CONNECT_SECONDS, left), left)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Event:
    """One watch event: ADDED, MODIFIED, DELETED (obj set) or BOOKMARK (obj None)."""

    type: str
    obj: resources.Resource | None
    resource_version: str


@dataclasses.dataclass(frozen=True)
class Page:
    items: list[Any]
    resource_version: str  # of the list: a watch from here misses nothing
    next_token: str


_CLASSES: dict[resources.Kind, type[Any]] = {
    resources.Kind.VOLUME: resources.ThinVolume,
    resources.Kind.SNAPSHOT: resources.ThinSnapshot,
    resources.Kind.GROUP: resources.ThinGroupSnapshot,
    resources.Kind.POOL: resources.ThinPool,
}


def connect(kubeconfig: str | None) -> Client:
    """A client from a kubeconfig file, or the in-cluster service account when none is given."""
    cfg = kubernetes.client.Configuration()
    try:
        if kubeconfig:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            kubernetes.config.load_incluster_config(client_configuration=cfg)
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise errors.InvalidArgument(f"kubeconfig {kubeconfig or '(in-cluster)'}: {exc}") from exc
    return Client(kubernetes.client.ApiClient(cfg))


class Client:
    """Typed access to csi-thin's CustomResources (and Events) over one API connection pool."""

    def __init__(self, api: Any) -> None:
        self._api_client = api
        self._custom = kubernetes.client.CustomObjectsApi(api)
        self._events = kubernetes.client.EventsV1Api(api)

    def close(self) -> None:
        self._api_client.close()

    # ---- reads ---------------------------------------------------------------------------------

    def get(self, cls: type[R], name: str, *, deadline: deadline_mod.Deadline) -> R:
        what = f"get {cls.kind.value} {name}"
        raw = self._call(
            what,
            deadline,
            lambda t: self._custom.get_cluster_custom_object(
                resources.GROUP, resources.VERSION, cls.kind.plural, name, _request_timeout=t
            ),
        )
        return cls.from_dict(raw)

    def find(self, cls: type[R], name: str, *, deadline: deadline_mod.Deadline) -> R | None:
        try:
            return self.get(cls, name, deadline=deadline)
        except errors.NotFound:
            return None

    def list_page(
        self,
        cls: type[R],
        *,
        deadline: deadline_mod.Deadline,
        node: str | None = None,
        limit: int = LIST_PAGE,
        token: str = "",
    ) -> Page:
        kwargs: dict[str, Any] = {"limit": limit}
        if token:
            kwargs["_continue"] = token
        if node is not None:
            kwargs["field_selector"] = f"{resources.NODE_FIELD}={node}"
        raw = self._call(
            f"list {cls.kind.plural}",
            deadline,
            lambda t: self._custom.list_cluster_custom_object(
                resources.GROUP, resources.VERSION, cls.kind.plural, _request_timeout=t, **kwargs
            ),
        )
        meta = raw.get("metadata") or {}
        return Page(
            items=[cls.from_dict(item) for item in raw.get("items") or ()],
            resource_version=str(meta.get("resourceVersion") or ""),
            next_token=str(meta.get("continue") or ""),
        )

    def list(
        self, cls: type[R], *, deadline: deadline_mod.Deadline, node: str | None = None
    ) -> tuple[list[R], str]:
        """Every object (of one node, with `node`), paged; and the resourceVersion to watch from."""
        items: list[R] = []
        token = ""
        while True:
            page = self.list_page(cls, deadline=deadline, node=node, token=token)
            items.extend(page.items)
            token = page.next_token
            if not token:
                return items, page.resource_version

    # ---- writes --------------------------------------------------------------------------------

    def create(self, obj: R, *, deadline: deadline_mod.Deadline) -> R:
        raw = self._call(
            f"create {obj.kind.value} {obj.name}",
            deadline,
            lambda t: self._custom.create_cluster_custom_object(
                resources.GROUP, resources.VERSION, obj.kind.plural, obj.body(), _request_timeout=t
            ),
        )
        return type(obj).from_dict(raw)

    def patch_spec(self, obj: R, spec: Mapping[str, Any], *, deadline: deadline_mod.Deadline) -> R:
        """Merge-patch the spec, guarded by the resourceVersion read (Conflict if it moved)."""
        body = {"metadata": {"resourceVersion": obj.meta.resource_version}, "spec": dict(spec)}
        return self._patch(obj, body, status=False, deadline=deadline)

    def put_status(self, obj: R, status: Mapping[str, Any], *, deadline: deadline_mod.Deadline) -> R:
        """Replace the status subresource, guarded by the resourceVersion read (Conflict if it moved)."""
        body = {"metadata": {"resourceVersion": obj.meta.resource_version}, "status": dict(status)}
        return self._patch(obj, body, status=True, deadline=deadline)

    def set_finalizers(self, obj: R, finalizers: tuple[str, ...], *, deadline: deadline_mod.Deadline) -> R:
        body = {"metadata": {"resourceVersion": obj.meta.resource_version, "finalizers": list(finalizers)}}
        return self._patch(obj, body, status=False, deadline=deadline)

    def _patch(self, obj: R, body: dict[str, Any], *, status: bool, deadline: deadline_mod.Deadline) -> R:
        fn = (
            self._custom.patch_cluster_custom_object_status
            if status
            else self._custom.patch_cluster_custom_object
        )
        raw = self._call(
            f"patch {obj.kind.value} {obj.name}{' status' if status else ''}",
            deadline,
            lambda t: fn(
                resources.GROUP,
                resources.VERSION,
                obj.kind.plural,
                obj.name,
                body,
                _request_timeout=t,
                _content_type="application/merge-patch+json",
            ),
        )
        return type(obj).from_dict(raw)

    def delete(
        self,
        cls: type[R],
        name: str,
        *,
        deadline: deadline_mod.Deadline,
        uid: str = "",
        resource_version: str = "",
    ) -> None:
        """Ask for deletion (finalizers may hold the object); absent is done. With `uid`, only that
        object: another one made under the same name meanwhile is left alone (Conflict); with
        `resource_version` also, only that version of it: one changed since is left alone (Conflict)."""
        kwargs: dict[str, Any] = {}
        if uid or resource_version:
            kwargs["body"] = kubernetes.client.V1DeleteOptions(
                preconditions=kubernetes.client.V1Preconditions(
                    uid=uid or None, resource_version=resource_version or None
                )
            )
        try:
            self._call(
                f"delete {cls.kind.value} {name}",
                deadline,
                lambda t: self._custom.delete_cluster_custom_object(
                    resources.GROUP, resources.VERSION, cls.kind.plural, name, _request_timeout=t, **kwargs
                ),
            )
        except errors.NotFound:
            return

    def event(
        self,
        obj: resources.Resource,
        *,
        reason: str,
        message: str,
        reporter: str,
        warning: bool = True,
        deadline: deadline_mod.Deadline,
    ) -> None:
        """Record an Event on a (cluster-scoped) object, in the default namespace. Best effort: an
        event that cannot be written is logged, never a reason to fail the reconcile.

        Why `default`: an Event is namespaced and a ThinVolume is not. client-go's recorder does the
        same for cluster-scoped objects (an empty namespace becomes metav1.NamespaceDefault), so
        `kubectl describe thinvolume X` and `kubectl get events -n default` find them where they find
        the events of Nodes and PersistentVolumes."""
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": f"{obj.name}-", "namespace": "default"},
            "eventTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": "csi-thin.io/node-agent",
            "reportingInstance": reporter,
            "action": "Reconcile",
            "reason": reason,
            "note": message[:1024],
            "type": "Warning" if warning else "Normal",
            "regarding": {
                "apiVersion": resources.API_VERSION,
                "kind": obj.kind.value,
                "name": obj.name,
                "uid": obj.meta.uid,
            },
        }
        try:
            self._call(
                f"event {reason} on {obj.name}",
                deadline,
                lambda t: self._events.create_namespaced_event("default", body, _request_timeout=t),
            )
        except errors.CsiThinError as exc:
            log.warning("event=event-not-recorded name=%s reason=%s error=%s", obj.name, reason, exc)

    # ---- watches -------------------------------------------------------------------------------

    def watch(
        self,
        cls: type[R],
        *,
        resource_version: str,
        deadline: deadline_mod.Deadline,
        node: str | None = None,
        name: str | None = None,
    ) -> Iterator[Event]:
        """Events after `resource_version` until the deadline or the server ends the stream.

        Raises Gone when the version is too old (relist, then watch from the list's version).
        BOOKMARK events carry only a newer resourceVersion to resume from.
        """
        selectors = []
        if node is not None:
            selectors.append(f"{resources.NODE_FIELD}={node}")
        if name is not None:
            selectors.append(f"metadata.name={name}")
        seconds = max(1, min(WATCH_SECONDS, int(deadline.remaining())))
        # the server ends a watch in whole seconds (at least one): a deadline that is not a whole
        # number of seconds away would be overrun by up to a second, and the RPC that waits would
        # answer after its client gave up. The read timeout (the longest quiet spell on the stream)
        # ends it at the deadline instead: a stream that times out just ends, like a server's end.
        read = max(0.05, min(seconds + CONNECT_SECONDS, deadline.remaining()))
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": resource_version,
            "timeout_seconds": seconds,
        }
        if selectors:
            kwargs["field_selector"] = ",".join(selectors)
        what = f"watch {cls.kind.plural}"
        resp = self._call(
            what,
            deadline,
            lambda t: self._custom.list_cluster_custom_object(
                resources.GROUP,
                resources.VERSION,
                cls.kind.plural,
                _preload_content=False,
                _request_timeout=(t[0], read),
                **kwargs,
            ),
        )
        try:
            for line in _lines(resp, what):
                event = json.loads(line)
                kind = event.get("type")
                raw = event.get("object") or {}
                if kind == "ERROR":
                    code = int(raw.get("code") or 0)
                    text = f"{what}: {raw.get('message', '')}"
                    if code == 410:
                        raise Gone(text)
                    raise errors.Unavailable(text)
                rv = str((raw.get("metadata") or {}).get("resourceVersion") or "")
                if kind == "BOOKMARK":
                    yield Event(type="BOOKMARK", obj=None, resource_version=rv)
                    continue
                yield Event(type=str(kind), obj=cls.from_dict(raw), resource_version=rv)
        finally:
            resp.close()
            resp.release_conn()

    # ---- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _call(what: str, deadline: deadline_mod.Deadline, fn: Callable[[tuple[float, float]], Any]) -> Any:
        timeout = _timeout(deadline, what)
        try:
            return fn(timeout)
        except (kubernetes.client.exceptions.ApiException, urllib3.exceptions.HTTPError) as exc:
            raise _translate(exc, what) from exc


def _lines(resp: Any, what: str) -> Iterator[str]:
    """The lines of a streaming response; a dropped stream ends it (the caller resumes)."""
    buf = b""
    try:
        for chunk in resp.stream(amt=None, decode_content=False):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line.decode()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        log.info("event=watch-ended what=%s reason=%s", what, exc)
        return
