"""Kubelet plugin registration over a real unix socket, with a Python gRPC client playing kubelet's
plugin watcher: GetInfo, then NotifyRegistrationStatus (registered, and refused with an error)."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import socket
import stat
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import errors, httpserver, metrics
from csi_thin.csi import registration, server
from csi_thin.csi.pb import pluginregistration_pb2 as pr
from csi_thin.csi.pb import pluginregistration_pb2_grpc as pr_grpc
from tests import scrape

DRIVER = "csi-thin.io"


@contextlib.contextmanager
def serving(reg: registration.RegistrationServer) -> Iterator[pr_grpc.RegistrationStub]:
    reg.start()
    try:
        with grpc.insecure_channel(f"unix://{reg.path}") as channel:
            yield pr_grpc.RegistrationStub(channel)
    finally:
        reg.stop(grace=1)


def _server(kubelet: pathlib.Path, m: metrics.Metrics | None = None) -> registration.RegistrationServer:
    return registration.RegistrationServer(
        kubelet_dir=str(kubelet),
        driver_name=DRIVER,
        endpoint="/var/lib/kubelet/plugins/csi-thin.io/csi.sock",
        metrics=m,
    )


def test_kubelet_gets_info_and_reports_both_outcomes(tmp_path: pathlib.Path) -> None:
    m = metrics.Metrics()
    reg = _server(tmp_path, m)
    assert reg.path == str(tmp_path / "plugins_registry" / "csi-thin.io-reg.sock")
    with serving(reg) as kubelet:
        mode = os.lstat(reg.path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, oct(mode)

        info = kubelet.GetInfo(pr.InfoRequest(), timeout=10)
        assert info.type == "CSIPlugin"
        assert info.name == DRIVER
        assert info.endpoint == "/var/lib/kubelet/plugins/csi-thin.io/csi.sock"
        assert list(info.supported_versions) == ["1.0.0"]
        assert reg.service.status.state == registration.State.PENDING
        assert reg.problem() is None, "not yet told is not a failure"

        kubelet.NotifyRegistrationStatus(pr.RegistrationStatus(plugin_registered=True), timeout=10)
        assert reg.service.status.state == registration.State.REGISTERED
        assert reg.problem() is None

        kubelet.NotifyRegistrationStatus(
            pr.RegistrationStatus(plugin_registered=False, error="plugin csi-thin.io already registered"),
            timeout=10,
        )
        status = reg.service.status
        assert (status.state, status.error) == (
            registration.State.FAILED,
            "plugin csi-thin.io already registered",
        )
        assert reg.problem() == "kubelet refused the registration: plugin csi-thin.io already registered"
        health = httpserver.Health()
        health.set("registration", reg.problem)
        srv = httpserver.HttpServer("127.0.0.1:0", health=health, metrics=m)
        srv.start()
        try:
            reply = scrape.get(srv.address, "/healthz")
            assert reply.status == 503
            assert "kubelet refused the registration" in reply.body
            fams = scrape.metrics(srv.address)
        finally:
            srv.stop()
        state = "csi_thin_kubelet_registration"
        assert scrape.value(fams, state, csi_thin_kubelet_registration="failed") == 1
        assert scrape.value(fams, state, csi_thin_kubelet_registration="registered") == 0
        count = "csi_thin_operation_duration_seconds_count"
        assert scrape.value(fams, count, operation="NotifyRegistrationStatus", grpc_code="OK") == 2

        kubelet.NotifyRegistrationStatus(pr.RegistrationStatus(plugin_registered=True), timeout=10)
        assert reg.problem() is None  # kubelet retried and accepted: healthy again
    assert not os.path.exists(reg.path), "the socket goes at stop: kubelet deregisters the driver"
    assert reg.problem() == "kubelet registration socket not serving"


def test_a_stale_socket_is_replaced_and_a_live_one_is_not_stolen(tmp_path: pathlib.Path) -> None:
    reg = _server(tmp_path)
    os.makedirs(os.path.dirname(reg.path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(reg.path)
    stale.close()  # the file stays, nobody listens: what a killed node plugin leaves
    with serving(reg) as kubelet:
        assert kubelet.GetInfo(pr.InfoRequest(), timeout=10).name == DRIVER
        second = _server(tmp_path)
        with pytest.raises(errors.FailedPrecondition, match="another server"):
            second.start()
        assert kubelet.GetInfo(pr.InfoRequest(), timeout=10).name == DRIVER


def test_a_deleted_socket_fails_health(tmp_path: pathlib.Path) -> None:
    reg = _server(tmp_path)
    with serving(reg):
        os.unlink(reg.path)
        assert reg.problem() == f"kubelet registration socket {reg.path} was removed"


@pytest.mark.parametrize(
    ("kubelet_dir", "driver", "endpoint", "match"),
    [
        ("/var/lib/kubelet", "../evil", "/csi.sock", "driver name"),
        ("/var/lib/kubelet", "Csi-Thin.io", "/csi.sock", "driver name"),
        ("/var/lib/kubelet", "x" * 64, "/csi.sock", "driver name"),
        ("var/lib/kubelet", DRIVER, "/csi.sock", "kubelet dir"),
        ("/var/lib/kubelet", DRIVER, "/a/../csi.sock", "registration endpoint"),
        ("/" + "k" * 80, DRIVER, "/csi.sock", "longer than a unix socket path"),
    ],
)
def test_bad_parameters_are_refused(kubelet_dir: str, driver: str, endpoint: str, match: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        registration.RegistrationServer(kubelet_dir=kubelet_dir, driver_name=driver, endpoint=endpoint)


def test_a_tcp_endpoint_needs_an_explicit_registration_path() -> None:
    args = argparse.Namespace(kubelet_dir="/var/lib/kubelet", kubelet_registration_path="")
    tcp = server.Endpoint.parse("tcp://127.0.0.1:10000")
    with pytest.raises(errors.InvalidArgument, match="--kubelet-registration-path"):
        registration.from_args(args, endpoint=tcp, driver_name=DRIVER, metrics=metrics.Metrics())
    unix = server.Endpoint.parse("unix:///var/lib/kubelet/plugins/csi-thin.io/csi.sock")
    reg = registration.from_args(args, endpoint=unix, driver_name=DRIVER, metrics=metrics.Metrics())
    assert reg is not None
    assert reg.path == "/var/lib/kubelet/plugins_registry/csi-thin.io-reg.sock"
    args.kubelet_dir = ""
    assert registration.from_args(args, endpoint=unix, driver_name=DRIVER, metrics=metrics.Metrics()) is None
