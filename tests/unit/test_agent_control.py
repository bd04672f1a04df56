"""The node agent's pieces that need no API server: the ThinPool status coalescer (a mark is published
within the interval, a burst of marks is a few publishes, a failed publish backs off), and the
control socket's protocol (`pool gc --orphans --node-id` to an agent, here a fake one) with its
refusals and the CLI's exit codes."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import socket
import threading
import time

import pytest

from csi_thin import cli, config, errors
from csi_thin import deadline as deadline_mod
from csi_thin.node import agent as agent_mod
from csi_thin.node import control
from tests.unit.fake_engine import FakeEngine


def _wait(cond: threading.Condition, pred: object, timeout: float) -> bool:
    with cond:
        return cond.wait_for(pred, timeout)  # type: ignore[arg-type]


def test_a_burst_of_marks_is_few_publishes_and_the_last_state_is_published() -> None:
    interval = 0.1
    state = {"value": 0}
    published: list[tuple[float, int]] = []
    cond = threading.Condition()

    def publish() -> bool:
        with cond:
            published.append((time.monotonic(), state["value"]))
            cond.notify_all()
        return True

    co = agent_mod.Coalescer(publish, interval=interval, period=3600)
    co.start()
    try:
        t0 = time.monotonic()
        for i in range(1, 501):
            state["value"] = i
            co.mark()
        burst = time.monotonic() - t0
        assert _wait(cond, lambda: published and published[-1][1] == 500, 10), published
        # publishes start at least an interval apart (the writer's own clock): at most one per
        # interval while marks kept coming, plus the one after the last
        assert len(published) <= 2 + int(burst / interval), (len(published), burst)
        # quiet now: no mark, no publish (the period is an hour)
        time.sleep(3 * interval)
        assert published[-1][1] == 500 and len(published) <= 2 + int(burst / interval)
    finally:
        co.stop()


def test_a_failed_publish_is_retried_with_backoff_then_settles() -> None:
    calls: list[float] = []
    cond = threading.Condition()

    def publish() -> bool:
        with cond:
            calls.append(time.monotonic())
            cond.notify_all()
            return len(calls) >= 4  # the API server is back at the fourth try

    co = agent_mod.Coalescer(publish, interval=0.01, period=3600)
    co.start()
    try:
        co.mark()
        assert _wait(cond, lambda: len(calls) >= 4, 10), calls
        time.sleep(0.5)
        assert len(calls) == 4, "a successful publish with no new mark is the last one"
        # backoff from RETRY_FIRST, doubling (0.2 + 0.4 + 0.8 s), not the 10 ms interval; a tenth of
        # slack for the scheduling of the first and last call
        expected = agent_mod.RETRY_FIRST * (1 + 2 + 4)
        assert calls[3] - calls[0] >= 0.9 * expected, [b - a for a, b in itertools.pairwise(calls)]
    finally:
        co.stop()


def test_the_period_publishes_without_marks() -> None:
    cond = threading.Condition()
    count = [0]

    def publish() -> bool:
        with cond:
            count[0] += 1
            cond.notify_all()
        return True

    co = agent_mod.Coalescer(publish, interval=0.01, period=0.05)
    co.start()
    try:
        assert _wait(cond, lambda: count[0] >= 3, 10)
    finally:
        co.stop()


class FakeAgent:
    """Answers gc as an agent would; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def gc_orphans(self, *, grace_seconds: float, deadline: deadline_mod.Deadline) -> agent_mod.GcReport:
        assert deadline.remaining() > 0
        self.asked.append(grace_seconds)
        return agent_mod.GcReport(
            deleted=("v-old",),
            waiting=(agent_mod.Waiting("v-new", 5.0, 3595.0),),
            kept=(agent_mod.Kept("id:7", "ThinVolume v-x (its status.deviceId 7) names it"),),
            failed=(),
        )


@pytest.fixture
def served(tmp_path: pathlib.Path) -> tuple[str, FakeAgent, str]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(
        f"name: p\nbackend: reflink\nstate_dir: {state}\n"
        f"reflink:\n  directory: {tmp_path}/pool\n  image_file: {tmp_path}/pool.img\n  image_size: 1GiB\n"
    )
    fake = FakeAgent()
    srv = control.Server(str(state), agent=fake, node="n1")  # type: ignore[arg-type]
    srv.start()
    try:
        yield str(state), fake, str(cfg)
    finally:
        srv.stop()
    assert not os.path.exists(control.socket_path(str(state))), "stop removes the socket"


def test_the_socket_is_private(served: tuple[str, FakeAgent, str]) -> None:
    state, _, _ = served
    assert os.stat(control.socket_path(state)).st_mode & 0o777 == 0o600


def test_gc_request_round_trip(served: tuple[str, FakeAgent, str]) -> None:
    state, fake, _ = served
    got = control.request_gc(state, node="n1", grace_seconds=90.0, timeout=10)
    assert fake.asked == [90.0]
    assert got["deleted"] == ["v-old"]
    assert got["waiting"] == [{"name": "v-new", "orphan_seconds": 5.0, "eligible_in_seconds": 3595.0}]
    assert got["kept"][0]["name"] == "id:7" and got["failed"] == []


def test_the_wrong_node_is_refused(served: tuple[str, FakeAgent, str]) -> None:
    state, fake, _ = served
    with pytest.raises(errors.FailedPrecondition, match="agent of node 'n1', not of 'n2'"):
        control.request_gc(state, node="n2", grace_seconds=0, timeout=10)
    assert fake.asked == []


def test_cli_kubernetes_gc_output_and_exit_codes(
    served: tuple[str, FakeAgent, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, fake, cfg = served
    assert cli.main(["pool", "gc", "--orphans", "--config", cfg, "--node-id", "n1", "--grace", "30m"]) == 0
    out = capsys.readouterr().out
    assert fake.asked == [1800.0]
    assert "deleted 1 orphan(s): v-old" in out
    assert "waiting: v-new (an orphan for 5s of the 1800s grace period; eligible in 3595s)" in out
    assert "kept: id:7: ThinVolume v-x" in out
    # the default grace is an hour
    assert cli.main(["pool", "gc", "--orphans", "--config", cfg, "--node-id", "n1", "--json"]) == 0
    assert fake.asked[-1] == control.DEFAULT_GRACE_SECONDS
    # bad input: exit 2, nothing asked
    for extra in (["--force"], ["--grace=-1h"], ["--grace", "soon"]):
        assert cli.main(["pool", "gc", "--orphans", "--config", cfg, "--node-id", "n1", *extra]) == 2
    assert cli.main(["pool", "gc", "--orphans", "--config", cfg, "--grace", "1h"]) == 2
    assert len(fake.asked) == 2
    # another node's agent: exit 1
    assert cli.main(["pool", "gc", "--orphans", "--config", cfg, "--node-id", "n2"]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_no_agent_is_unavailable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.Unavailable, match="no node agent answers"):
        control.request_gc(str(tmp_path), node="n1", grace_seconds=0, timeout=5)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("1h", 3600.0), ("1.5h", 5400.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1s", "soon", "inf", "nan"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        config.parse_duration(text)


def test_a_publish_that_raises_does_not_end_the_writer() -> None:
    """An unexpected exception in one publish (a bug, an error the client does not translate) is a
    failed publish, retried: the writer thread must not die with it, or the ThinPool status (and so
    GetCapacity) would stay stale until the process restarts."""
    calls: list[float] = []
    cond = threading.Condition()

    def publish() -> bool:
        with cond:
            calls.append(time.monotonic())
            cond.notify_all()
        if len(calls) == 1:
            raise RuntimeError("not a CsiThinError")
        return True

    co = agent_mod.Coalescer(publish, interval=0.01, period=3600)
    co.start()
    try:
        co.mark()
        # the failed one is retried after the first backoff, no new mark needed
        assert _wait(cond, lambda: len(calls) >= 2, 10), calls
        co.mark()
        assert _wait(cond, lambda: len(calls) >= 3, 10), calls
    finally:
        co.stop()


class _OrphanEngine(FakeEngine):
    """Records with no CR are the orphans here; no pool ids without a record."""

    def orphans(self) -> list[int]:
        return []


class _SlowApi:
    """An API server that answers the first read only when released; no CR exists."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def find(self, cls: object, name: str, *, deadline: deadline_mod.Deadline) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)

    def list(
        self, cls: object, *, deadline: deadline_mod.Deadline, node: str | None = None
    ) -> tuple[list[object], str]:
        return [], "1"


class _SlowDeleteEngine(_OrphanEngine):
    """Its first delete runs only when released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def delete(self, name: str, *, deadline: deadline_mod.Deadline) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        super().delete(name, deadline=deadline)


def test_stop_waits_for_an_orphan_delete_in_flight_and_gc_touches_the_pool_no_more() -> None:
    """The node process closes the engine (and lets go of the pool's owner lock) right after
    `agent.stop()`. A gc running on the control socket's thread must not be left deleting in a closed
    engine: stop waits for the delete in flight, and gc deletes nothing once the agent is stopping."""
    eng = _SlowDeleteEngine()
    for name in ("v-a", "v-b"):
        eng.create_volume(name, 1 << 20, deadline=deadline_mod.Deadline.after(10))
    api = _SlowApi()
    api.entered.set()  # the API server answers at once here
    agent = agent_mod.Agent(api=api, engine=eng, node="n1", pool="p", overprovision_ratio=10.0)  # type: ignore[arg-type]
    got: list[agent_mod.GcReport] = []
    gc = threading.Thread(
        target=lambda: got.append(agent.gc_orphans(grace_seconds=0, deadline=deadline_mod.Deadline.after(30)))
    )
    gc.start()
    assert eng.entered.wait(10)  # gc is deleting v-a
    stopper = threading.Thread(target=agent.stop)
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive(), "stop returned while gc was deleting: the engine closes under it"
    eng.release.set()
    stopper.join(10)
    gc.join(10)
    assert not stopper.is_alive() and not gc.is_alive()
    (report,) = got
    assert report.deleted == ("v-a",)  # the delete in flight was finished
    assert eng.get("v-b") is not None, "gc deleted after the agent stopped"
    assert [k.name for k in report.failed] == ["v-b"] and "stopping" in report.failed[0].reason


def test_a_client_that_sends_nothing_is_answered_and_let_go(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and then stalls (a killed `kubectl exec`, a stray socat) must not hold a
    thread and a descriptor of the agent forever: the request line has a time limit."""
    monkeypatch.setattr(control, "IO_SECONDS", 0.5)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    fake = FakeAgent()
    srv = control.Server(str(state), agent=fake, node="n1")  # type: ignore[arg-type]
    srv.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
            stalled.settimeout(10)
            stalled.connect(control.socket_path(str(state)))
            # meanwhile others are served
            assert control.request_gc(str(state), node="n1", grace_seconds=0, timeout=5)["deleted"] == [
                "v-old"
            ]
            with stalled.makefile("rb") as rfile:
                answer = json.loads(rfile.readline())  # TimeoutError here: held forever
        assert answer["error"]["code"] == "INVALID_ARGUMENT" and "no request" in answer["error"]["message"]
        assert fake.asked == [0]
    finally:
        srv.stop()


def test_a_gc_outlasting_stop_does_not_delete_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """stop waits for the orphan in hand only so long (a hung API server read may take the whole
    request's deadline); the engine is closed after it. A check that comes back after that must not
    go on to delete."""
    monkeypatch.setattr(agent_mod, "RECONCILE_SECONDS", 0.3)
    eng = _OrphanEngine()
    eng.create_volume("v-a", 1 << 20, deadline=deadline_mod.Deadline.after(10))
    api = _SlowApi()
    agent = agent_mod.Agent(api=api, engine=eng, node="n1", pool="p", overprovision_ratio=10.0)  # type: ignore[arg-type]
    got: list[agent_mod.GcReport] = []
    gc = threading.Thread(
        target=lambda: got.append(agent.gc_orphans(grace_seconds=0, deadline=deadline_mod.Deadline.after(30)))
    )
    gc.start()
    assert api.entered.wait(10)
    agent.stop()  # gives up waiting after 0.3 s: the caller closes the engine now
    api.release.set()
    gc.join(10)
    (report,) = got
    assert report.deleted == () and eng.get("v-a") is not None, "deleted through an engine closed after stop"
    assert [k.name for k in report.failed] == ["v-a"] and "stopping" in report.failed[0].reason
