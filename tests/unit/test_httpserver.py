"""Pure parts of the HTTP side: address parsing and the health checks' report."""

from __future__ import annotations

import pytest

from csi_thin import errors, httpserver, metrics


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9808", ("127.0.0.1", 9808)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert httpserver.parse_address(text) == expected


@pytest.mark.parametrize("text", [":9808", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", ""])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="host:port"):
        httpserver.parse_address(text)


def test_health_reports_every_failing_check_in_order() -> None:
    health = httpserver.Health()
    assert health.problems() == []
    health.set("engine", lambda: "opening")
    health.set("csi", lambda: None)
    health.set("registration", lambda: "refused")
    assert health.problems() == ["engine: opening", "registration: refused"]
    health.set("engine", lambda: None)  # replacing a check keeps its place
    assert health.problems() == ["registration: refused"]


def test_reconcile_error_labels_are_a_closed_set() -> None:
    m = metrics.Metrics()
    m.reconcile_error("thinsnapshot")
    with pytest.raises(errors.InvalidArgument, match="resource"):
        m.reconcile_error("pvc-123")  # a name would be an unbounded label value


def test_cr_wait_and_pool_operation_labels_are_closed_sets() -> None:
    m = metrics.Metrics()
    m.cr_wait("create_volume", "ok", 0.1)
    m.pool_operation("create_snapshot", "OK", 0.2)
    with pytest.raises(errors.InvalidArgument, match="operation"):
        m.cr_wait("v-pvc-123", "ok", 0.1)
    with pytest.raises(errors.InvalidArgument, match="outcome"):
        m.cr_wait("delete", "pvc-123 vanished", 0.1)
    with pytest.raises(errors.InvalidArgument, match="operation"):
        m.pool_operation("pvc-123", "OK", 0.1)
