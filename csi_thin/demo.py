"""`make demo`: drive the standalone driver through the real CSI API, step by step, with latencies.

It creates a loop-file pool in a temporary directory, starts `csi-thin standalone` on a unix socket,
and walks a volume's life: create, stage, publish, write, snapshot, restore into a larger volume,
expand, read back, capacity and stats, then deletes everything and destroys the pool. Any failed
step ends the demo with a non-zero exit. The backend is dm-thin when the kernel has device-mapper
(here: inside the VM harness), or the reflink backend with `--backend reflink`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc

from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.node import mountinfo

T = TypeVar("T")
MiB = 1024 * 1024


class Demo:
    """A CSI client over one channel: the three services' stubs, the few requests the demo (and the
    tests that drive a real driver process) repeat, and numbered, timed steps."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(channel)
        self.controller = csi_pb2_grpc.ControllerStub(channel)
        self.node = csi_pb2_grpc.NodeStub(channel)
        self.n = 0

    def create(
        self, name: str, size: int, cap: csi_pb2.VolumeCapability, *, snapshot_id: str = ""
    ) -> csi_pb2.Volume:
        source = None
        if snapshot_id:
            snap = csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
            source = csi_pb2.VolumeContentSource(snapshot=snap)
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[cap],
            volume_content_source=source,
        )
        return self.controller.CreateVolume(req).volume

    def stage(self, vol: csi_pb2.Volume, cap: csi_pb2.VolumeCapability, staging: pathlib.Path) -> None:
        req = csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=str(staging),
            volume_capability=cap,
            volume_context=vol.volume_context,
        )
        self.node.NodeStageVolume(req)

    def publish(
        self, vol: csi_pb2.Volume, cap: csi_pb2.VolumeCapability, staging: pathlib.Path, target: pathlib.Path
    ) -> None:
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=cap,
            volume_context=vol.volume_context,
        )
        self.node.NodePublishVolume(req)

    def release(self, volume_id: str, staging: pathlib.Path, target: pathlib.Path) -> None:
        """NodeUnpublish + NodeUnstage."""
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )
        self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
        )

    def step(self, title: str, fn: Callable[[], T]) -> T:
        self.n += 1
        t0 = time.perf_counter()
        result = fn()
        ms = (time.perf_counter() - t0) * 1000
        print(f"[{self.n:2d}] {title:<58} {ms:8.1f} ms", flush=True)
        return result


def mount_cap(fs_type: str = "ext4") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )


def pool_config(workdir: pathlib.Path, backend: str) -> pathlib.Path:
    path = workdir / "pool.yaml"
    if backend == "dmthin":
        body = (
            "name: demo\nbackend: dmthin\n"
            f"state_dir: {workdir}/state\n"
            "dmthin:\n"
            f"  data_file: {workdir}/data.img\n  data_size: 1GiB\n"
            f"  metadata_file: {workdir}/meta.img\n"
            "  block_size: 64KiB\n"
        )
    else:
        body = (
            "name: demo\nbackend: reflink\n"
            f"state_dir: {workdir}/state\n"
            "reflink:\n"
            f"  directory: {workdir}/pool\n  image_file: {workdir}/pool.img\n  image_size: 1GiB\n"
            "  fs_type: xfs\n"
        )
    path.write_text(body)
    return path


@contextlib.contextmanager
def driver(
    config: pathlib.Path, socket: pathlib.Path, *, extra_args: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """`csi-thin standalone` as a child process (`extra_args`: more flags); logs to driver.log."""
    argv = [sys.executable, "-m", "csi_thin.cli", "standalone", "--endpoint", f"unix://{socket}"]
    argv += ["--pool-config", str(config), "--node-id", "demo-node", *extra_args]
    log = config.parent / "driver.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"driver exited {proc.returncode}; log:\n{log.read_text()[-4000:]}", file=sys.stderr)


def cleanup(workdir: pathlib.Path, config: pathlib.Path) -> list[str]:
    """Undo whatever a run left behind, whatever point it failed at: unmount everything under the
    work directory (deepest first), then destroy the pool (its loop devices and files). Idempotent;
    returns the problems it could not fix so the caller can report them."""
    problems: list[str] = []
    prefix = str(workdir) + "/"
    pool_dir = str(workdir / "pool")  # the reflink pool's own mount: `pool destroy` owns it
    for m in sorted(mountinfo.read(), key=lambda m: m.mount_point, reverse=True):
        if m.mount_point.startswith(prefix) and m.mount_point != pool_dir:
            rc = subprocess.run(["umount", m.mount_point], capture_output=True, text=True, check=False)
            if rc.returncode:
                problems.append(f"umount {m.mount_point}: {rc.stderr.strip()}")
    if config.exists():
        argv = [sys.executable, "-m", "csi_thin.cli", "pool", "destroy", "--config", str(config), "--yes"]
        rc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if rc.returncode:
            problems.append(f"pool destroy: {rc.stderr.strip()}")
    return problems


def wait_ready(demo: Demo, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"driver exited with {proc.returncode} before it was ready")
        with contextlib.suppress(grpc.RpcError):
            if demo.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value:
                return
        time.sleep(0.2)
    raise RuntimeError("driver not ready in time")


def _show_usage(d: Demo, volumes: list[tuple[str, str, pathlib.Path]]) -> None:
    """NodeGetVolumeStats of each published volume, then the pool's GetCapacity."""
    for name, vid, path in volumes:
        stats = d.step(
            f"NodeGetVolumeStats {name}",
            lambda vid=vid, path=path: d.node.NodeGetVolumeStats(  # type: ignore[misc]
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(path))
            ),
        )
        for usage in stats.usage:
            unit = csi_pb2.VolumeUsage.Unit.Name(usage.unit).lower()
            print(f"     {unit}: total={usage.total} used={usage.used} available={usage.available}")
    capacity = d.step("GetCapacity", lambda: d.controller.GetCapacity(csi_pb2.GetCapacityRequest()))
    print(
        f"     available={capacity.available_capacity // MiB} MiB "
        f"maximum_volume_size={capacity.maximum_volume_size.value // MiB} MiB"
    )


def run(workdir: pathlib.Path, backend: str, fs_type: str) -> None:
    config = pool_config(workdir, backend)
    socket = workdir / "csi.sock"
    print(f"demo: backend={backend} workdir={workdir}")
    with driver(config, socket) as proc, grpc.insecure_channel(f"unix://{socket}") as channel:
        d = Demo(channel)
        d.step("start driver, assemble pool, Probe ready", lambda: wait_ready(d, proc))
        info = d.step("GetPluginInfo", lambda: d.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()))
        print(f"     driver {info.name} {info.vendor_version}")
        cap = mount_cap(fs_type)
        base = 64 if fs_type == "ext4" else 320  # MiB; mkfs.xfs refuses filesystems under 300 MB
        vol = d.step(
            f"CreateVolume demo-a ({base} MiB, {fs_type})", lambda: d.create("demo-a", base * MiB, cap)
        )
        stage_a, pub_a = workdir / "stage-a", workdir / "pub-a"
        d.step("NodeStageVolume demo-a (activate, mkfs, mount)", lambda: d.stage(vol, cap, stage_a))
        d.step("NodePublishVolume demo-a (bind mount)", lambda: d.publish(vol, cap, stage_a, pub_a))
        payload = os.urandom(4 * MiB)
        digest = hashlib.sha256(payload).hexdigest()

        def write() -> None:
            with open(pub_a / "data.bin", "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

        d.step("write 4 MiB file + fsync", write)
        snap = d.step(
            "CreateSnapshot demo-snap of demo-a (origin active)",
            lambda: (
                d.controller.CreateSnapshot(
                    csi_pb2.CreateSnapshotRequest(source_volume_id=vol.volume_id, name="demo-snap")
                ).snapshot
            ),
        )
        assert snap.ready_to_use, "snapshot not ready"
        (pub_a / "data.bin").write_bytes(b"changed after the snapshot")
        restored = d.step(
            f"CreateVolume demo-b from snapshot, larger ({2 * base} MiB)",
            lambda: d.create("demo-b", 2 * base * MiB, cap, snapshot_id=snap.snapshot_id),
        )
        stage_b, pub_b = workdir / "stage-b", workdir / "pub-b"

        def stage_and_publish_b() -> None:
            d.stage(restored, cap, stage_b)
            d.publish(restored, cap, stage_b, pub_b)

        d.step("NodeStageVolume + NodePublishVolume demo-b", stage_and_publish_b)
        got = d.step("read the file back from the restored volume", (pub_b / "data.bin").read_bytes)
        if hashlib.sha256(got).hexdigest() != digest:
            raise RuntimeError("restored data differs from what was written before the snapshot")
        print("     restored file matches the pre-snapshot write (sha256 " + digest[:16] + "...)")
        d.step(
            f"ControllerExpandVolume demo-a -> {base * 3 // 2} MiB",
            lambda: d.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vol.volume_id,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=base * 3 // 2 * MiB),
                    volume_capability=cap,
                )
            ),
        )
        d.step(
            "NodeExpandVolume demo-a (online filesystem grow)",
            lambda: d.node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(
                    volume_id=vol.volume_id,
                    volume_path=str(pub_a),
                    staging_target_path=str(stage_a),
                    capacity_range=csi_pb2.CapacityRange(required_bytes=base * 3 // 2 * MiB),
                    volume_capability=cap,
                )
            ),
        )
        _show_usage(d, [("demo-a", vol.volume_id, pub_a), ("demo-b", restored.volume_id, pub_b)])
        for name, vid, stage, pub in (
            ("demo-a", vol.volume_id, stage_a, pub_a),
            ("demo-b", restored.volume_id, stage_b, pub_b),
        ):
            d.step(
                f"NodeUnpublish + NodeUnstage {name}",
                lambda vid=vid, stage=stage, pub=pub: d.release(vid, stage, pub),  # type: ignore[misc]
            )
        d.step(
            "DeleteSnapshot + DeleteVolume x2",
            lambda: (
                d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)),
                d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)),
                d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id)),
            ),
        )
        left = d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
        if left:
            raise RuntimeError(f"volumes left after delete: {[e.volume.volume_id for e in left]}")
    t0 = time.perf_counter()
    problems = cleanup(workdir, config)
    if problems:
        raise RuntimeError("cleanup: " + "; ".join(problems))
    title = "unmount all, csi-thin pool destroy (loops, files)"
    print(f"[{d.n + 1:2d}] {title:<58} {(time.perf_counter() - t0) * 1000:8.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi-thin-demo", description=__doc__)
    parser.add_argument("--backend", choices=["dmthin", "reflink"], default=None)
    parser.add_argument(
        "--fs-type",
        choices=["ext4", "xfs"],
        default="ext4",
        help="filesystem of the demo volumes (online ext4 grow needs CAP_SYS_RESOURCE)",
    )
    args = parser.parse_args(argv)
    backend = args.backend or ("dmthin" if os.path.exists("/dev/mapper/control") else "reflink")
    base = "/scratch" if os.path.isdir("/scratch") else None
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="csi-thin-demo-", dir=base))
    t0 = time.perf_counter()
    try:
        run(workdir, backend, args.fs_type)
    except (grpc.RpcError, RuntimeError, AssertionError, OSError, subprocess.CalledProcessError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(f"demo: FAILED: {detail}", file=sys.stderr)
        log = workdir / "driver.log"
        if log.exists():
            print(log.read_text()[-4000:], file=sys.stderr)
        return 1
    finally:
        for problem in cleanup(workdir, workdir / "pool.yaml"):
            print(f"demo: cleanup: {problem}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"demo: OK in {time.perf_counter() - t0:.1f}s on {backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
