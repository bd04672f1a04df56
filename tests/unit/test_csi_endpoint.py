"""Endpoint parsing for the gRPC server."""

from __future__ import annotations

import pytest

from csi_thin import errors
from csi_thin.csi import server


@pytest.mark.parametrize(
    ("text", "scheme", "address", "target"),
    [
        ("unix:///csi/csi.sock", "unix", "/csi/csi.sock", "unix:///csi/csi.sock"),
        ("tcp://127.0.0.1:10000", "tcp", "127.0.0.1:10000", "127.0.0.1:10000"),
        ("tcp://[::1]:9000", "tcp", "[::1]:9000", "[::1]:9000"),
        ("tcp://0.0.0.0:1", "tcp", "0.0.0.0:1", "0.0.0.0:1"),
    ],
)
def test_parse(text: str, scheme: str, address: str, target: str) -> None:
    ep = server.Endpoint.parse(text)
    assert (ep.scheme, ep.address, ep.target) == (scheme, address, target)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/csi/csi.sock",
        "unix://relative.sock",
        "unix:///a/../b.sock",
        "tcp://host",
        "tcp://:80",
        "tcp://h:p",
        "http://x:1",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        server.Endpoint.parse(text)
