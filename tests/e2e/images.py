"""Container images without a registry, for the e2e cluster: a one-layer image archive (the
`docker save` layout, which `ctr images import` reads) written from a list of files.

The images are the pod sandbox (our pause, from tools/pause), busybox for test pods (Debian's
busybox-static) and each CSI sidecar binary under its upstream image name, so the chart's defaults
work unchanged. Everything is deterministic: same files, same image id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import tarfile

#: busybox applets the test pods use (links to /bin/busybox)
BUSYBOX_APPLETS = (
    "sh", "cat", "echo", "sleep", "df", "dd", "ls", "mkdir", "stat", "sync", "grep", "cmp", "head", "wc",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file of the image: a copy of a host file, a symlink, or an empty directory."""

    path: str  # inside the image, without the leading /
    source: pathlib.Path | None = None
    link: str = ""
    mode: int = 0o755


def _layer(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo(entry.path)
            info.mode = entry.mode  # owner root, mtime 0: the defaults keep the layer reproducible
            if entry.link:
                info.type = tarfile.SYMTYPE
                info.linkname = entry.link
                tar.addfile(info)
            elif entry.source is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = entry.source.read_bytes()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_archive(
    out: pathlib.Path, *, ref: str, entries: list[Entry], entrypoint: list[str]
) -> pathlib.Path:
    """An image archive of one layer holding `entries`, tagged `ref` (a full image name: containerd
    keeps it as given, so a pod's `image:` must match it exactly)."""
    layer = _layer(entries)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
                "Entrypoint": entrypoint,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "csi-thin tests/e2e/images.py"}],
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in ((config_name, config), ("layer.tar", layer), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


def _base_dirs() -> list[Entry]:
    # /tmp for programs that want one; the mount points kubelet and runc use exist anyway
    return [Entry("tmp", mode=0o1777), Entry("etc"), Entry("proc"), Entry("sys"), Entry("dev")]


def binary_image(out: pathlib.Path, *, ref: str, binary: pathlib.Path) -> pathlib.Path:
    """A static binary alone at /<name>, its entrypoint (as the upstream sidecar images are)."""
    return write_archive(
        out,
        ref=ref,
        entries=[*_base_dirs(), Entry(binary.name, source=binary)],
        entrypoint=[f"/{binary.name}"],
    )


def busybox_image(out: pathlib.Path, *, ref: str, busybox: pathlib.Path) -> pathlib.Path:
    entries = [*_base_dirs(), Entry("bin"), Entry("bin/busybox", source=busybox)]
    entries += [Entry(f"bin/{applet}", link="busybox", mode=0o777) for applet in BUSYBOX_APPLETS]
    return write_archive(out, ref=ref, entries=entries, entrypoint=["/bin/sh"])
