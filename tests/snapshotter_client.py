"""The real `csi-thin snapshotter` process on a real pool, and a gRPC client of containerd's Snapshots
API for it: what the root tier (reflink) and the vm tier (dm-thin) run their snapshotter tests with.

Everything goes through the socket the process serves; the only other window is `csi-thin pool
list --json` (the device records), to check what the pool holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import grpc
import pytest

from csi_thin import demo
from csi_thin.snapshotter.pb import mount_pb2, snapshots_pb2, snapshots_pb2_grpc

pb = snapshots_pb2
MiB = 1024 * 1024


def pool_config(work: pathlib.Path, backend: str, *, snapshotter: str) -> pathlib.Path:
    """demo's pool config of this backend with a `snapshotter:` section (YAML flow mapping)."""
    path = demo.pool_config(work, backend)
    path.write_text(path.read_text() + f"snapshotter: {snapshotter}\n")
    return path


@contextlib.contextmanager
def snapshotter(config: pathlib.Path, socket: pathlib.Path) -> Iterator[subprocess.Popen[bytes]]:
    """`csi-thin snapshotter` as a child process, serving once this yields; logs to snapshotter.log."""
    argv = [sys.executable, "-m", "csi_thin.cli", "snapshotter", "--pool-config", str(config)]
    argv += ["--socket", str(socket)]
    log = config.parent / "snapshotter.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(socket, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            print(f"snapshotter exited {proc.returncode}; log:\n{log.read_text()[-4000:]}", file=sys.stderr)


def wait_serving(socket: pathlib.Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"snapshotter exited with {proc.returncode} before it served")
        if socket.is_socket():
            with (
                grpc.insecure_channel(f"unix://{socket}") as ch,
                contextlib.suppress(grpc.FutureTimeoutError),
            ):
                grpc.channel_ready_future(ch).result(timeout=2)
                return
        time.sleep(0.1)
    raise RuntimeError("snapshotter not serving in time")


@contextlib.contextmanager
def client(socket: pathlib.Path) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
    with grpc.insecure_channel(f"unix://{socket}") as ch:
        yield snapshots_pb2_grpc.SnapshotsStub(ch)


def code_of(call: object) -> grpc.StatusCode:
    """The status code the call (a zero-argument callable) fails with; the test fails if it succeeds."""
    with pytest.raises(grpc.RpcError) as exc:
        call()  # type: ignore[operator]
    return exc.value.code()  # type: ignore[no-any-return,attr-defined]


def devices(config: pathlib.Path) -> list[dict[str, object]]:
    """The pool's device records (`csi-thin pool list --json`: no owner lock, beside the server)."""
    argv = [sys.executable, "-m", "csi_thin.cli", "pool", "list", "--config", str(config), "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@contextlib.contextmanager
def mounted(mounts: Sequence[mount_pb2.Mount], target: pathlib.Path) -> Iterator[pathlib.Path]:
    """Mount what a Prepare/View returned, as containerd would (type, source, options)."""
    assert len(mounts) == 1, mounts
    m = mounts[0]
    target.mkdir(parents=True, exist_ok=True)
    argv = (
        ["mount", "-t", m.type] + (["-o", ",".join(m.options)] if m.options else []) + [m.source, str(target)]
    )
    subprocess.run(argv, check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)


def filters_cases() -> list[tuple[list[str], set[str]]]:
    """containerd's testsuite Walk cases (checkWalk), over the snapshots `walk_fixture` makes."""
    root = 'labels."containerd.io/gc.root"==check-walk'
    return [
        ([root], {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"}),
        ([f"kind==active,{root}"], {"a-np", "a", "a-wl", "a-np-wl"}),
        ([f"kind==view,{root}"], {"v", "v-wl"}),
        ([f"kind==committed,{root}"], {"p", "p-wl"}),
        (["name==p", "name==a-np-wl"], {"p", "a-np-wl"}),
        (["name==a-wl,labels.l"], {"a-wl"}),
        (["parent==p"], {"a", "v"}),
        ([f'parent!="",{root}'], {"a", "v", "a-wl", "v-wl"}),
        (["labels.l"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
        (["labels.l==2"], {"a-wl", "a-np-wl"}),
        (["name~=/^a-.*wl$/"], {"a-wl", "a-np-wl"}),
    ]


def walk_fixture(c: snapshots_pb2_grpc.SnapshotsStub) -> list[str]:
    """The snapshots of containerd's checkWalk; returns their keys, leaves first."""
    gc = {"containerd.io/gc.root": "check-walk"}
    c.Prepare(pb.PrepareSnapshotRequest(key="a-np", labels=gc))
    c.Prepare(pb.PrepareSnapshotRequest(key="p-tmp", labels=gc))
    c.Commit(pb.CommitSnapshotRequest(name="p", key="p-tmp", labels=gc))
    c.Prepare(pb.PrepareSnapshotRequest(key="a", parent="p", labels=gc))
    c.View(pb.ViewSnapshotRequest(key="v", parent="p", labels=gc))
    c.Prepare(pb.PrepareSnapshotRequest(key="p-wl-tmp", labels=gc))
    c.Commit(pb.CommitSnapshotRequest(name="p-wl", key="p-wl-tmp", labels={"l": "1", **gc}))
    c.Prepare(pb.PrepareSnapshotRequest(key="a-wl", parent="p-wl", labels={"l": "2", **gc}))
    c.View(pb.ViewSnapshotRequest(key="v-wl", parent="p-wl", labels={"l": "3", **gc}))
    c.Prepare(pb.PrepareSnapshotRequest(key="a-np-wl", labels={"l": "2", **gc}))
    return ["a-np", "a", "v", "a-wl", "v-wl", "a-np-wl", "p", "p-wl"]


def names(c: snapshots_pb2_grpc.SnapshotsStub, filters: Sequence[str] = ()) -> set[str]:
    return {i.name for r in c.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info}


def socket_mode(socket: pathlib.Path) -> int:
    return os.stat(socket).st_mode & 0o777


# ---- scenarios (the root tier runs them on reflink, the vm tier on dm-thin) ---------------------------

#: per filesystem: the snapshotter section the lifecycle runs with (xfs: mkfs.xfs wants 300 MB; its
#: fs_options are passed to mkfs; ext4 discards the blocks of what it removes)
SETTINGS = {
    "ext4": "{base_image_size: 64MiB, fs_type: ext4, discard_blocks: true}",
    "xfs": "{base_image_size: 320MiB, fs_type: xfs, fs_options: '-m reflink=0'}",
}


def lifecycle(work: pathlib.Path, backend: str, fs_type: str = "ext4") -> None:
    """Every RPC and every error code over the served socket, the returned mounts really mounted:
    a base layer written and committed (its device deactivated), a container snapshot and a view
    of it, a second layer on top, Walk with containerd's filter cases, labels, usage; then all
    removed (leaves first; a parent first is refused) and no device left in the pool."""
    config = pool_config(work, backend, snapshotter=SETTINGS[fs_type])
    sock = work / "snap.sock"
    code = grpc.StatusCode
    fs_options = {"ext4": [], "xfs": ["nouuid"]}[fs_type]  # xfs snapshots share their base's UUID
    with snapshotter(config, sock), client(sock) as c:
        assert socket_mode(sock) == 0o600
        base = c.Prepare(pb.PrepareSnapshotRequest(key="default/1/extract-a", labels={"x": "1"})).mounts
        assert [(m.type, list(m.options)) for m in base] == [(fs_type, fs_options)]
        with mounted(base, work / "m-base") as m:
            (m / "layer-a").write_text("A")
        c.Commit(pb.CommitSnapshotRequest(name="sha256:a", key="default/1/extract-a", labels={"c": "1"}))
        info = c.Stat(pb.StatSnapshotRequest(key="sha256:a")).info
        assert (info.kind, info.parent, dict(info.labels)) == (pb.COMMITTED, "", {"c": "1"})
        layer_devs = [d for d in devices(config) if d["kind"] == "layer"]
        assert len(layer_devs) == 1 and layer_devs[0]["active"] is False, layer_devs
        assert code_of(lambda: c.Stat(pb.StatSnapshotRequest(key="default/1/extract-a"))) == code.NOT_FOUND

        ctr = c.Prepare(pb.PrepareSnapshotRequest(key="default/2/ctr", parent="sha256:a")).mounts
        with mounted(ctr, work / "m-ctr") as m:
            assert (m / "layer-a").read_text() == "A"
            (m / "ctr-file").write_bytes(os.urandom(4 * MiB))
        view = c.View(pb.ViewSnapshotRequest(key="default/3/view", parent="sha256:a")).mounts
        assert list(view[0].options) == ["ro", *fs_options]
        with mounted(view, work / "m-view") as m:
            assert (m / "layer-a").read_text() == "A" and not (m / "ctr-file").exists()
            with pytest.raises(OSError):
                (m / "nope").write_text("read-only")
        assert c.Mounts(pb.MountsRequest(key="default/2/ctr")).mounts[0].source == ctr[0].source
        assert c.Usage(pb.UsageRequest(key="default/2/ctr")).size >= 4 * MiB

        # error codes, as containerd's errdefs reads them back
        assert code_of(lambda: c.Mounts(pb.MountsRequest(key="sha256:a"))) == code.FAILED_PRECONDITION
        assert code_of(lambda: c.Mounts(pb.MountsRequest(key="nope"))) == code.NOT_FOUND
        dup = pb.PrepareSnapshotRequest(key="default/2/ctr", parent="sha256:a")
        assert code_of(lambda: c.Prepare(dup)) == code.ALREADY_EXISTS
        orphan = pb.PrepareSnapshotRequest(key="k", parent="sha256:none")
        assert code_of(lambda: c.Prepare(orphan)) == code.NOT_FOUND
        on_active = pb.PrepareSnapshotRequest(key="k", parent="default/2/ctr")
        assert code_of(lambda: c.Prepare(on_active)) == code.INVALID_ARGUMENT
        assert code_of(lambda: c.Prepare(pb.PrepareSnapshotRequest(key=""))) == code.INVALID_ARGUMENT
        taken = pb.CommitSnapshotRequest(name="sha256:a", key="default/2/ctr")
        assert code_of(lambda: c.Commit(taken)) == code.ALREADY_EXISTS
        of_view = pb.CommitSnapshotRequest(name="sha256:v", key="default/3/view")
        assert code_of(lambda: c.Commit(of_view)) == code.FAILED_PRECONDITION
        absent = pb.CommitSnapshotRequest(name="sha256:x", key="nope")
        assert code_of(lambda: c.Commit(absent)) == code.NOT_FOUND
        assert code_of(lambda: c.Remove(pb.RemoveSnapshotRequest(key="sha256:a"))) == code.FAILED_PRECONDITION
        assert code_of(lambda: c.Remove(pb.RemoveSnapshotRequest(key="nope"))) == code.NOT_FOUND
        assert code_of(lambda: c.Usage(pb.UsageRequest(key="nope"))) == code.NOT_FOUND
        assert code_of(lambda: c.Stat(pb.StatSnapshotRequest(key="nope"))) == code.NOT_FOUND
        bad_path = pb.UpdateSnapshotRequest(info=pb.Info(name="sha256:a"), update_mask={"paths": ["parent"]})
        assert code_of(lambda: c.Update(bad_path)) == code.INVALID_ARGUMENT
        assert (
            code_of(lambda: c.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="nope")))) == code.NOT_FOUND
        )
        bad_filter = pb.ListSnapshotsRequest(filters=["name=="])
        assert code_of(lambda: list(c.List(bad_filter))) == code.INVALID_ARGUMENT

        # Update: a field path per label, or all labels at once
        one = pb.UpdateSnapshotRequest(
            info=pb.Info(name="sha256:a", labels={"d": "2"}), update_mask={"paths": ["labels.d", "labels.c"]}
        )
        assert dict(c.Update(one).info.labels) == {"d": "2"}
        every = pb.UpdateSnapshotRequest(info=pb.Info(name="sha256:a", labels={"e": "3"}))
        got = c.Update(every).info
        assert (
            dict(got.labels) == {"e": "3"} and got.updated_at.ToNanoseconds() > got.created_at.ToNanoseconds()
        )
        assert dict(c.Stat(pb.StatSnapshotRequest(key="sha256:a")).info.labels) == {"e": "3"}

        # a second layer on top: the chain reads through
        c.Commit(pb.CommitSnapshotRequest(name="sha256:b", key="default/2/ctr"))
        top = c.Prepare(pb.PrepareSnapshotRequest(key="default/4/top", parent="sha256:b")).mounts
        with mounted(top, work / "m-top") as m:
            assert (m / "layer-a").read_text() == "A" and (m / "ctr-file").stat().st_size == 4 * MiB
        assert [d["active"] for d in devices(config) if d["kind"] == "layer"].count(True) == 2  # top, view

        assert names(c) == {"sha256:a", "sha256:b", "default/3/view", "default/4/top"}
        for key in ("default/4/top", "sha256:b", "default/3/view", "sha256:a"):
            c.Remove(pb.RemoveSnapshotRequest(key=key))
        c.Cleanup(pb.CleanupRequest())
        assert names(c) == set() and devices(config) == []

        # containerd's max-size label sizes a base layer (else base_image_size)
        sized = {"containerd.io/snapshot/max-size": str(400 * MiB)}
        c.Prepare(pb.PrepareSnapshotRequest(key="sized", labels=sized))
        assert [d["size_bytes"] for d in devices(config)] == [400 * MiB]
        tiny = pb.PrepareSnapshotRequest(key="tiny", labels={"containerd.io/snapshot/max-size": "x"})
        assert code_of(lambda: c.Prepare(tiny)) == code.INVALID_ARGUMENT
        c.Remove(pb.RemoveSnapshotRequest(key="sized"))

        keys = walk_fixture(c)
        for filters, want in filters_cases():
            assert names(c, filters) == want, filters
        for key in keys:
            c.Remove(pb.RemoveSnapshotRequest(key=key))
        assert devices(config) == []


def async_remove_and_restart(work: pathlib.Path, backend: str) -> None:
    """async_remove: Remove forgets the snapshot, its device stays until Cleanup. A SIGKILLed
    snapshotter restarts on its stale socket, and an active snapshot's mounts still work."""
    config = pool_config(work, backend, snapshotter="{base_image_size: 64MiB, async_remove: true}")
    sock = work / "snap.sock"
    with snapshotter(config, sock) as proc, client(sock) as c:
        mounts = c.Prepare(pb.PrepareSnapshotRequest(key="base-tmp")).mounts
        with mounted(mounts, work / "m") as m:
            (m / "f").write_text("kept")
        c.Commit(pb.CommitSnapshotRequest(name="base", key="base-tmp"))
        c.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent="base"))
        proc.kill()
        proc.wait()
    assert sock.is_socket(), "a SIGKILLed server leaves its socket behind"
    with snapshotter(config, sock), client(sock) as c:
        assert socket_mode(sock) == 0o600
        with mounted(c.Mounts(pb.MountsRequest(key="ctr")).mounts, work / "m") as m:
            assert (m / "f").read_text() == "kept"
        c.Remove(pb.RemoveSnapshotRequest(key="ctr"))
        c.Remove(pb.RemoveSnapshotRequest(key="base"))
        assert names(c) == set()
        assert len(devices(config)) == 2, "async_remove: the devices wait for Cleanup"
        c.Cleanup(pb.CleanupRequest())
        assert devices(config) == []
