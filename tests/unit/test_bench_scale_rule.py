"""bench/scale.py's choice of rule: absolute targets natively and under KVM, flatness under TCG."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest


def _load() -> ModuleType:
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


scale = _load()


@pytest.mark.parametrize(
    ("env", "cpuinfo", "flat"),
    [
        ({}, "model name : QEMU TCG CPU version 2.5+", False),  # native: never judged as emulated
        ({"CSI_THIN_IN_VM": "1", "CSI_THIN_VM_ACCEL": "kvm"}, "", False),
        ({"CSI_THIN_IN_VM": "1", "CSI_THIN_VM_ACCEL": "tcg"}, "", True),
        ({"CSI_THIN_IN_VM": "1"}, "model name : QEMU TCG CPU version 2.5+", True),
        ({"CSI_THIN_IN_VM": "1"}, "model name : AMD EPYC", False),
    ],
)
def test_rule_selection(env: dict[str, str], cpuinfo: str, flat: bool) -> None:
    rule = scale.choose_rule(env, cpuinfo)
    assert rule.flat is flat
    assert rule.why


def _point(n: int, startup: float, read_ms: float, rss: float = 60.0) -> object:
    return scale.Point(
        volumes=n,
        snapshots=n,
        startup_s=startup,
        capacity_ms=read_ms,
        status_ms=read_ms,
        create_ms=10.0,
        create_empty_ms=10.0,
        rss_mib=rss,
    )


def test_tcg_judges_flatness_not_absolute_times() -> None:
    slow_but_flat = [_point(0, 40.0, 80.0), _point(10000, 50.0, 90.0)]
    tcg = scale.Rule(True, "tcg")
    absolute = scale.Rule(False, "native")
    assert scale.judge(slow_but_flat, tcg) == []
    assert len(scale.judge(slow_but_flat, absolute)) == 6  # 3 measures x 2 checkpoints over target
    growing = [_point(0, 40.0, 80.0), _point(10000, 61.0, 80.0)]
    missed = scale.judge(growing, tcg)
    assert len(missed) == 1 and "start-up" in missed[0] and "1.52x" in missed[0]


def test_rss_is_absolute_under_tcg_too() -> None:
    points = [_point(0, 1.0, 1.0), _point(10000, 1.0, 1.0, rss=151.0)]
    missed = scale.judge(points, scale.Rule(True, "tcg"))
    assert len(missed) == 1 and "RSS" in missed[0]
