"""An in-memory stand-in for csi_thin.pool.engine.PoolEngine's public API (the controller and node
Protocols), for unit tests of the layers above the engine. The real engine is used from the
integration tier up."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model


class FakeEngine:
    def __init__(self, *, data_total: int = 10 * model.GiB, block_size: int = 64 * 1024) -> None:
        self.devices: dict[str, model.Device] = {}
        self.block_size = block_size
        self.data_total = data_total
        self.data_used = 0
        self.metadata_used = 1  # of 100
        self.mode = model.PoolMode.RW
        self.needs_check = False
        self.thresholds = model.Thresholds()
        self.busy: set[str] = set()  # names with an operation "in flight"
        self._next_id = 1

    def _check(self, *names: str) -> None:
        for n in names:
            if n in self.busy:
                raise errors.OperationPending(f"{n} busy")

    def _new(
        self,
        name: str,
        kind: model.DeviceKind,
        size: int,
        origin: str | None,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device:
        dev = model.Device(
            name=name,
            dev_id=self._next_id,
            kind=kind,
            state=model.DeviceState.READY,
            size_bytes=-(-size // self.block_size) * self.block_size,
            origin=origin,
            created_at=time.time(),
            attributes=model.attributes(attributes),
        )
        self._next_id += 1
        existing = self.devices.get(name)
        if existing is not None:
            if not existing.is_compatible_with(
                kind=kind, size_bytes=dev.size_bytes, origin=origin, attributes=dev.attributes
            ):
                raise errors.AlreadyExists(name)
            return existing
        self.devices[name] = dev
        return dev

    def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device:
        self._check(name)
        return self._new(name, model.DeviceKind.VOLUME, size_bytes, None, attributes)

    def create_snapshot(self, name: str, source: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        self._check(name, source)
        src = self.devices[source]
        return self._new(name, model.DeviceKind.SNAPSHOT, src.size_bytes, source)

    def clone(
        self,
        name: str,
        source: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device:
        self._check(name, source)
        if size_bytes < self.devices[source].size_bytes:
            raise errors.OutOfRange("smaller than source")
        return self._new(name, model.DeviceKind.VOLUME, size_bytes, source, attributes)

    def delete(self, name: str, *, deadline: deadline_mod.Deadline) -> None:
        self._check(name)
        self.devices.pop(name, None)

    def grow(self, name: str, size_bytes: int, *, deadline: deadline_mod.Deadline) -> model.Device:
        self._check(name)
        dev = dataclasses.replace(self.devices[name], size_bytes=size_bytes)
        self.devices[name] = dev
        return dev

    def activate(self, name: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        dev = dataclasses.replace(self.devices[name], active=True, path=f"/dev/fake/{name}")
        self.devices[name] = dev
        return dev

    def deactivate(self, name: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        dev = dataclasses.replace(self.devices[name], active=False, path=None)
        self.devices[name] = dev
        return dev

    def get(self, name: str) -> model.Device | None:
        return self.devices.get(name)

    def list(self, *, kind: model.DeviceKind | None = None) -> list[model.Device]:
        return [d for d in self.devices.values() if kind is None or d.kind == kind]

    def page(self, kind: model.DeviceKind, *, after: str, limit: int) -> list[model.Device]:
        devices = sorted(
            (d for d in self.devices.values() if d.kind == kind and d.name > after), key=lambda d: d.name
        )
        return devices[:limit] if limit else devices

    def volume_bytes(self) -> int:
        return sum(d.size_bytes for d in self.devices.values() if d.kind == model.DeviceKind.VOLUME)

    def lost(self) -> list[str]:
        return sorted(d.name for d in self.devices.values() if d.state == model.DeviceState.LOST)

    def space_thresholds(self, *, deadline: deadline_mod.Deadline) -> model.Thresholds:
        return self.thresholds

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        return model.PoolStatus(
            transaction_id=1,
            block_size_bytes=self.block_size,
            data_used_bytes=self.data_used,
            data_total_bytes=self.data_total,
            metadata_used_bytes=self.metadata_used,
            metadata_total_bytes=100,
            mode=self.mode,
            needs_check=self.needs_check,
        )
