from __future__ import annotations

import time

import pytest

from csi_thin import deadline, errors, runner


def test_run_captures_output_and_uses_c_locale() -> None:
    result = runner.run(
        ["sh", "-c", "echo out; echo err >&2; echo $LC_ALL"], deadline=deadline.Deadline.after(10)
    )
    assert result.stdout.splitlines() == ["out", "C"]
    assert result.stderr == "err\n"


def test_run_failure_keeps_stderr() -> None:
    with pytest.raises(errors.CommandFailed) as info:
        runner.run(["sh", "-c", "echo boom >&2; exit 3"], deadline=deadline.Deadline.after(10))
    assert info.value.returncode == 3
    assert "boom" in info.value.stderr
    assert info.value.code == "INTERNAL"


def test_run_unchecked_returns_code() -> None:
    result = runner.run(["sh", "-c", "exit 4"], deadline=deadline.Deadline.after(10), check=False)
    assert result.returncode == 4


def test_run_times_out_from_deadline() -> None:
    t0 = time.monotonic()
    with pytest.raises(errors.CommandTimeout) as info:
        runner.run(["sleep", "5"], deadline=deadline.Deadline.after(0.3))
    assert time.monotonic() - t0 < 3
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_run_refuses_expired_deadline() -> None:
    with pytest.raises(errors.CommandTimeout):
        runner.run(["true"], deadline=deadline.Deadline.after(-1))


def test_missing_program_is_command_failed() -> None:
    with pytest.raises(errors.CommandFailed, match="not found"):
        runner.run(["/nonexistent/prog"], deadline=deadline.Deadline.after(5))


def test_backoff_stops_at_deadline() -> None:
    d = deadline.Deadline.after(0.3)
    t0 = time.monotonic()
    attempts = list(d.backoff(first=0.01, cap=0.05))
    elapsed = time.monotonic() - t0
    assert len(attempts) >= 3
    assert elapsed < 0.6


def test_deadline_check() -> None:
    deadline.Deadline.after(5).check("step")
    with pytest.raises(errors.DeadlineExceeded, match="step"):
        deadline.Deadline.after(-1).check("step")


def test_error_codes_are_inherited() -> None:
    class CustomExhausted(errors.PoolExhausted):
        pass

    assert CustomExhausted("x").code == "RESOURCE_EXHAUSTED"
    assert errors.OperationPending("x").code == "ABORTED"
