"""The image `make image` builds (bin/csi-thin-image.tar, an OCI archive), checked by the tools that
will use it: a private containerd (its own root, state and socket in a temp dir, stopped and removed
afterwards) imports it under the name the chart uses, and runc runs it: `csi-thin` is the entrypoint,
its Kubernetes-mode commands start, and the binaries the node plugin calls are there."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import tarfile
import tomllib
import uuid
from typing import Any

import pytest
import yaml

from tests import conftest, containerdenv

pytestmark = pytest.mark.image

ARCHIVE = conftest.BIN / "csi-thin-image.tar"
CHART = conftest.ROOT / "charts" / "csi-thin"
VERSION = tomllib.loads((conftest.ROOT / "pyproject.toml").read_text())["project"]["version"]
#: the chart's default image: the name the archive must carry (test_chart.py checks it is one a
#: node's runtime finds as given)
NAME = f"{yaml.safe_load((CHART / 'values.yaml').read_text())['image']['repository']}:{VERSION}"
#: what the driver runs (csi_thin/node, csi_thin/pool, csi_thin/dm) and what an operator reaches for
NODE_BINARIES = (
    "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs", "e2fsck", "resize2fs", "dumpe2fs", "xfs_growfs", "xfs_repair",
    "btrfs", "thin_check", "thin_ls", "thin_metadata_size", "losetup", "blkid", "mount", "umount", "modprobe",
)  # fmt: skip


@pytest.fixture(scope="module")
def archive() -> pathlib.Path:
    if not ARCHIVE.exists():
        pytest.fail(f"{ARCHIVE} missing: run `make image`", pytrace=False)
    return ARCHIVE


def _blob(tar: tarfile.TarFile, digest: str) -> Any:
    f = tar.extractfile("blobs/" + digest.replace(":", "/"))
    assert f is not None, digest
    return json.load(f)


def test_the_archive_is_an_oci_image_named_without_a_registry(archive: pathlib.Path) -> None:
    with tarfile.open(archive) as tar:
        layout = json.load(tar.extractfile("oci-layout"))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        (desc,) = index["manifests"]
        assert desc["annotations"]["org.opencontainers.image.ref.name"] == NAME
        manifest = _blob(tar, desc["digest"])
        config = _blob(tar, manifest["config"]["digest"])
    assert layout["imageLayoutVersion"] == "1.0.0"
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["config"]["Entrypoint"] == ["csi-thin"]
    assert config["config"]["Labels"]["org.opencontainers.image.version"] == VERSION


#: the sha256 of each file of the installed csi_thin package (run in the image), as JSON
_SOURCES = """
import csi_thin, hashlib, json, pathlib
top = pathlib.Path(csi_thin.__file__).parent
print(json.dumps({
    str(p.relative_to(top.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts
}))
"""


def _tree_sources() -> dict[str, str]:
    """What the wheel is built from (scripts/image.sh keys its context on the same files)."""
    top = conftest.ROOT / "csi_thin"
    return {
        str(p.relative_to(conftest.ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in top.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix in (".py", ".pyi") or p.name == "py.typed")
    }


def _run(ctr: list[str], tmp: pathlib.Path, *command: str) -> subprocess.CompletedProcess[str]:
    """`ctr run` of the image (runc; no network: the container gets an empty network namespace)."""
    argv = [*ctr, "run", "--rm", "--runc-root", str(tmp / "runc"), "--fifo-dir", str(tmp / "fifo")]
    argv += [NAME, f"t-{uuid.uuid4().hex[:8]}", *command]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)


def test_containerd_imports_and_runs_the_image(archive: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with containerdenv.containerd() as ctr:
        # nothing of it outside its temp dir: the opt plugin, loaded, makes /opt/containerd/{bin,lib}
        plugins = subprocess.run([*ctr, "plugins", "ls"], capture_output=True, text=True, check=True)
        rows = [line.split() for line in plugins.stdout.splitlines()]
        loaded = {(row[0], row[1]) for row in rows if row and row[-1] == "ok"}
        assert ("io.containerd.snapshotter.v1", "overlayfs") in loaded, plugins.stdout  # (it can see)
        assert ("io.containerd.internal.v1", "opt") not in loaded, plugins.stdout
        imported = subprocess.run(
            [*ctr, "images", "import", str(archive)], check=False, capture_output=True, text=True, timeout=300
        )
        assert imported.returncode == 0, imported.stderr
        names = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True)
        assert names.stdout.split() == [NAME]

        # no command: the entrypoint (csi-thin) with the default arguments (--help)
        default = _run(ctr, tmp_path)
        assert default.returncode == 0, default.stderr
        assert default.stdout.startswith("usage: csi-thin"), default.stdout
        for sub in ("controller", "node"):
            out = _run(ctr, tmp_path, "csi-thin", sub, "--help")
            assert out.returncode == 0, out.stderr
            assert "--endpoint" in out.stdout and "--http-endpoint" in out.stdout, out.stdout
        # the generated stubs are in the wheel, and the driver's imports all resolve
        stubs = _run(ctr, tmp_path, "python3", "-c", "import csi_thin.app, csi_thin.csi.pb.csi_pb2")
        assert stubs.returncode == 0, stubs.stderr
        # the code is this tree's, file for file: not a stale archive, not a wheel missing a package
        # (no __init__.py) or shipping a module the tree no longer has
        shipped = _run(ctr, tmp_path, "python3", "-c", _SOURCES)
        assert shipped.returncode == 0, shipped.stderr
        assert json.loads(shipped.stdout) == _tree_sources(), "the image's csi_thin is not this tree's"
        found = _run(
            ctr, tmp_path, "sh", "-c", 'for b in "$@"; do command -v "$b"; done', "sh", *NODE_BINARIES
        )
        assert [os.path.basename(p) for p in found.stdout.split()] == list(NODE_BINARIES), found.stdout
        subprocess.run([*ctr, "images", "rm", NAME], capture_output=True, check=True)
    # runc made /<namespace>/<container> in every cgroup hierarchy for the containers it ran
    # (containerd() asserts this too: here it is the point)
    assert not containerdenv.cgroups_of(ctr[-1]), f"cgroups left behind: {containerdenv.cgroups_of(ctr[-1])}"


def test_a_hung_container_goes_with_the_private_containerd(
    archive: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The failure path: a `ctr run` that never ends (a broken image's entrypoint hanging) times out.
    Leaving containerd() still ends the container and its shim (a shim outlives its containerd by
    design), so nothing of the test's keeps running on the machine."""
    marker = f"csi-thin-hung-{uuid.uuid4().hex[:8]}"
    with containerdenv.containerd() as ctr:
        sock = ctr[ctr.index("--address") + 1]
        imported = subprocess.run(
            [*ctr, "images", "import", str(archive)], capture_output=True, timeout=300, check=False
        )
        assert imported.returncode == 0, imported.stderr
        argv = [
            *ctr,
            "run",
            "--rm",
            "--runc-root",
            str(tmp_path / "runc"),
            "--fifo-dir",
            str(tmp_path / "fifo"),
        ]
        argv += [NAME, f"t-{uuid.uuid4().hex[:8]}", "sh", "-c", f"sleep 600; : {marker}"]
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(argv, check=False, capture_output=True, timeout=5)
        assert containerdenv.processes_naming(marker), "the container runs (else this test tests nothing)"
    left = containerdenv.processes_naming(marker) + containerdenv.processes_naming(sock)
    assert not left, f"left running: {left}"


#: stands in for buildah in the test below. Its storage is shared by every checkout on the machine
#: (one containers-storage under ~/.cache), and checkouts of other code, with another base (another
#: version of scripts/image.sh), tag the same names meanwhile: the base's name just before our build
#: starts, the image's name just after it ends. A tag is a file under $FAKE_STATE/tags holding what
#: it points to; an image ID says what it was built on.
FAKE_BUILDAH = r"""#!/bin/bash
set -euo pipefail
tags=$FAKE_STATE/tags; mkdir -p "$tags"
t() { echo "$tags/${1//[\/:]/_}"; }
while [[ $1 == --* ]]; do shift 2; done  # --root, --runroot, --storage-driver
cmd=$1; shift
case $cmd in
  from) echo working-container;;
  config)
    for a; do case $a in io.csi-thin.base-key=*) echo "base-${a#*=}" > "$FAKE_STATE/working";; esac; done;;
  commit) cp "$FAKE_STATE/working" "$(t "${@: -1}")";;
  tag) cp "$(t "$1")" "$(t "$2")";;
  inspect) [ -f "$(t "${@: -1}")" ];;
  images) cat "$(t "${@: -1}")" 2>/dev/null || true;;
  add|rm|rmi) ;;
  build)
    echo base-theirs > "$(t localhost/debian:bookworm-slim)"
    base=$(cat "$(t localhost/debian:bookworm-slim)"); iid=""; name=""
    while [ $# -gt 0 ]; do
      case $1 in
        --from) base=$(cat "$(t "$2")"); shift 2;;
        --iidfile) iid=$2; shift 2;;
        -t) name=$2; shift 2;;
        *) shift;;
      esac
    done
    [ -z "$iid" ] || echo "sha256:ours-on-$base" > "$iid"
    [ -z "$name" ] || echo theirs > "$(t "$name")";;
  push)
    [ "$1" = -q ] && shift
    dest=${2#oci-archive:}; dest=${dest%%:*}
    if [ -f "$(t "$1")" ]; then cat "$(t "$1")"; else echo "$1"; fi > "$dest";;
  *) echo "fake buildah: $cmd?" >&2; exit 2;;
esac
"""


def test_the_archive_holds_the_image_this_build_made_not_what_the_shared_names_point_to(
    archive: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """scripts/image.sh with buildah and mmdebstrap faked: when other checkouts tag the shared names
    meanwhile, the archive still holds the image this build made (not another checkout's code under
    our archive's name), built on the base of this build's key (not another script's base)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "buildah").write_text(FAKE_BUILDAH)
    (fake / "mmdebstrap").write_text(
        '#!/bin/bash\n[ "$1" = --version ] && { echo "mmdebstrap fake"; exit 0; }\n'
        'for a; do out=$last; last=$a; done; echo base > "$out"\n'  # the output is the next-to-last
    )
    for f in fake.iterdir():
        f.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "sources.list").write_text("deb file:/nonexistent bookworm main\n")
    out = tmp_path / "image.tar"
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "FAKE_STATE": str(state),
        "CSI_THIN_CACHE": str(tmp_path / "cache"),
        "CSI_THIN_APT_SOURCES": str(tmp_path / "sources.list"),
        "IMAGE_ARCHIVE": str(out),
    }
    built = subprocess.run(
        [str(conftest.ROOT / "scripts" / "image.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    shipped = out.read_text().strip()
    assert shipped.startswith("ours-on-"), f"the archive holds another build's image: {shipped}"
    assert shipped != "ours-on-base-theirs", "built on another checkout's base"
    assert shipped.startswith("ours-on-base-"), shipped
