"""/metrics and /healthz over real HTTP on 127.0.0.1, over the real engine and LMDB behind a real gRPC
server (fake backend: its status can be made full, read-only or unreadable on demand)."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import deadline, errors, httpserver, metrics
from csi_thin.csi.pb import csi_pb2
from tests import csi_harness as h
from tests import scrape

MiB = 1024 * 1024


@contextlib.contextmanager
def http(health: httpserver.Health, m: metrics.Metrics) -> Iterator[str]:
    srv = httpserver.HttpServer("127.0.0.1:0", health=health, metrics=m)
    srv.start()
    try:
        yield srv.address
    finally:
        srv.stop()


def test_pool_gauges_and_rpc_histograms(tmp_path: pathlib.Path) -> None:
    m = metrics.Metrics()
    with h.fake_driver(tmp_path, metrics=m) as d, http(httpserver.Health(), m) as address:
        before = scrape.metrics(address)
        assert "csi_thin_pool_data_used_bytes" not in before, "no pool attached yet: no pool gauges"
        m.attach_pool("demo", d.engine)
        vol = d.controller.CreateVolume(h.create_req("pvc-1", 64 * MiB)).volume
        d.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=vol.volume_id)
        )
        d.backend.set_condition(data_used=5 * MiB)  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as err:
            d.controller.CreateVolume(csi_pb2.CreateVolumeRequest(name=""))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        fams = scrape.metrics(address)
        assert scrape.value(fams, "csi_thin_pool_status_ok", pool="demo") == 1
        assert fams["csi_thin_pool_data_used_bytes"].type == "gauge"
        assert scrape.value(fams, "csi_thin_pool_data_used_bytes", pool="demo") == 5 * MiB
        assert scrape.value(fams, "csi_thin_pool_data_capacity_bytes", pool="demo") == 64 * h.GiB
        assert scrape.value(fams, "csi_thin_pool_metadata_capacity_bytes", pool="demo") > 0
        assert scrape.value(fams, "csi_thin_pool_provisioned_bytes", pool="demo") == 2 * 64 * MiB
        for kind in ("volume", "snapshot"):
            assert scrape.value(fams, "csi_thin_pool_devices", pool="demo", kind=kind, state="ready") == 1
        assert scrape.value(fams, "csi_thin_pool_devices", pool="demo", kind="volume", state="lost") == 0
        assert scrape.value(fams, "csi_thin_pool_threshold_ratio", pool="demo", resource="metadata") == 0.8
        assert scrape.value(fams, "csi_thin_pool_mode", pool="demo", csi_thin_pool_mode="rw") == 1
        assert scrape.value(fams, "csi_thin_pool_mode", pool="demo", csi_thin_pool_mode="ro") == 0
        for gauge in ("open_intents", "orphan_devices", "lost_devices", "needs_check"):
            assert scrape.value(fams, f"csi_thin_pool_{gauge}", pool="demo") == 0

        hist = fams["csi_thin_operation_duration_seconds"]
        assert hist.type == "histogram"
        count = "csi_thin_operation_duration_seconds_count"
        assert scrape.value(fams, count, operation="CreateVolume", grpc_code="OK") == 1
        assert scrape.value(fams, count, operation="CreateVolume", grpc_code="INVALID_ARGUMENT") == 1
        assert scrape.value(fams, count, operation="CreateSnapshot", grpc_code="OK") == 1
        assert {s.labels["operation"] for s in hist.samples} == {"CreateVolume", "CreateSnapshot"}
        assert fams["csi_thin_reconcile_errors"].type == "counter"
        assert scrape.value(fams, "csi_thin_reconcile_errors_total", resource="thinvolume") == 0
        m.reconcile_error("thinvolume")
        assert (
            scrape.value(scrape.metrics(address), "csi_thin_reconcile_errors_total", resource="thinvolume")
            == 1
        )
        labels = [s.labels for f in fams.values() for s in f.samples]
        assert not any(vol.volume_id in label.values() for label in labels), "no volume names as labels"


def test_openmetrics_shows_the_mode_as_a_stateset(tmp_path: pathlib.Path) -> None:
    m = metrics.Metrics()
    with h.fake_driver(tmp_path, metrics=m) as d, http(httpserver.Health(), m) as address:
        m.attach_pool("demo", d.engine)
        reply = scrape.get(address, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert reply.status == 200
        assert reply.content_type.startswith("application/openmetrics-text")
        assert "# TYPE csi_thin_pool_mode stateset" in reply.body
        assert reply.body.rstrip().endswith("# EOF")


def test_a_full_or_read_only_pool_stays_live(tmp_path: pathlib.Path) -> None:
    """Pool fullness and mode are metrics, never a liveness failure (kubelet would restart us)."""
    m, health = metrics.Metrics(), httpserver.Health()
    with h.fake_driver(tmp_path, metrics=m) as d, http(health, m) as address:
        m.attach_pool("demo", d.engine)
        health.set("csi", d.server.problem)
        for mode in ("out_of_data_space", "ro", "fail"):
            d.backend.set_condition(mode=mode, data_used=64 * h.GiB)  # type: ignore[attr-defined]
            reply = scrape.get(address, "/healthz")
            assert (reply.status, reply.body) == (200, "ok\n"), mode
            fams = scrape.metrics(address)
            assert scrape.value(fams, "csi_thin_pool_mode", pool="demo", csi_thin_pool_mode=mode) == 1
            assert scrape.value(fams, "csi_thin_pool_mode", pool="demo", csi_thin_pool_mode="rw") == 0
            assert scrape.value(fams, "csi_thin_pool_data_used_bytes", pool="demo") == 64 * h.GiB


def test_an_unreadable_pool_status_is_a_metric_not_a_failed_scrape(tmp_path: pathlib.Path) -> None:
    m = metrics.Metrics()
    with h.fake_driver(tmp_path, metrics=m) as d, http(httpserver.Health(), m) as address:
        m.attach_pool("demo", d.engine)
        d.backend.teardown(deadline=deadline.default())  # status now raises Unavailable
        fams = scrape.metrics(address)
        assert scrape.value(fams, "csi_thin_pool_status_ok", pool="demo") == 0
        assert "csi_thin_pool_data_used_bytes" not in fams
        d.backend.assemble(deadline=deadline.default())
        assert scrape.value(scrape.metrics(address), "csi_thin_pool_status_ok", pool="demo") == 1


def test_healthz_follows_the_csi_server(tmp_path: pathlib.Path) -> None:
    m, health = metrics.Metrics(), httpserver.Health()
    health.set("engine", lambda: None)
    with h.fake_driver(tmp_path, metrics=m) as d, http(health, m) as address:
        health.set("csi", d.server.problem)
        assert scrape.get(address, "/healthz").status == 200
        d.server.stop(grace=1)
        reply = scrape.get(address, "/healthz")
        assert reply.status == 503
        assert reply.body == f"csi: CSI server on unix://{d.socket} stopped\n"
        health.set("engine", lambda: "the pool engine is closed")
        assert scrape.get(address, "/healthz").body.splitlines() == [
            "engine: the pool engine is closed",
            f"csi: CSI server on unix://{d.socket} stopped",
        ]
        assert scrape.get(address, "/nope").status == 404


def test_a_second_server_on_a_taken_port_says_so() -> None:
    m, health = metrics.Metrics(), httpserver.Health()
    with http(health, m) as address, pytest.raises(errors.Unavailable, match="cannot listen"):
        httpserver.HttpServer(address, health=health, metrics=m)
