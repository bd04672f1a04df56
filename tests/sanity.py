"""Run csi-sanity (the CSI conformance suite, bin/csi-sanity) against the standalone driver.

The driver is started exactly as `make demo` starts it (csi_thin.demo.driver) on a loop-file pool of
the given backend; the JUnit report is parsed so the test can print and assert every result.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import subprocess
import time
import xml.etree.ElementTree as ET

from csi_thin import demo
from tests import conftest

MiB = 1024 * 1024

#: csi-sanity v5.6.0 (tools/csi/go.mod) passes exactly this many specs against the driver, on either
#: backend. A pass that turns into a skip (a capability no longer advertised) or a spec a new
#: csi-sanity adds changes the count and fails the test: look at why, then update it.
EXPECTED_PASSED = 83

#: csi-sanity skips a spec when the driver does not advertise its capability. Every skip reason we
#: accept is listed with how many specs it skips and why the driver honestly does not offer it (the
#: README has the same list); a skip for any other reason, or another count, fails the test.
ALLOWED_SKIPS: dict[str, tuple[int, str]] = {
    "ControllerPublishVolume not supported": (7, "node-local volumes: nothing to attach"),
    "ControllerUnpublishVolume not supported": (1, "node-local volumes: nothing to attach"),
    "Controller Publish, UnpublishVolume not supported": (2, "node-local volumes: nothing to attach"),
    "ControllerModifyVolume not supported": (6, "no mutable parameters (MODIFY_VOLUME not advertised)"),
    "Modify volume not supported": (1, "no volume attribute classes (MODIFY_VOLUME not advertised)"),
    "Modify Volume not supported": (1, "no volume attribute classes (MODIFY_VOLUME not advertised)"),
    "SNAPSHOT_ACCESSIBILITY_CONSTRAINTS not supported": (
        1,
        "snapshots live on their volume's node, but the alpha capability that says so is not offered",
    ),
    "pending": (1, "marked pending (PIt) in csi-sanity v5.6.0 itself, not run by anyone"),
}


@dataclasses.dataclass(frozen=True)
class Result:
    passed: list[str]
    failed: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    seconds: float
    output: str


def _parse(junit: pathlib.Path) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    passed: list[str] = []
    failed: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "?")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skip = case.find("skipped")
        if failure is not None:
            failed.append((name, (failure.get("message") or "") + "\n" + (failure.text or "")))
        elif skip is not None:
            skipped.append((name, skip.get("message") or ""))
        else:
            passed.append(name)
    return passed, failed, skipped


def run(workdir: pathlib.Path, backend: str, *, timeout: float = 1800) -> Result:
    sanity = conftest.tool("csi-sanity")
    config = demo.pool_config(workdir, backend)
    socket = workdir / "csi.sock"
    junit = workdir / "junit.xml"
    try:
        return _run(sanity, config, socket, junit, workdir=workdir, timeout=timeout)
    finally:
        problems = demo.cleanup(workdir, config)
        assert not problems, f"cleanup after csi-sanity: {problems}"


def _run(
    sanity: pathlib.Path,
    config: pathlib.Path,
    socket: pathlib.Path,
    junit: pathlib.Path,
    *,
    workdir: pathlib.Path,
    timeout: float,
) -> Result:
    with demo.driver(config, socket) as proc:
        end = time.monotonic() + 120
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > end:
                log = (workdir / "driver.log").read_text()
                raise AssertionError(f"driver did not start (rc={proc.returncode}):\n{log[-4000:]}")
            time.sleep(0.1)
        t0 = time.monotonic()
        out = subprocess.run(
            [
                str(sanity),
                f"--csi.endpoint=unix://{socket}",
                f"--csi.stagingdir={workdir}/sanity-staging",
                f"--csi.mountdir={workdir}/sanity-mount",
                f"--csi.testvolumesize={64 * MiB}",
                f"--csi.testvolumeexpandsize={128 * MiB}",
                f"--ginkgo.junit-report={junit}",
                "--ginkgo.no-color",
                "--ginkgo.timeout=1h",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        seconds = time.monotonic() - t0
    if not junit.exists():
        raise AssertionError(f"csi-sanity wrote no report (rc={out.returncode}):\n{out.stdout[-4000:]}")
    passed, failed, skipped = _parse(junit)
    return Result(passed, failed, skipped, seconds, out.stdout + out.stderr)


def _reason(message: str) -> str:
    return message.strip().removeprefix("skipped - ").strip()


def check(result: Result, label: str) -> None:
    conftest.report(
        f"csi-sanity on {label}: {len(result.passed)} passed, {len(result.failed)} failed, "
        f"{len(result.skipped)} skipped in {result.seconds:.0f}s"
    )
    for name, msg in result.skipped:
        print(f"  skipped: {name}: {msg.strip()[:200]}")
    for name, msg in result.failed:
        print(f"  FAILED: {name}\n{msg.strip()[:1500]}")
    assert not result.failed, f"{len(result.failed)} csi-sanity specs failed"
    unexplained = [name for name, msg in result.skipped if _reason(msg) not in ALLOWED_SKIPS]
    assert not unexplained, f"skips without a documented reason: {unexplained}"
    skips = collections.Counter(_reason(msg) for _, msg in result.skipped)
    assert skips == {reason: n for reason, (n, _) in ALLOWED_SKIPS.items()}, (
        f"skips per reason: {dict(skips)}"
    )
    assert len(result.passed) == EXPECTED_PASSED, (
        f"{len(result.passed)} csi-sanity specs passed, not {EXPECTED_PASSED}: a spec was added, or a "
        "pass turned into a skip"
    )
