"""Changed-block tracking's pure parts: range merging, the FIEMAP comparison of two reflink files,
and the service's paging and argument checks."""

from __future__ import annotations

import pytest

from csi_thin import deadline, errors, model, runner
from csi_thin.csi import snapshot_metadata_service as sms
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import thintools
from csi_thin.pool import fiemap

E = model.Extent
F = fiemap.FileExtent
UNWRITTEN = fiemap.EXTENT_UNWRITTEN
INLINE = 0x200


@pytest.mark.parametrize(
    ("ranges", "limit", "want"),
    [
        ([], 100, ()),
        ([(0, 10), (10, 5)], 100, (E(0, 15),)),  # touching: joined
        ([(0, 10), (5, 10)], 100, (E(0, 15),)),  # overlapping: joined
        ([(0, 10), (2, 3)], 100, (E(0, 10),)),  # contained
        ([(0, 10), (20, 5)], 100, (E(0, 10), E(20, 5))),
        ([(90, 20)], 100, (E(90, 10),)),  # clipped at the limit
        ([(100, 5), (0, 0)], 100, ()),  # beyond the limit, empty
    ],
)
def test_merge_extents(ranges: list[tuple[int, int]], limit: int, want: tuple[model.Extent, ...]) -> None:
    assert model.merge_extents(ranges, limit=limit) == want


def test_merge_extents_refuses_unsorted_input() -> None:
    with pytest.raises(ValueError, match="ascending"):
        model.merge_extents([(20, 5), (0, 5)], limit=100)


def test_allocated_leaves_out_unwritten_extents() -> None:
    got = fiemap.allocated([F(0, 1000, 10, 0), F(10, 2000, 10, UNWRITTEN), F(20, 3000, 100, 0)], size=50)
    assert got == (E(0, 10), E(20, 30))


@pytest.mark.parametrize(
    ("base", "target", "want"),
    [
        ([], [], ()),  # holes on both sides
        ([F(0, 1000, 30, 0)], [F(0, 1000, 30, 0)], ()),  # shared extent
        # shared, but split differently on each side (a partial CoW elsewhere): still the same bytes
        ([F(0, 1000, 30, 0)], [F(0, 1000, 10, 0), F(10, 1010, 20, 0)], ()),
        ([F(0, 1000, 30, 0)], [F(0, 1000, 10, 0), F(10, 5000, 10, 0), F(20, 1020, 10, 0)], (E(10, 10),)),
        ([], [F(40, 7000, 10, 0)], (E(40, 10),)),  # new data where base has a hole
        ([F(40, 7000, 10, 0)], [], (E(40, 10),)),  # data gone (discarded): the target reads zeros
        ([F(0, 1000, 10, UNWRITTEN)], [], ()),  # unwritten and hole both read zeros
        ([F(0, 1000, 10, UNWRITTEN)], [F(0, 1000, 10, 0)], (E(0, 10),)),  # written since
        ([F(0, 1000, 10, INLINE)], [F(0, 1000, 10, INLINE)], (E(0, 10),)),  # not comparable
        ([F(0, 1000, 100, 0)], [F(0, 1000, 100, 0), F(100, 9000, 50, 0)], ()),  # beyond size 100
    ],
)
def test_changed(
    base: list[fiemap.FileExtent], target: list[fiemap.FileExtent], want: tuple[model.Extent, ...]
) -> None:
    assert fiemap.changed(base, target, size=100) == want


def test_pages_respect_max_results_and_say_the_capacity_when_empty() -> None:
    bm = model.BlockMap(capacity_bytes=100, extents=tuple(E(i * 10, 5) for i in range(5)))
    pages = list(sms._pages(bm, 2))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [(b.byte_offset, b.size_bytes) for p in pages for b in p] == [
        (e.offset, e.length) for e in bm.extents
    ]
    assert list(sms._pages(model.BlockMap(capacity_bytes=100, extents=()), 2)) == [[]]


def test_argument_checks() -> None:
    assert sms._max_results(0) == sms.MAX_RESULTS
    assert sms._max_results(7) == 7
    assert sms._max_results(10**9) == sms.MAX_RESULTS
    with pytest.raises(errors.InvalidArgument):
        sms._max_results(-1)
    with pytest.raises(errors.OutOfRange):
        sms._offset(-1)


# --- thin tool output the parser does not know: refused, never read as "no blocks here" ----------


def _tool_prints(monkeypatch: pytest.MonkeyPatch, stdout: str) -> None:
    def run(argv: list[str], **_: object) -> runner.Result:
        return runner.Result(argv=argv, returncode=0, stdout=stdout, stderr="")

    monkeypatch.setattr(thintools.runner, "run", run)


def test_mappings_refuse_elements_they_do_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # thin_dump of thin-provisioning-tools 1.x (Debian after bookworm) writes leaves shared between
    # devices once, as a <def>, and names them in each device with <ref>: skipping the <ref> would
    # leave the snapshot's shared blocks out of GetMetadataAllocated (a full backup missing data)
    _tool_prints(
        monkeypatch,
        '<superblock data_block_size="128"><def name="7"><range_mapping origin_begin="0" '
        'data_begin="0" length="10" time="0"/></def><device dev_id="1"><ref name="7"/>'
        '<single_mapping origin_block="20" data_block="30" time="0"/></device></superblock>',
    )
    with pytest.raises(dm_errors.DmError, match="ref"):
        thintools.mappings("/dev/null", 1, deadline=deadline.default())


def test_delta_refuses_elements_it_does_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # a run of a kind this parser was not written for may hold changed blocks: refuse, do not skip
    _tool_prints(
        monkeypatch,
        '<superblock data_block_size="128"><diff left="1" right="2"><same begin="0" length="4"/>'
        '<changed begin="4" length="2"/></diff></superblock>',
    )
    with pytest.raises(dm_errors.DmError, match="changed"):
        thintools.delta("/dev/null", 1, 2, deadline=deadline.default())
