"""CSI conformance natively on this host: csi-sanity against the standalone driver on the reflink
backend (loop-mounted XFS image with reflink=1)."""

from __future__ import annotations

import pathlib

import pytest

from tests import sanity

pytestmark = pytest.mark.tools


def test_csi_sanity_reflink(tmp_path: pathlib.Path) -> None:
    sanity.check(sanity.run(tmp_path, "reflink"), "reflink (native)")
