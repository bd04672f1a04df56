"""A pool's health issues (csi_thin.pool.health) and their CSI 1.13 messages (csi_thin.csi.health)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from csi_thin import model
from csi_thin.csi import health as csi_health
from csi_thin.csi.pb import csi_pb2
from csi_thin.pool import health, modes

GiB = model.GiB
T = model.Thresholds(data=0.95, metadata=0.80)
S = health.Severity


def status(
    *,
    mode: model.PoolMode = model.PoolMode.RW,
    data: float = 0.1,
    metadata: float = 0.1,
    needs_check: bool = False,
) -> model.PoolStatus:
    return model.PoolStatus(
        transaction_id=1,
        block_size_bytes=64 * 1024,
        data_used_bytes=int(data * 100 * GiB),
        data_total_bytes=100 * GiB,
        metadata_used_bytes=int(metadata * 1000),
        metadata_total_bytes=1000,
        mode=mode,
        needs_check=needs_check,
    )


@pytest.mark.parametrize(
    ("st", "lost", "expected"),
    [
        (status(), (), []),
        (status(data=0.949, metadata=0.799), (), []),
        (status(data=0.95), (), [(S.DEGRADED, health.DATA_ABOVE_THRESHOLD)]),
        (status(metadata=0.8), (), [(S.DEGRADED, health.METADATA_ABOVE_THRESHOLD)]),
        # full data is one issue, not also "above the threshold"
        (
            status(mode=model.PoolMode.OUT_OF_DATA_SPACE, data=1.0),
            (),
            [(S.DEGRADED, health.OUT_OF_DATA_SPACE)],
        ),
        # every issue that holds, not only the worst
        (
            status(mode=model.PoolMode.OUT_OF_DATA_SPACE, data=1.0, metadata=0.9),
            (),
            [(S.DEGRADED, health.OUT_OF_DATA_SPACE), (S.DEGRADED, health.METADATA_ABOVE_THRESHOLD)],
        ),
        (status(mode=model.PoolMode.RO), (), [(S.DEGRADED, health.READ_ONLY)]),
        (
            status(mode=model.PoolMode.RO, needs_check=True),
            (),
            [(S.DEGRADED, health.READ_ONLY), (S.DEGRADED, health.NEEDS_CHECK)],
        ),
        (status(needs_check=True), (), [(S.DEGRADED, health.NEEDS_CHECK)]),
        # a failed pool's space figures mean nothing: only that it failed
        (status(mode=model.PoolMode.FAIL, data=0.99, metadata=0.99), (), [(S.INACCESSIBLE, health.FAILED)]),
        (status(), ("v-b", "v-a"), [(S.DATA_LOSS, health.DEVICES_LOST)]),
    ],
)
def test_pool_issues(st: model.PoolStatus, lost: tuple[str, ...], expected: list[tuple[S, str]]) -> None:
    issues = health.pool(st, T, lost=lost)
    assert [(i.severity, i.reason) for i in issues] == expected
    for i in issues:
        assert re.fullmatch(r"[A-Z][a-zA-Z]+", i.reason), i.reason  # CamelCase, as the spec asks
        assert len(i.message) > 40, i.message  # says what to do, not only what is wrong


def test_messages_name_the_figures_and_the_way_out() -> None:
    (full,) = health.pool(status(mode=model.PoolMode.OUT_OF_DATA_SPACE, data=1.0), T)
    assert "out_of_data_space" in full.message and f"of {100 * GiB} bytes" in full.message
    assert "Deletes still run" in full.message
    (meta,) = health.pool(status(metadata=0.85), T)
    assert "85% used" in meta.message and "80% threshold" in meta.message
    (data,) = health.pool(status(data=0.97), T)
    assert "97% used" in data.message and "writes may fail soon" in data.message
    (ro,) = health.pool(status(mode=model.PoolMode.RO), T)
    assert ro.message == modes.HINTS[modes.Condition.READ_ONLY]  # the same words as the refusals
    (lost,) = health.pool(status(), T, lost=[f"v-{i:02}" for i in range(12)])
    assert "12 device(s)" in lost.message and "v-00, v-01" in lost.message and "and 2 more" in lost.message


def test_volume_issues_are_its_own_then_its_pools() -> None:
    dev = model.Device("v-a", 7, model.DeviceKind.VOLUME, model.DeviceState.READY, GiB, None, 0.0)
    assert health.volume(dev, status(), T) == ()
    lost = dataclasses.replace(dev, state=model.DeviceState.LOST)
    issues = health.volume(lost, status(metadata=0.9), T)
    assert [(i.severity, i.reason) for i in issues] == [
        (S.DATA_LOSS, health.DEVICE_LOST),
        (S.DEGRADED, health.METADATA_ABOVE_THRESHOLD),
    ]
    assert "device 7" in issues[0].message
    creating = dataclasses.replace(dev, state=model.DeviceState.CREATING)
    assert [i.reason for i in health.volume(creating, status(), T)] == [health.DEVICE_NOT_READY]


def test_csi_messages() -> None:
    issues = [
        health.Issue(S.DEGRADED, "A", "a"),
        health.Issue(S.INACCESSIBLE, "B", "b"),
        health.Issue(S.DATA_LOSS, "C", "c"),
        health.Issue(S.DEGRADED, "A", "a again"),  # the spec forbids a repeated (status, reason)
    ]
    vh = csi_health.volume("v-a", issues)
    assert vh.volume_id == "v-a"
    assert [(e.status, e.reason, e.message) for e in vh.health_statuses] == [
        (csi_pb2.DEGRADED, "A", "a"),
        (csi_pb2.INACCESSIBLE, "B", "b"),
        (csi_pb2.DATA_LOSS, "C", "c"),
    ]
    st = csi_health.storage(issues)
    assert [(b.status, b.reason) for b in st.backend_health] == [
        (csi_pb2.STORAGE_DEGRADED, "A"),
        (csi_pb2.STORAGE_UNREACHABLE, "B"),
        (csi_pb2.STORAGE_DEGRADED, "C"),  # storage health has no data-loss type
    ]
    assert not any(b.HasField("volume_capability") for b in st.backend_health)
    assert csi_health.volume("v-a", []).health_statuses == []


def test_csi_strings_keep_to_the_specs_size_limit() -> None:
    """CSI's general size limit (spec "Size Limits": 128 bytes for a string field, which the health
    messages do not override) holds for every reason and message a health RPC sends; a longer
    message is cut at a character boundary and says so. `pool status` keeps the full text."""
    lost = [f"v-{'x' * 60}-{i:02}" for i in range(12)]
    issues = [
        *health.pool(status(mode=model.PoolMode.OUT_OF_DATA_SPACE, data=1.0, metadata=0.9), T, lost=lost),
        *health.pool(status(mode=model.PoolMode.RO, needs_check=True), T),
        *health.pool(status(mode=model.PoolMode.FAIL), T),
        *health.pool(status(data=0.97), T),
        health.unavailable("reflink pool p at /var/lib/csi-thin/p/a/long/state/directory is not assembled"),
        health.Issue(S.INACCESSIBLE, "NotPublished", "ü" * 200),  # multi-byte: never cut inside one
    ]
    assert len(issues) == 9 and any(len(i.message.encode()) > 128 for i in issues)
    sent = [(e.reason, e.message) for e in csi_health.volume("v-a", issues).health_statuses]
    sent += [(b.reason, b.message) for b in csi_health.storage(issues).backend_health]
    assert len(sent) == 2 * len(issues)
    by_reason = {i.reason: i.message for i in issues}
    for reason, message in sent:
        assert len(reason.encode()) <= 128 and 0 < len(message.encode()) <= 128, message
        full = by_reason[reason]
        assert message == full or (message.endswith("…") and full.startswith(message[:-1])), message
