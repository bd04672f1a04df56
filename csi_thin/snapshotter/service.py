"""containerd's snapshotter semantics on the pool engine: what each Snapshots RPC means.

The gRPC edge (csi_thin.csi.snapshots) validates and translates; this module decides, raising
domain errors with containerd's codes (errdefs over gRPC: NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument); csi_thin.pool.layers runs the journalled transactions.

- Prepare: a new device of base_image_size formatted with fs_type (+ fs_options) without a parent,
  else a snapshot of the committed parent; active, read-write mounts. View: the same, read-only.
- Mounts: of an active or view snapshot (its device activated again after a node restart).
- Commit: the active snapshot becomes a committed one under its new name, its device DEACTIVATED
  (nothing can write a committed layer, and an inactive origin needs no suspend when snapshotted).
- Remove: leaves only. async_remove: the device waits for Cleanup.
- Stat, Update (labels only; field paths `labels` and `labels.<key>`), Walk (containerd filters),
  Usage (the bytes the pool mapped for the device), Cleanup.

A mount is `{type: <fs>, source: /dev/..., options: [ro?, nouuid (xfs)]}`: containerd mounts it. XFS
snapshots share their base's UUID, so xfs mounts carry nouuid.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

from csi_thin import config, errors, model, runner
from csi_thin import deadline as deadline_mod
from csi_thin.node import filesystem
from csi_thin.pool import engine as engine_mod
from csi_thin.pool import layers as layers_mod
from csi_thin.snapshotter import filters

log = logging.getLogger(__name__)

#: the device attribute that says which filesystem a layer chain carries (set on its base)
ATTR_FS_TYPE = model.ATTR_FS_TYPE
#: containerd's label for the size a block snapshotter should give a new active snapshot
LABEL_MAX_SIZE = "containerd.io/snapshot/max-size"


@dataclasses.dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Info:
    """containerd's snapshots.Info."""

    name: str
    parent: str
    kind: model.LayerKind
    created_at: float
    updated_at: float
    labels: tuple[tuple[str, str], ...]


def _info(layer: model.Layer) -> Info:
    return Info(
        name=layer.key,
        parent=layer.parent,
        kind=layer.kind,
        created_at=layer.created_at,
        updated_at=layer.updated_at,
        labels=layer.labels,
    )


def _adaptor(info: Info) -> filters.Adaptor:
    """The fields containerd's snapshot filters look at: kind, name, parent, labels.<key>."""
    labels = dict(info.labels)

    def field(path: tuple[str, ...]) -> tuple[str, bool]:
        head = path[0] if path else ""
        if head == "kind" and len(path) == 1:
            return info.kind.value, True
        if head == "name" and len(path) == 1:
            return info.name, True
        if head == "parent" and len(path) == 1:
            return info.parent, True
        if head == "labels" and len(path) > 1:
            key = ".".join(path[1:])
            return labels.get(key, ""), key in labels
        return "", False

    return field


def updated_labels(
    current: Mapping[str, str], given: Mapping[str, str], fieldpaths: Iterable[str]
) -> dict[str, str]:
    """containerd's Update: no paths replace every label; `labels` does too; `labels.<k>` sets the
    label k to the given value (or removes it when not given). Other fields are immutable."""
    paths = list(fieldpaths)
    if not paths:
        return dict(given)
    out = dict(current)
    for path in paths:
        if path == "labels":
            out = dict(given)
        elif path.startswith("labels."):
            key = path[len("labels.") :]
            if key in given:
                out[key] = given[key]
            else:
                out.pop(key, None)
        else:
            raise errors.InvalidArgument(
                f"cannot update field {path!r} of a snapshot: only labels are mutable"
            )
    return out


class Snapshotter:
    def __init__(self, engine: engine_mod.PoolEngine, settings: config.SnapshotterConfig) -> None:
        self.engine = engine
        self.settings = settings
        self.layers = layers_mod.Layers(engine)

    # ---- helpers -------------------------------------------------------------------------------------

    def _format(self, path: str, deadline: deadline_mod.Deadline) -> None:
        # a new thin device reads zeroes: never format anything else
        found = filesystem.probe(path, deadline=deadline)
        if found is not None:
            raise errors.FailedPrecondition(
                f"new layer device {path} already holds {found}: not formatting it"
            )
        filesystem.make(path, self.settings.fs_type.value, deadline=deadline, extra=self.settings.fs_options)
        if self.settings.fs_type == config.LayerFs.EXT4:
            filesystem.remove_lost_found(path, deadline=deadline)

    def _discard(self, path: str, deadline: deadline_mod.Deadline) -> None:
        runner.run(["blkdiscard", path], deadline=deadline)

    def _discarder(self) -> layers_mod.Discarder | None:
        return self._discard if self.settings.discard_blocks else None

    def _base_size(self, labels: Mapping[str, str]) -> int:
        """A base layer's size: base_image_size, or containerd's max-size label when given (a
        snapshot of a parent keeps the parent's size)."""
        text = labels.get(LABEL_MAX_SIZE)
        if text is None:
            return self.settings.base_image_size
        least = max(1, filesystem.min_bytes(self.settings.fs_type.value))
        if not (text.isascii() and text.isdigit()) or int(text) < least:
            raise errors.InvalidArgument(
                f"label {LABEL_MAX_SIZE}={text!r}: a number of bytes, at least {least} for "
                f"{self.settings.fs_type.value}"
            )
        return int(text)

    def _mounts(self, layer: model.Layer, dev: model.Device) -> list[Mount]:
        if dev.path is None:
            raise errors.Internal(f"snapshot {layer.key!r}: device {dev.name} is not active")
        fs = dict(dev.attributes).get(ATTR_FS_TYPE, self.settings.fs_type.value)
        options = (["ro"] if layer.kind == model.LayerKind.VIEW else []) + (["nouuid"] if fs == "xfs" else [])
        return [Mount(type=fs, source=dev.path, options=tuple(options))]

    # ---- the RPCs ------------------------------------------------------------------------------------

    def prepare(
        self,
        key: str,
        parent: str,
        labels: Mapping[str, str],
        *,
        view: bool = False,
        deadline: deadline_mod.Deadline,
    ) -> list[Mount]:
        layer, dev = self.layers.prepare(
            key,
            parent=parent,
            kind=model.LayerKind.VIEW if view else model.LayerKind.ACTIVE,
            labels=labels,
            size_bytes=self._base_size(labels),
            fmt=self._format,
            attributes={ATTR_FS_TYPE: self.settings.fs_type.value},
            deadline=deadline,
        )
        return self._mounts(layer, dev)

    def mounts(self, key: str, *, deadline: deadline_mod.Deadline) -> list[Mount]:
        layer = self.layers.require(key)
        if layer.kind == model.LayerKind.COMMITTED:
            raise errors.FailedPrecondition(
                f"snapshot {key!r} is committed: only active and view snapshots mount"
            )
        dev = self.layers.device(layer)
        if dev.active and not self.layers.stale(layer):
            return self._mounts(layer, dev)
        # after a node restart the kernel's devices are gone, the records stay: activate it again
        # under the key's claim (a Commit must not slip between this check and the activation)
        return self._mounts(*self.layers.activate(key, deadline=deadline))

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], *, deadline: deadline_mod.Deadline
    ) -> None:
        self.layers.commit(name, key, labels=labels, deadline=deadline)

    def remove(self, key: str, *, deadline: deadline_mod.Deadline) -> None:
        self.layers.remove(
            key, deferred=self.settings.async_remove, discard=self._discarder(), deadline=deadline
        )

    def stat(self, key: str) -> Info:
        layers_mod.validate_key(key)
        return _info(self.layers.require(key))

    def update(self, key: str, labels: Mapping[str, str], fieldpaths: Iterable[str]) -> Info:
        current = self.layers.require(key)
        new = updated_labels(dict(current.labels), labels, fieldpaths)
        return _info(self.layers.set_labels(key, new))

    def walk(self, filter_texts: Iterable[str]) -> list[Info]:
        flt = filters.parse_all(list(filter_texts))
        return [info for info in map(_info, self.layers.list()) if flt.match(_adaptor(info))]

    def usage(self, key: str, *, deadline: deadline_mod.Deadline) -> tuple[int, int]:
        """(bytes, inodes): the pool's mapped bytes for the device; inodes are not counted (0)."""
        return self.layers.usage(key, deadline=deadline), 0

    def cleanup(self, *, deadline: deadline_mod.Deadline) -> list[str]:
        gone = self.layers.cleanup(discard=self._discarder(), deadline=deadline)
        if gone:
            log.info("event=cleanup devices=%s", gone)
        return gone
