"""CSI conformance on real dm-thin: csi-sanity against the standalone driver on a loop-file pool."""

from __future__ import annotations

import pathlib

from tests import sanity


def test_csi_sanity_dmthin(tmp_path: pathlib.Path) -> None:
    sanity.check(sanity.run(tmp_path, "dmthin"), "dm-thin (VM)")
