"""Fakes that implement the same Protocols as the real parts.

FakeBackend keeps a dm-thin pool's observable state (device ids, the transaction id, which devices
are active, mapped bytes, mode) in one JSON file, rewritten atomically by every step. So it behaves
like the kernel across a SIGKILLed process (a forked child's steps are visible to the parent) and
across "reboots" (teardown keeps devices, drops activations).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model


class FakeBackend:
    kind = "fake"
    has_block_devices = False

    def __init__(
        self, state_file: str, *, data_total: int = 64 * model.GiB, block_size: int = 64 * 1024
    ) -> None:
        self.state_file = state_file
        self.block_size = block_size
        self._lock = threading.RLock()
        self._data_total = data_total
        self.calls: list[str] = []

    # ---- persistence -------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.state_file, encoding="utf-8") as f:
                value: dict[str, Any] = json.load(f)
                return value
        except FileNotFoundError:
            return {
                "assembled": False,
                "txid": 0,
                "devices": {},  # str(id) -> {"mapped": int}
                "active": {},  # str(id) -> size
                "held": [],  # ids a group snapshot holds (quiesce: dm-thin would have them suspended)
                "mode": "rw",
                "needs_check": False,
                "data_used": None,  # override for threshold tests
                "metadata_used_ratio": 0.01,
                "data_total": self._data_total,
            }

    def _save(self, state: dict[str, Any]) -> None:
        tmp = f"{self.state_file}.tmp.{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_file)

    def _pool(self, op: str) -> dict[str, Any]:
        self.calls.append(op)
        state = self._load()
        if not state["assembled"]:
            raise errors.Unavailable("fake pool is not assembled")
        return state

    # ---- test knobs --------------------------------------------------------------------------------

    def set_condition(self, **fields: Any) -> None:
        """Set mode / needs_check / data_used / metadata_used_ratio."""
        with self._lock:
            state = self._load()
            state.update(fields)
            self._save(state)

    def write(self, dev_id: int, nbytes: int) -> None:
        with self._lock:
            state = self._load()
            state["devices"][str(dev_id)]["mapped"] += nbytes
            self._save(state)

    # ---- Backend -------------------------------------------------------------------------------------

    def assemble(self, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._load()
            state["assembled"] = True
            state["held"] = []  # as the real backends: a hold a crash left is let go at assemble
            self._save(state)

    def teardown(self, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._load()
            state["assembled"] = False
            state["active"] = {}
            self._save(state)

    def destroy(self, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            if os.path.exists(self.state_file):
                os.unlink(self.state_file)

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        with self._lock:
            state = self._pool("status")
            used = state["data_used"]
            if used is None:
                used = sum(d["mapped"] for d in state["devices"].values())
            meta_total = 256 * model.MiB
            return model.PoolStatus(
                transaction_id=state["txid"],
                block_size_bytes=self.block_size,
                data_used_bytes=used,
                data_total_bytes=state["data_total"],
                metadata_used_bytes=int(meta_total * state["metadata_used_ratio"]),
                metadata_total_bytes=meta_total,
                mode=model.PoolMode(state["mode"]),
                needs_check=state["needs_check"],
            )

    def transaction_id(self, *, deadline: deadline_mod.Deadline) -> int:
        with self._lock:
            return int(self._pool("transaction_id")["txid"])

    def set_transaction_id(self, old: int, new: int, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._pool("set_transaction_id")
            if state["txid"] != old:
                raise errors.Internal(f"set_transaction_id: pool is at {state['txid']}, not {old}")
            state["txid"] = new
            self._save(state)

    def _check_id(self, dev_id: int) -> None:
        if not 0 <= dev_id <= model.MAX_DEVICE_ID:
            raise errors.InvalidArgument(f"thin id {dev_id} out of range")

    def create_thin(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            self._check_id(dev_id)
            state = self._pool("create_thin")
            if state["mode"] != "rw":
                raise errors.Internal("pool is not writable")
            if str(dev_id) in state["devices"]:
                raise errors.AlreadyExists(f"thin id {dev_id} already exists")
            state["devices"][str(dev_id)] = {"mapped": 0}
            self._save(state)

    def create_snap(
        self,
        dev_id: int,
        origin_id: int,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        held: bool = False,
    ) -> None:
        with self._lock:
            if held and str(origin_id) in self._load()["active"] and origin_id not in self.held():
                raise AssertionError(f"create_snap held=True of active {origin_id}, which is not held")
            self._check_id(dev_id)
            state = self._pool("create_snap")
            if str(origin_id) not in state["devices"]:
                raise errors.NotFound(f"origin thin id {origin_id} does not exist")
            if str(dev_id) in state["devices"]:
                raise errors.AlreadyExists(f"thin id {dev_id} already exists")
            state["devices"][str(dev_id)] = {"mapped": state["devices"][str(origin_id)]["mapped"]}
            self._save(state)

    def held(self) -> list[int]:
        """The ids quiesce holds now (a test knob: what must never outlive a group snapshot)."""
        with self._lock:
            return sorted(self._load().get("held", []))

    def quiesce(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._pool("quiesce")
            active = [i for i in origin_ids if str(i) in state["active"]]
            state["held"] = sorted({*state.get("held", []), *active})
            self._save(state)

    def release(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._load()
            state["held"] = [i for i in state.get("held", []) if i not in origin_ids]
            self._save(state)

    def delete(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._pool("delete")
            if str(dev_id) not in state["devices"]:
                raise errors.NotFound(f"thin id {dev_id} does not exist")
            if str(dev_id) in state["active"]:
                raise errors.FailedPrecondition(f"thin id {dev_id} is active (busy)")
            del state["devices"][str(dev_id)]
            self._save(state)

    def device_ids(self, *, deadline: deadline_mod.Deadline) -> dict[int, int]:
        with self._lock:
            state = self._pool("device_ids")
            if state["mode"] == "ro":  # as dm-thin: no messages, so no metadata snapshot to read
                raise errors.Unavailable("fake pool is read-only: its device ids cannot be read live")
            return {int(k): v["mapped"] for k, v in state["devices"].items()}

    def activate(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> str:
        with self._lock:
            state = self._pool("activate")
            if str(dev_id) not in state["devices"]:
                raise errors.NotFound(f"thin id {dev_id} does not exist")
            state["active"][str(dev_id)] = size_bytes
            self._save(state)
            return self.device_path(dev_id)

    def deactivate(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._pool("deactivate")
            if state["active"].pop(str(dev_id), None) is not None:
                self._save(state)

    def resize(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        with self._lock:
            state = self._pool("resize")
            if str(dev_id) not in state["devices"]:
                raise errors.NotFound(f"thin id {dev_id} does not exist")
            if str(dev_id) in state["active"]:
                if size_bytes < state["active"][str(dev_id)]:
                    raise errors.InvalidArgument("shrink")
                state["active"][str(dev_id)] = size_bytes
                self._save(state)

    def active_ids(self, *, deadline: deadline_mod.Deadline) -> set[int]:
        with self._lock:
            return {int(k) for k in self._pool("active_ids")["active"]}

    def kernel_size(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int | None:
        with self._lock:
            state = self._pool("kernel_size")
            if str(dev_id) not in state["devices"]:
                raise errors.NotFound(f"thin id {dev_id} does not exist")
            size = state["active"].get(str(dev_id))
            return None if size is None else int(size)

    def active_size(self, dev_id: int) -> int | None:
        with self._lock:
            size = self._load()["active"].get(str(dev_id))
            return None if size is None else int(size)

    def device_path(self, dev_id: int) -> str:
        return f"/dev/fake/thin-{dev_id}"

    def mapped_bytes(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int:
        with self._lock:
            state = self._pool("mapped_bytes")
            if str(dev_id) not in state["devices"]:
                raise errors.NotFound(f"thin id {dev_id} does not exist")
            return int(state["devices"][str(dev_id)]["mapped"])
