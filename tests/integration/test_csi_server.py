"""The gRPC server's life cycle: stale sockets, a second server, graceful shutdown of in-flight calls."""

from __future__ import annotations

import pathlib
import socket
import threading
import time

import grpc
import pytest

from csi_thin import errors
from csi_thin.csi import identity_service, server
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.pool import faults
from tests import csi_harness as h


def test_a_stale_socket_is_replaced(tmp_path: pathlib.Path) -> None:
    stale = tmp_path / "csi.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a killed driver leaves
    assert stale.exists()
    with h.fake_driver(tmp_path) as d:
        assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    assert not stale.exists()  # removed on a clean stop


def test_a_live_socket_is_not_stolen(tmp_path: pathlib.Path) -> None:
    with h.fake_driver(tmp_path) as d:
        second = server.Server(server.Endpoint.parse(f"unix://{d.socket}"), _services())
        with pytest.raises(errors.FailedPrecondition, match="another server"):
            second.start()
        assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_a_driver_that_cannot_start_leaves_the_live_socket_alone(tmp_path: pathlib.Path) -> None:
    """A second driver started on a served socket gives up; its shutdown must not unlink the socket
    the first one serves on (kubelet and the sidecars would lose the driver)."""
    with h.fake_driver(tmp_path) as d:
        second = server.Server(server.Endpoint.parse(f"unix://{d.socket}"), _services())
        with pytest.raises(errors.FailedPrecondition, match="another server"):
            second.serve_until_signalled(grace=1)
        assert d.socket.exists()
        assert d.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value


def test_a_file_in_the_way_is_not_removed(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "csi.sock"
    path.write_text("precious")
    with pytest.raises(errors.FailedPrecondition, match="not a socket"):
        server.remove_stale_socket(str(path))
    assert path.read_text() == "precious"


def test_tcp_endpoint(tmp_path: pathlib.Path) -> None:
    with h.fake_driver(tmp_path):
        svc = _services()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        srv = server.Server(server.Endpoint.parse(f"tcp://127.0.0.1:{port}"), svc)
        srv.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                info = csi_pb2_grpc.IdentityStub(ch).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
                assert info.name == "csi-thin.io"
        finally:
            srv.stop(grace=1)


def _services() -> server.Services:
    return server.Services(identity=identity_service.IdentityService(ready=lambda _dl: True))


def test_stop_lets_in_flight_calls_finish_and_refuses_new_ones(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached, release = threading.Event(), threading.Event()

    def hook(point: str) -> None:
        if point == "create_volume/journaled":
            reached.set()
            release.wait(30)

    monkeypatch.setattr(faults, "hook", hook)
    with h.fake_driver(tmp_path) as d:
        results: list[object] = []
        t = threading.Thread(
            target=lambda: results.append(d.controller.CreateVolume(h.create_req("pvc-a", h.MiB)))
        )
        t.start()
        assert reached.wait(10)
        stopper = threading.Thread(target=lambda: d.server.stop(grace=20))
        stopper.start()
        time.sleep(0.5)
        assert (
            h.code_of(lambda: d.identity.Probe(csi_pb2.ProbeRequest(), timeout=5))
            == grpc.StatusCode.UNAVAILABLE
        )
        release.set()
        t.join(30)
        stopper.join(30)
        assert len(results) == 1 and results[0].volume.volume_id == "v-pvc-a"  # type: ignore[attr-defined]
        assert d.engine.get("v-pvc-a") is not None
