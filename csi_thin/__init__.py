"""csi-thin: a CSI driver serving volumes and snapshots from a node-local dm-thin pool."""

from importlib import metadata

try:
    __version__ = metadata.version("csi-thin")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
