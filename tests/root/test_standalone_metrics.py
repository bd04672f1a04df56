"""The real `csi-thin standalone` process with its HTTP side and kubelet registration turned on
(reflink backend, natively): /healthz answers, a volume made over CSI shows in /metrics as Prometheus
parses it, a kubelet-like client registers over the real registration socket, and SIGTERM removes it."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import demo
from csi_thin.csi.pb import csi_pb2
from csi_thin.csi.pb import pluginregistration_pb2 as pr
from csi_thin.csi.pb import pluginregistration_pb2_grpc as pr_grpc
from tests import scrape

MiB = 1024 * 1024
_ADDRESS = re.compile(r"msg=serving http \(/healthz, /metrics\) address=(\S+)")


@pytest.fixture
def kubelet_dir() -> Iterator[pathlib.Path]:
    """A kubelet dir of our own, short: pytest's tmp_path would overflow a unix socket's 107 bytes."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="csi-thin-kubelet-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def work(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    yield tmp_path
    problems = demo.cleanup(tmp_path, tmp_path / "pool.yaml")
    assert not problems, problems


def _http_address(log: pathlib.Path, proc: object, timeout: float = 60.0) -> str:
    """The address the driver bound (port 0 asked: the kernel chose), from its own log line."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = _ADDRESS.search(log.read_text(errors="replace")) if log.exists() else None
        if found:
            return found.group(1)
        assert proc.poll() is None, f"driver exited:\n{log.read_text()[-3000:]}"  # type: ignore[attr-defined]
        time.sleep(0.1)
    raise AssertionError(f"no http address logged:\n{log.read_text()[-3000:]}")


def test_metrics_healthz_and_registration_of_a_running_driver(
    work: pathlib.Path, kubelet_dir: pathlib.Path
) -> None:
    config = demo.pool_config(work, "reflink")
    sock = work / "csi.sock"
    reg_sock = kubelet_dir / "plugins_registry" / "csi-thin.io-reg.sock"
    extra = ["--http-endpoint", "127.0.0.1:0", "--kubelet-dir", str(kubelet_dir)]
    with demo.driver(config, sock, extra_args=extra) as proc:
        address = _http_address(work / "driver.log", proc)
        channel = grpc.insecure_channel(f"unix://{sock}")
        d = demo.Demo(channel)
        demo.wait_ready(d, proc)
        with channel, grpc.insecure_channel(f"unix://{reg_sock}") as reg_channel:
            health = scrape.get(address, "/healthz")
            assert (health.status, health.body) == (200, "ok\n")
            before = scrape.metrics(address)
            assert (
                scrape.value(before, "csi_thin_pool_devices", pool="demo", kind="volume", state="ready") == 0
            )
            used_before = scrape.value(before, "csi_thin_pool_data_used_bytes", pool="demo")

            vol = d.create("pvc-metrics", 64 * MiB, demo.mount_cap("xfs"))
            snap = d.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name="snap-metrics", source_volume_id=vol.volume_id)
            ).snapshot
            fams = scrape.metrics(address)
            assert fams["csi_thin_pool_data_used_bytes"].type == "gauge"
            assert scrape.value(fams, "csi_thin_pool_status_ok", pool="demo") == 1
            for kind in ("volume", "snapshot"):
                assert scrape.value(fams, "csi_thin_pool_devices", pool="demo", kind=kind, state="ready") == 1
            provisioned = scrape.value(fams, "csi_thin_pool_provisioned_bytes", pool="demo")
            assert provisioned == 2 * vol.capacity_bytes
            assert scrape.value(fams, "csi_thin_pool_data_capacity_bytes", pool="demo") > used_before
            assert scrape.value(fams, "csi_thin_pool_mode", pool="demo", csi_thin_pool_mode="rw") == 1
            assert fams["csi_thin_operation_duration_seconds"].type == "histogram"
            count = "csi_thin_operation_duration_seconds_count"
            assert scrape.value(fams, count, operation="CreateVolume", grpc_code="OK") == 1
            assert scrape.value(fams, count, operation="CreateSnapshot", grpc_code="OK") == 1
            assert scrape.value(fams, count, operation="Probe", grpc_code="OK") >= 1
            assert (
                scrape.value(fams, "csi_thin_kubelet_registration", csi_thin_kubelet_registration="pending")
                == 1
            )
            assert scrape.value(fams, "process_resident_memory_bytes") > 0

            kubelet = pr_grpc.RegistrationStub(reg_channel)
            info = kubelet.GetInfo(pr.InfoRequest(), timeout=10)
            assert (info.type, info.name, info.endpoint) == ("CSIPlugin", "csi-thin.io", str(sock))
            kubelet.NotifyRegistrationStatus(pr.RegistrationStatus(plugin_registered=True), timeout=10)
            fams = scrape.metrics(address)
            assert (
                scrape.value(
                    fams, "csi_thin_kubelet_registration", csi_thin_kubelet_registration="registered"
                )
                == 1
            )
            kubelet.NotifyRegistrationStatus(
                pr.RegistrationStatus(plugin_registered=False, error="no"), timeout=10
            )
            health = scrape.get(address, "/healthz")
            assert (health.status, health.body) == (
                503,
                "registration: kubelet refused the registration: no\n",
            )

            d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
            d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
            fams = scrape.metrics(address)
            assert scrape.value(fams, "csi_thin_pool_provisioned_bytes", pool="demo") == 0
            assert scrape.value(fams, count, operation="DeleteVolume", grpc_code="OK") == 1
        assert reg_sock.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not reg_sock.exists(), "registration socket removed at shutdown (kubelet deregisters)"
    assert not sock.exists()


def test_the_running_driver_trims_on_its_schedule(work: pathlib.Path) -> None:
    """The trim schedule is wired into the real process: a plan left overdue by an earlier process
    (the node was down when it was due) runs after its share of the jitter (0 here), the run shows
    in /metrics and `pool status`, and SIGTERM stops the schedule with the driver."""
    config = demo.pool_config(work, "reflink")
    config.write_text(config.read_text() + "trim: {interval: 1h, jitter: 0s}\n")
    (work / "state").mkdir(mode=0o700)
    (work / "state" / "trim.json").write_text(json.dumps({"v": 1, "next_at": time.time() - 60}))
    sock = work / "csi.sock"
    with demo.driver(config, sock, extra_args=["--http-endpoint", "127.0.0.1:0"]) as proc:
        address = _http_address(work / "driver.log", proc)
        log = work / "driver.log"
        end = time.monotonic() + 60
        # the run, then the next plan (recorded before its log line): the order `step` keeps
        while log.read_text(errors="replace").count("event=trim-planned") < 2:
            assert time.monotonic() < end, f"no scheduled trim and next plan:\n{log.read_text()[-3000:]}"
            assert proc.poll() is None, f"driver exited:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        assert "event=trimmed" in log.read_text(errors="replace")
        fams = scrape.metrics(address)
        assert scrape.value(fams, "csi_thin_pool_trim_runs_total", pool="demo", result="ok") == 1
        assert scrape.value(fams, "csi_thin_pool_trim_runs_total", pool="demo", result="failed") == 0
        assert scrape.value(fams, "csi_thin_pool_trim_last_run_timestamp_seconds", pool="demo") > 0
        status = subprocess.run(
            [sys.executable, "-m", "csi_thin.cli", "pool", "status", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        trim = json.loads(status.stdout)["trim"]
        assert trim["runs"] == 1 and trim["interval_seconds"] == 3600
        # the next run is planned an interval after this one
        assert trim["next_at"] == pytest.approx(trim["last_finished_at"] + 3600, abs=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
