"""The alert rules are valid Prometheus rules (`promtool check rules`), every alert has promtool unit
tests that pass (`promtool test rules`), promtool does fail a wrong expectation, and every csi_thin_*
metric an alert reads is one the process exports."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest
import yaml

from tests import conftest
from tests import csi_harness as h

RULES = conftest.ROOT / "charts" / "csi-thin" / "files" / "alerts.yaml"
RULE_TESTS = pathlib.Path(__file__).with_name("alerts_test.yaml")


def _alerts() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(conftest.tool("promtool")), *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.tools
def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout, out.stdout


@pytest.mark.tools
def test_promtool_test_rules_covers_every_alert() -> None:
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == set(_alerts()), f"alerts without a test: {set(_alerts()) - tested}"
    out = _promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


@pytest.mark.tools
def test_promtool_fails_a_wrong_expectation(tmp_path: pathlib.Path) -> None:
    """The harness can fail: an alert expected where none fires is a failed test."""
    (tmp_path / "alerts.yaml").write_text(RULES.read_text())
    (tmp_path / "wrong_test.yaml").write_text(
        "rule_files: [alerts.yaml]\n"
        "tests:\n"
        "  - interval: 1m\n"
        "    input_series:\n"
        "      - series: 'csi_thin_pool_lost_devices{pool=\"p\"}'\n"
        "        values: '0x20'\n"
        "    alert_rule_test:\n"
        "      - eval_time: 10m\n"
        "        alertname: CsiThinLostDevices\n"
        "        exp_alerts: [{exp_labels: {severity: critical, pool: p}}]\n"
    )
    out = _promtool("test", "rules", str(tmp_path / "wrong_test.yaml"))
    assert out.returncode != 0, out.stdout
    assert "CsiThinLostDevices" in out.stdout + out.stderr


def test_alerts_read_only_metrics_the_process_exports(tmp_path: pathlib.Path) -> None:
    exported = h.exported_metric_names(tmp_path)
    used = {name for expr in _alerts().values() for name in re.findall(r"\bcsi_thin_\w+", expr)}
    assert used, "the rules read csi_thin metrics"
    assert used <= exported, f"alerts read metrics nobody exports: {used - exported}"
