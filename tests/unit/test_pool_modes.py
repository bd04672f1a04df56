"""csi_thin.pool.modes: the table of which pool operations run in which pool condition."""

from __future__ import annotations

import pytest

from csi_thin import errors, model
from csi_thin.pool import modes
from tests import conftest

Op = modes.Op
C = modes.Condition


def _status(mode: str = "rw", *, needs_check: bool = False) -> model.PoolStatus:
    return model.PoolStatus(
        transaction_id=1,
        block_size_bytes=65536,
        data_used_bytes=100,
        data_total_bytes=100,
        metadata_used_bytes=1,
        metadata_total_bytes=100,
        mode=model.PoolMode(mode),
        needs_check=needs_check,
    )


@pytest.mark.parametrize(
    ("status", "condition"),
    [
        (_status("rw"), C.RW),
        (_status("out_of_data_space"), C.OUT_OF_DATA_SPACE),
        (_status("ro"), C.READ_ONLY),
        (_status("fail"), C.FAIL),
        (_status("rw", needs_check=True), C.NEEDS_CHECK),
        (_status("out_of_data_space", needs_check=True), C.NEEDS_CHECK),
        (_status("ro", needs_check=True), C.READ_ONLY),
        (_status("fail", needs_check=True), C.FAIL),
    ],
)
def test_condition_worst_wins(status: model.PoolStatus, condition: modes.Condition) -> None:
    assert modes.condition(status) == condition


_EXPECTED = {
    # op: (rw, out_of_data_space, read_only, needs_check, fail)
    Op.CREATE_VOLUME: ("ok", "full", "unavailable", "unavailable", "unavailable"),
    Op.CREATE_SNAPSHOT: ("ok", "full", "unavailable", "unavailable", "unavailable"),
    Op.CLONE: ("ok", "full", "unavailable", "unavailable", "unavailable"),
    Op.GROW: ("ok", "full", "unavailable", "unavailable", "unavailable"),
    Op.DELETE: ("ok", "ok", "unavailable", "unavailable", "unavailable"),
    Op.GC: ("ok", "ok", "unavailable", "unavailable", "unavailable"),
    Op.ACTIVATE: ("ok", "ok", "ok", "ok", "unavailable"),
    Op.DEACTIVATE: ("ok", "ok", "ok", "ok", "ok"),
}
_STATUS = {
    C.RW: _status("rw"),
    C.OUT_OF_DATA_SPACE: _status("out_of_data_space"),
    C.READ_ONLY: _status("ro"),
    C.NEEDS_CHECK: _status("rw", needs_check=True),
    C.FAIL: _status("fail"),
}


@pytest.mark.parametrize("op", list(Op))
@pytest.mark.parametrize("cond", list(C))
def test_require_answers_from_the_table(op: modes.Op, cond: modes.Condition) -> None:
    want = _EXPECTED[op][list(C).index(cond)]
    if want == "ok":
        modes.require(op, _STATUS[cond])
    elif want == "full":
        full = f"{op.value} refused: the pool's data space is full"
        with pytest.raises(errors.PoolFull, match=full) as exc:
            modes.require(op, _STATUS[cond])
        assert exc.value.code == "RESOURCE_EXHAUSTED"
    else:
        with pytest.raises(errors.Unavailable, match=r"(?i)stop the driver.*start again") as uexc:
            modes.require(op, _STATUS[cond])
        assert uexc.value.code == "UNAVAILABLE" and "thin_check" in uexc.value.message


def test_every_op_is_in_the_table() -> None:
    assert set(modes.TABLE) == set(Op) == set(_EXPECTED)
    assert modes.runs_always(Op.DEACTIVATE) and not modes.runs_always(Op.ACTIVATE)


def test_the_readme_shows_the_table() -> None:
    readme = (conftest.ROOT / "README.md").read_text()
    assert modes.markdown_table() in readme
