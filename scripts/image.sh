#!/usr/bin/env bash
# Build the csi-thin image from ./Containerfile here, where no container registry can be reached,
# into an OCI archive that `ctr images import` (and `podman load`, `skopeo`) accept.
#
#   scripts/image.sh context   only lay out the build context (bin/image/context/wheels)
#   scripts/image.sh           context + base image + buildah build + bin/csi-thin-image.tar
#
# 1. Build context: the csi-thin wheel (with the generated stubs: run after `make proto`) and its
#    dependencies' wheels, built on the host by the venv's CPython (3.11, bookworm's minor) at the
#    versions the venv has (pip freeze as constraints), so the image runs what the tests ran.
# 2. Base: the Containerfile's FROM (debian:bookworm-slim) made from Debian packages through the
#    host's own apt sources by mmdebstrap (minbase, documentation left out as the slim images do),
#    cached as a tarball in $CACHE keyed by everything that defines it, and committed into a private
#    containers-storage as localhost/<FROM>: the name containers-storage gives an image made here
#    (`buildah tag x foo` is localhost/foo). Looking up a short name, buildah tries localhost/ among
#    its candidates, so with --pull=never `FROM debian:bookworm-slim` resolves to the local image and
#    no registry is ever asked. (Committed under the bare short name it would be normalized to a
#    registry's name instead, docker-style.) The storage is shared by every checkout on the machine,
#    whose scripts may make other bases under that same name: the build itself names its base by
#    key (localhost/csi-thin-base:<key>, buildah build --from), which nobody re-tags.
# 3. buildah build --pull=never --layers: the apt layer is reused while the base and the Containerfile
#    are unchanged; only the wheel layer is redone when the code changes.
# 4. The archive is rebuilt only when its inputs change (stamp: hash of the Containerfile, this
#    script, the base key and the wheels' inputs), so a warm `make image` costs a hash.
set -euo pipefail
# context and base run as $(...): without this, a failing command inside them would not stop them
shopt -s inherit_errexit
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=${CSI_THIN_CACHE:-$HOME/.cache/csi-thin}/image
OUT=${IMAGE_ARCHIVE:-$ROOT/bin/csi-thin-image.tar}
CTX=$ROOT/bin/image/context
# The host's Debian sources (deb822 or one-line format); the image's apt uses them too.
SOURCES=${CSI_THIN_APT_SOURCES:-}
if [ -z "$SOURCES" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then SOURCES=$f; break; fi
  done
fi
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("'"$ROOT"'/pyproject.toml", "rb"))["project"]["version"])')
# localhost/: the name a node's runtime finds as given (values.yaml says why)
NAME=localhost/csi-thin:$VERSION
FROM=$(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' "$ROOT/Containerfile" | head -1)
SUITE=${FROM#*:}; SUITE=${SUITE%-slim}
# What a slim image leaves out; kept in dpkg's config, so the Containerfile's apt-get follows it too.
SLIM=(
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias'
)
# merged-usr hook: /usr merged by symlinks set up before the essential packages, as the official
# images are; without it apt picks `usrmerge` to do that, which drags perl in (50 MB)
MMDEB=(--variant=minbase --include=debian-archive-keyring --skip=output/dev
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr "${SLIM[@]}")

hash() { sha256sum | cut -c1-16; }

context() {
  local key; key=$( { cat "$ROOT/pyproject.toml" "$0"; "$PY" -m pip freeze --exclude-editable;
    (cd "$ROOT" && find csi_thin -type f \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) \
      -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum); } | hash)
  # stdout is the key (the caller captures it): messages go to stderr
  if [ "$(cat "$CTX/.key" 2>/dev/null)" = "$key" ]; then echo "image: context up to date" >&2; echo "$key"; return; fi
  [ -f "$ROOT/csi_thin/csi/pb/csi_pb2.py" ] || { echo "image: generated stubs missing: run make proto" >&2; exit 1; }
  rm -rf "$CTX" && mkdir -p "$CTX/wheels"
  "$PY" -m pip freeze --exclude-editable > "$CTX/constraints.txt"
  # setuptools builds in the tree (build/, csi_thin.egg-info/: gitignored); deps come from pip's cache
  # or the index. A fixed SOURCE_DATE_EPOCH makes the csi-thin wheel byte-for-byte the same for the same code, so
  # buildah's layer cache keeps the install layer when only something else changed
  rm -rf "$ROOT/build"  # setuptools would ship a module deleted from the tree but still in build/lib
  SOURCE_DATE_EPOCH=315532800 "$PY" -m pip wheel -q --no-cache-dir -c "$CTX/constraints.txt" \
    -w "$CTX/wheels" "$ROOT" >&2
  rm "$CTX/constraints.txt"
  # (no `unzip | grep -q` under pipefail: grep's early exit would fail the pipe by SIGPIPE)
  [ -n "$(unzip -Z1 "$CTX"/wheels/csi_thin-"$VERSION"-*.whl csi_thin/csi/pb/csi_pb2.py 2>/dev/null)" ] \
    || { echo "image: the csi-thin wheel lacks the generated stubs" >&2; exit 1; }
  echo "$key" > "$CTX/.key"
  echo "image: context $CTX ($(ls "$CTX/wheels" | wc -l) wheels)" >&2
  echo "$key"
}

# runroot: containers-storage's volatile state (mount counts, locks) belongs on /run, which a reboot
# empties, not beside the layers. overlay needs a cache directory that is not itself on overlayfs
# (a container's root): CSI_THIN_STORAGE_DRIVER=vfs there.
BUILDAH=(buildah --root "$CACHE/storage" --runroot /run/csi-thin-image
  --storage-driver "${CSI_THIN_STORAGE_DRIVER:-overlay}")

base() {
  [ -n "$SOURCES" ] || { echo "image: no Debian apt sources found (set CSI_THIN_APT_SOURCES)" >&2; exit 1; }
  [ -r "$SOURCES" ] || { echo "image: apt sources $SOURCES: not a readable file" >&2; exit 1; }
  local key; key=$( { echo "$SUITE ${MMDEB[*]}"; mmdebstrap --version; cat "$SOURCES"; } | hash)
  local tar=$CACHE/base-$key.tar
  mkdir -p "$CACHE"
  if [ ! -s "$tar" ]; then
    local t0=$SECONDS
    echo "image: making the base $FROM from Debian packages ($SOURCES) ..." >&2
    # a name of its own: another checkout on this machine may be making the same base right now
    mmdebstrap -q "${MMDEB[@]}" --format=tar "$SUITE" "$tar.$$.tmp" "$SOURCES" >&2
    mv "$tar.$$.tmp" "$tar"
    echo "image: base made in $((SECONDS - t0))s" >&2
  fi
  if ! "${BUILDAH[@]}" inspect --type image "localhost/csi-thin-base:$key" >/dev/null 2>&1; then
    local c; c=$("${BUILDAH[@]}" from --pull=never scratch)
    # a failed step must not leave its working container in the storage
    trap '"${BUILDAH[@]}" rm "$c" >/dev/null 2>&1' ERR
    "${BUILDAH[@]}" add "$c" "$tar" / >/dev/null
    "${BUILDAH[@]}" config --cmd '["bash"]' --label "io.csi-thin.base-key=$key" "$c"
    "${BUILDAH[@]}" commit -q --rm "$c" "localhost/csi-thin-base:$key" >/dev/null
    trap - ERR
    "${BUILDAH[@]}" tag "localhost/csi-thin-base:$key" "localhost/$FROM"
    echo "image: base committed as localhost/csi-thin-base:$key and localhost/$FROM" >&2
  fi
  echo "$key"
}

case ${1:-build} in
  context) context >/dev/null; exit 0;;
  build) ;;
  *) echo "usage: $0 [context]" >&2; exit 2;;
esac

ctx_key=$(context)
base_key=$(base)
key=$( { echo "$ctx_key $base_key $NAME"; cat "$ROOT/Containerfile" "$0"; } | hash)
if [ -s "$OUT" ] && [ "$(cat "$OUT.key" 2>/dev/null)" = "$key" ]; then
  echo "image: $NAME up to date ($OUT)"; exit 0
fi
t0=$SECONDS
mkdir -p "$(dirname "$OUT")"
# The storage is shared by every checkout on this machine: the image is handled by the ID this
# build wrote, never by a name another checkout's build may tag meanwhile (the archive would hold
# that checkout's code). The name is given only inside the archive, where ctr finds it.
rm -f "$OUT.iid"
# chroot isolation: no user namespace or cgroup set-up needed; the RUN steps share the host's
# network (apt reaches the same Debian sources the host uses)
"${BUILDAH[@]}" build -q --pull=never --layers --isolation chroot -f "$ROOT/Containerfile" \
  --from "localhost/csi-thin-base:$base_key" --label "org.opencontainers.image.version=$VERSION" \
  --iidfile "$OUT.iid" "$CTX" >/dev/null
id=$(cat "$OUT.iid"); id=${id#sha256:}; rm "$OUT.iid"
[ -n "$id" ] || { echo "image: buildah wrote no image ID" >&2; exit 1; }
rm -f "$OUT.tmp"
"${BUILDAH[@]}" push -q "$id" "oci-archive:$OUT.tmp:$NAME"
mv "$OUT.tmp" "$OUT"
echo "$key" > "$OUT.key"
# this checkout's previous image (older code): its wheel layer only; the cached apt layer stays.
# Failing to remove it costs disk, not correctness (another checkout may hold the same ID).
old=$(cat "$OUT.id" 2>/dev/null || true)
echo "$id" > "$OUT.id"
if [ -n "$old" ] && [ "$old" != "$id" ]; then
  "${BUILDAH[@]}" rmi "$old" >/dev/null 2>&1 || echo "image: previous image $old not removed" >&2
fi
echo "image: $NAME -> $OUT ($(du -h "$OUT" | cut -f1)) in $((SECONDS - t0))s"
