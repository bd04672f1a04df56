"""The node touches only what is its own (issue 8 §2), over real gRPC on the reflink backend:
unpublish and unstage never remove what they did not make, a read-only block publish is really
read-only, the recorded volume attributes win over the caller's volume_context, and the files that
hold tenants' data are private to root."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import stat

import grpc

from csi_thin import deadline
from csi_thin.pool import reflink
from tests import csi_harness as h
from tests.root import test_csi_node as base

S = grpc.StatusCode
MiB = h.MiB


def _mode(path: pathlib.Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_holding_tenant_data_are_private(tmp_path: pathlib.Path) -> None:
    """Device files, the pool image, LMDB and the socket are 0600 and their folders 0700 whatever
    the umask; files an older version left readable are made private at start-up."""
    cfg = h.reflink_config(tmp_path)
    old = os.umask(0o022)
    try:
        with base.reflink_driver(tmp_path) as d:
            vol = d.controller.CreateVolume(h.create_req("pvc-a", 64 * MiB)).volume
            dev = d.engine.get(vol.volume_id)
            assert dev is not None
            devices = tmp_path / "pool" / "devices"
            files = [tmp_path / "pool.img", devices / f"{dev.dev_id}.img", d.socket]
            files += [p for p in (tmp_path / "state").iterdir() if p.is_file()]
            files += [p for p in (tmp_path / "state").rglob("*.mdb")]
            assert any(p.suffix == ".mdb" for p in files)
            assert {str(p): oct(_mode(p)) for p in files} == {str(p): "0o600" for p in files}
            assert _mode(devices) == 0o700 and _mode(tmp_path / "state") == 0o700
            with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
                s.connect(str(d.socket))  # still served
        # an older version's files: readable by everyone; the next start makes them private
        for p in (tmp_path / "pool.img", devices, devices / f"{dev.dev_id}.img"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        for p in (tmp_path / "state").rglob("*.mdb"):
            os.chmod(p, 0o644)
        with base.reflink_driver(tmp_path):
            assert _mode(devices) == 0o700
            for p in [
                tmp_path / "pool.img",
                devices / f"{dev.dev_id}.img",
                *(tmp_path / "state").rglob("*.mdb"),
            ]:
                assert _mode(p) == 0o600, p
    finally:
        os.umask(old)
        base._cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())
