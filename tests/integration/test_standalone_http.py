"""`csi-thin standalone`'s wiring of /healthz, /metrics and kubelet registration through its life:
503 while the engine opens (the HTTP side is up first), 200 once the CSI socket serves, registration
socket up only after the CSI socket and gone after SIGTERM. In-process (main thread, as the CLI runs
it) over the fake backend; the real process on a real pool is tests/root/test_standalone_metrics.py."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from csi_thin import app, cli, config
from csi_thin.csi import standalone
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import engine as engine_mod
from tests import fakes, scrape


class _Addresses(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.logged = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"address=(\S+)", record.getMessage())
        if match and "serving http" in record.getMessage():
            self.found.append(match.group(1))
            self.logged.set()


@pytest.fixture
def kubelet_dir() -> Iterator[pathlib.Path]:
    path = pathlib.Path(tempfile.mkdtemp(prefix="csi-thin-kubelet-", dir="/tmp"))  # short: a socket path
    yield path
    shutil.rmtree(path)


def test_health_and_registration_follow_the_driver_life(
    tmp_path: pathlib.Path, kubelet_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_backend(cfg: config.PoolConfig) -> backend_mod.Backend:
        return fakes.FakeBackend(str(tmp_path / "fake-pool.json"))

    monkeypatch.setattr(app, "make_backend", fake_backend)
    pool_yaml = tmp_path / "pool.yaml"
    pool_yaml.write_text(
        f"name: dev\nbackend: dmthin\nstate_dir: {tmp_path}/state\n"
        f"dmthin:\n  data_file: {tmp_path}/data.img\n  data_size: 1GiB\n"
    )
    sock = tmp_path / "csi.sock"
    reg_sock = kubelet_dir / "plugins_registry" / "csi-thin.io-reg.sock"
    opening, proceed = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def slow_open(cfg: config.PoolConfig) -> Iterator[engine_mod.PoolEngine]:
        opening.set()
        assert proceed.wait(30), "the test thread never let the engine open"
        with app.open_engine(cfg) as eng:
            yield eng

    seen: dict[str, object] = {}

    def kubelet_and_prometheus() -> None:
        try:
            assert opening.wait(30) and addresses.logged.wait(30)
            address = addresses.found[0]
            seen["opening"] = scrape.get(address, "/healthz")
            seen["reg socket while opening"] = reg_sock.exists()
            proceed.set()
            end = time.monotonic() + 30
            while scrape.get(address, "/healthz").status != 200 and time.monotonic() < end:
                time.sleep(0.05)  # waits for the driver to reach serving, bounded
            seen["serving"] = scrape.get(address, "/healthz")
            seen["reg socket while serving"] = reg_sock.exists()
            seen["metrics"] = scrape.metrics(address)
        finally:
            proceed.set()
            os.kill(os.getpid(), signal.SIGTERM)  # the driver's handler stops it

    argv = ["standalone", "--endpoint", f"unix://{sock}", "--pool-config", str(pool_yaml), "--grace", "2"]
    argv += ["--http-endpoint", "127.0.0.1:0", "--kubelet-dir", str(kubelet_dir)]
    args = cli.build_parser().parse_args(argv)
    addresses = _Addresses()
    http_log = logging.getLogger("csi_thin.httpserver")
    http_log.addHandler(addresses)
    root_level = logging.getLogger().level
    # the driver installs its own SIGTERM handler while it serves and restores this one: a SIGTERM
    # that arrives after it stopped (the helper failing late) must not kill pytest
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    helper = threading.Thread(target=kubelet_and_prometheus)
    try:
        helper.start()
        assert standalone.main(args, open_engine=slow_open) == 0
    finally:
        helper.join(60)
        signal.signal(signal.SIGTERM, previous)
        http_log.removeHandler(addresses)
        logging.getLogger().setLevel(root_level)

    opening = seen["opening"]
    assert isinstance(opening, scrape.Reply)
    assert opening.status == 503
    assert opening.body.splitlines() == [
        "engine: the pool engine is opening (assembly and recovery)",
        "csi: the CSI server is not started yet",
    ]
    assert seen["reg socket while opening"] is False, "kubelet must not be told before the CSI socket serves"
    serving = seen["serving"]
    assert isinstance(serving, scrape.Reply)
    assert (serving.status, serving.body) == (200, "ok\n")
    assert seen["reg socket while serving"] is True
    fams = seen["metrics"]
    assert isinstance(fams, dict)
    assert scrape.value(fams, "csi_thin_pool_status_ok", pool="dev") == 1
    assert scrape.value(fams, "csi_thin_kubelet_registration", csi_thin_kubelet_registration="pending") == 1
    assert not reg_sock.exists(), "the registration socket is removed at shutdown"
    assert not sock.exists()
