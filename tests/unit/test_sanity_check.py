"""tests/sanity.py's verdict on a csi-sanity run: exact counts, so a regression that turns a pass
into a skip (a capability silently no longer advertised) fails instead of passing quietly."""

from __future__ import annotations

import pytest

from tests import conftest, sanity


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic runs stay out of the "csi-thin results" summary (real csi-sanity counts go there)."""
    monkeypatch.setattr(conftest, "report", lambda line: None)


def _result(*, passed: int, skips: dict[str, int], failed: int = 0) -> sanity.Result:
    skipped = [(f"spec {reason} {i}", f"skipped - {reason}") for reason, n in skips.items() for i in range(n)]
    return sanity.Result(
        passed=[f"spec {i}" for i in range(passed)],
        failed=[(f"bad {i}", "boom") for i in range(failed)],
        skipped=skipped,
        seconds=1.0,
        output="",
    )


_GOOD = {reason: n for reason, (n, _) in sanity.ALLOWED_SKIPS.items()}


def test_the_expected_run_passes() -> None:
    sanity.check(_result(passed=sanity.EXPECTED_PASSED, skips=_GOOD), "synthetic")


def test_a_pass_turned_into_an_allowed_skip_fails() -> None:
    skips = dict(
        _GOOD, **{"ControllerPublishVolume not supported": _GOOD["ControllerPublishVolume not supported"] + 1}
    )
    with pytest.raises(AssertionError, match="skips per reason"):
        sanity.check(_result(passed=sanity.EXPECTED_PASSED - 1, skips=skips), "synthetic")


def test_a_missing_pass_fails() -> None:
    with pytest.raises(AssertionError, match="specs passed, not"):
        sanity.check(_result(passed=sanity.EXPECTED_PASSED - 1, skips=_GOOD), "synthetic")


def test_an_unlisted_skip_or_a_failure_fails() -> None:
    with pytest.raises(AssertionError, match="without a documented reason"):
        sanity.check(
            _result(passed=sanity.EXPECTED_PASSED, skips=dict(_GOOD, **{"Snapshots not supported": 1})), "x"
        )
    with pytest.raises(AssertionError, match="failed"):
        sanity.check(_result(passed=sanity.EXPECTED_PASSED, skips=_GOOD, failed=1), "x")
