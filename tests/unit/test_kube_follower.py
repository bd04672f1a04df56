"""The node agent's list + watch loop against a scripted client: it watches from the list's
resourceVersion, resumes from the last version it saw (bookmarks included) when a stream ends,
relists when the server says that version is gone (410), and backs off when the server is down."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from csi_thin import deadline as deadline_mod
from csi_thin import errors
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.kube import watch


def _tv(name: str, rv: str) -> res.ThinVolume:
    return res.ThinVolume(
        meta=res.Meta(name=name, resource_version=rv),
        spec=res.VolumeSpec(node_name="n", pool="p", size_bytes=1),
    )


class ScriptedClient:
    """Answers list() and watch() from a script; records the resourceVersions watches start from."""

    def __init__(self, streams: list[Any]) -> None:
        self.streams = streams
        self.watched_from: list[str] = []
        self.lists = 0
        self.done = threading.Event()

    def list(
        self, cls: type[Any], *, deadline: deadline_mod.Deadline, node: str | None = None
    ) -> tuple[list[Any], str]:
        assert node == "n"
        self.lists += 1
        return [_tv(f"v-{self.lists}", str(10 * self.lists))], str(10 * self.lists)

    def watch(
        self,
        cls: type[Any],
        *,
        resource_version: str,
        deadline: deadline_mod.Deadline,
        node: str | None = None,
    ) -> Iterator[client_mod.Event]:
        self.watched_from.append(resource_version)
        if not self.streams:
            self.done.set()
            threading.Event().wait(5)  # an idle stream until the test stops the follower
            return
        step = self.streams.pop(0)
        if isinstance(step, Exception):
            raise step
        yield from step


def test_follower_resumes_and_relists() -> None:
    script = [
        [  # first stream: an update, a bookmark, then the server ends it
            client_mod.Event("MODIFIED", _tv("v-1", "11"), "11"),
            client_mod.Event("BOOKMARK", None, "15"),
        ],
        errors.Unavailable("apiserver down"),  # reconnect with backoff, from the same version
        client_mod.Gone("too old"),  # relist, then watch from the new list's version
        [client_mod.Event("DELETED", _tv("v-2", "21"), "21")],
    ]
    api = ScriptedClient(script)
    seen: list[tuple[str, bool]] = []
    lists: list[list[str]] = []
    f: watch.Follower[res.ThinVolume] = watch.Follower(
        api,  # type: ignore[arg-type]
        res.ThinVolume,
        node="n",
        on_object=lambda o, deleted: seen.append((o.name, deleted)),
        on_list=lambda items: lists.append([i.name for i in items]),
    )
    assert [v.name for v in f.list_now(deadline=deadline_mod.Deadline.after(5))] == ["v-1"]
    f.start()
    assert api.done.wait(10)
    f.stop()
    assert api.watched_from == ["10", "15", "15", "20", "21"]
    assert seen == [("v-1", False), ("v-2", True)]
    assert lists == [["v-2"]]  # the relist after 410 (the first list was the caller's)
    assert f.relists == 1
