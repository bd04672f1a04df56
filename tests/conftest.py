"""Test tiers: the folder a test lives in gives its marker; a tier whose environment is missing
fails loudly (it is deselected by marker where it cannot run, never skipped silently)."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"

_TIER_MARKERS = {"integration": "integration", "root": "root", "vm": "vm", "kube": "kube", "e2e": "e2e"}
_REPORT: list[str] = []


def report(line: str) -> None:
    """A result line worth reading in a quiet run (injection points covered, csi-sanity counts):
    printed in its own section of pytest's summary, whatever the verbosity."""
    _REPORT.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT:
        terminalreporter.section("csi-thin results")
        for line in _REPORT:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = pathlib.Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        marker = _TIER_MARKERS.get(tier)
        if marker:
            item.add_marker(getattr(pytest.mark, marker))


def pytest_runtest_setup(item: pytest.Item) -> None:
    names = {m.name for m in item.iter_markers()}
    if "vm" in names and not os.path.exists("/dev/mapper/control"):
        pytest.fail("vm test outside the VM: no /dev/mapper/control (run `make vm-test`)", pytrace=False)
    if ("root" in names or "vm" in names or "kube" in names or "e2e" in names) and os.geteuid() != 0:
        pytest.fail("this test needs root (real loop devices, mkfs, mount)", pytrace=False)


def tool(name: str) -> pathlib.Path:
    """Path of a pinned Go tool; fails the test when it has not been built."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} missing: run `make tools`", pytrace=False)
    return path
