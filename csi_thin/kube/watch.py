"""Waiting on and following CustomResources by watch (never by polling the objects).

- `wait_for`: read one object, then watch it (field selector on its name) from that read's
  resourceVersion until a predicate holds or the deadline passes. Used by the controller: a
  CreateVolume waits for the node's status within the RPC deadline.
- `Follower`: list the objects of one node, then watch them from the list's resourceVersion with
  bookmarks, resuming from the last version seen when a stream ends (the API server ends every
  watch after a while, or restarts) and relisting when that version is gone (410). Used by the node
  agent; it hands every object it sees to a callback.

A stream that cannot be opened (API server down) is retried with capped backoff, within the deadline
(wait_for) or until stopped (Follower): that is reconnecting, not polling.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic

from csi_thin import deadline as deadline_mod
from csi_thin import errors
from csi_thin.kube import client as client_mod

log = logging.getLogger(__name__)

#: reconnect backoff after a failed watch or list (seconds), doubling up to the cap
RETRY_FIRST = 0.1
RETRY_CAP = 5.0


def wait_for(
    api: client_mod.Client,
    cls: type[client_mod.R],
    name: str,
    done: Callable[[client_mod.R | None], bool],
    *,
    deadline: deadline_mod.Deadline,
    what: str,
) -> client_mod.R | None:
    """The object (None once deleted) as soon as `done(obj)` is true; DeadlineExceeded otherwise."""
    delay = RETRY_FIRST
    while True:
        try:
            obj = api.find(cls, name, deadline=deadline)
            if done(obj):
                return obj
            rv = obj.meta.resource_version if obj is not None else ""
            if not rv:
                # deleted between the predicate's "not yet" and here cannot happen (done(None) is the
                # caller's to decide); an object without a version is a bug
                raise errors.Internal(f"{what}: {name} has no resourceVersion")
            for event in api.watch(cls, resource_version=rv, deadline=deadline, name=name):
                if event.type == "BOOKMARK":
                    continue
                current = None if event.type == "DELETED" else event.obj
                if done(current):  # type: ignore[arg-type]
                    return current  # type: ignore[return-value]
            # the stream ended (server timeout, restart): read again and resume
        except (client_mod.Gone, errors.Unavailable) as exc:
            log.info("event=wait-retry name=%s reason=%s", name, exc)
            if deadline.remaining() <= delay:
                break
            threading.Event().wait(delay)
            delay = min(RETRY_CAP, delay * 2)
        except errors.DeadlineExceeded:
            break
        if deadline.expired():
            break
    raise errors.DeadlineExceeded(f"{what}: {name} not done within the deadline; a retry picks it up")


class Follower(Generic[client_mod.R]):
    """List + watch the objects of one node, forever (until `stop`), calling `on_object` for every
    object seen (with deleted=True for a deletion). `on_list` gets each full list (start, relist)."""

    def __init__(
        self,
        api: client_mod.Client,
        cls: type[client_mod.R],
        *,
        node: str,
        on_object: Callable[[client_mod.R, bool], None],
        on_list: Callable[[list[client_mod.R]], None],
    ) -> None:
        self._api = api
        self._cls: type[client_mod.R] = cls
        self._node = node
        self._on_object: Callable[[client_mod.R, bool], None] = on_object
        self._on_list: Callable[[list[client_mod.R]], None] = on_list
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.resource_version = ""
        #: counters a test or a metric can read
        self.relists = 0
        self.resumes = 0

    def list_now(self, *, deadline: deadline_mod.Deadline) -> list[client_mod.R]:
        """The first list, in the caller's thread (start-up reconcile); the watch resumes from it."""
        items, rv = self._api.list(self._cls, deadline=deadline, node=self._node)
        self.resource_version = rv
        return items

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self._cls.kind.plural}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following: no callback runs after the current event. The thread (a daemon) ends when
        its open watch does; it is not joined, as that can take up to WATCH_SECONDS."""
        self._stop.set()

    def _relist(self) -> None:
        items = self.list_now(deadline=deadline_mod.default())
        self.relists += 1
        self._on_list(items)

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._relist()
                # a watch ends itself well before a stop is overdue: the stop is seen within
                # WATCH_SECONDS (a test's stop waits on it; production stops by process exit)
                for event in self._api.watch(
                    self._cls,
                    resource_version=self.resource_version,
                    deadline=deadline_mod.Deadline.after(client_mod.WATCH_SECONDS),
                    node=self._node,
                ):
                    if event.resource_version:
                        self.resource_version = event.resource_version
                    if self._stop.is_set():
                        return
                    if event.obj is not None:
                        self._on_object(event.obj, event.type == "DELETED")  # type: ignore[arg-type]
                    delay = RETRY_FIRST
                self.resumes += 1
            except client_mod.Gone:
                log.info(
                    "event=watch-gone kind=%s rv=%s action=relist",
                    self._cls.kind.plural,
                    self.resource_version,
                )
                self.resource_version = ""
            except errors.CsiThinError as exc:
                log.warning(
                    "event=watch-failed kind=%s error=%s retry_in=%.1f", self._cls.kind.plural, exc, delay
                )
                if self._stop.wait(delay):
                    return
                delay = min(RETRY_CAP, delay * 2)
            except Exception:
                log.exception("event=watch-crashed kind=%s", self._cls.kind.plural)
                if self._stop.wait(delay):
                    return
                delay = min(RETRY_CAP, delay * 2)
