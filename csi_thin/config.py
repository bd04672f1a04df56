"""Frozen configuration, read once at start-up (YAML file and/or flags) and validated.

A pool config names the backend and where its devices come from. Validation errors are
InvalidArgument with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import posixpath
import re
import shlex
from typing import Any

import yaml

from csi_thin import errors, model

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: str | int) -> int:
    """Parse "64KiB", "10G", "1048576" into bytes (binary units)."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise errors.InvalidArgument(f"not a size: {value!r} (examples: 1048576, 64KiB, 10GiB)")
    unit = (m.group(2) or "")[:1].upper()
    return int(m.group(1)) * _UNITS[unit]


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """Seconds from '90', '90s', '30m' or '1h' (>= 0)."""
    text = value.strip().lower()
    scale = _DURATION_UNITS.get(text[-1:], 0.0)
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise errors.InvalidArgument(f"duration {value!r}: expected e.g. 90s, 30m or 1h") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise errors.InvalidArgument(f"duration {value!r} must be a finite number >= 0")
    return seconds


class BackendKind(enum.StrEnum):
    DMTHIN = "dmthin"
    REFLINK = "reflink"


@dataclasses.dataclass(frozen=True)
class DmThinConfig:
    """Where a dm-thin pool's data and metadata come from, and its creation options.

    Either block devices (data_device + metadata_device) or sparse loop files (data_file +
    metadata_file, created with the given sizes when missing).
    """

    data_device: str | None = None
    metadata_device: str | None = None
    data_file: str | None = None
    data_size: int = 0
    metadata_file: str | None = None
    metadata_size: int = 0  # 0: sized from the kernel docs' formula with headroom
    block_size: int = 64 * model.KiB
    low_water_mark_blocks: int = 0  # 0: derived (about 1% of the data blocks)
    zero_blocks: bool = True
    discard_passdown: bool = True
    error_if_no_space: bool = True

    def validate(self) -> None:
        devs = self.data_device is not None or self.metadata_device is not None
        files = self.data_file is not None or self.metadata_file is not None
        if devs == files:
            raise errors.InvalidArgument(
                "dmthin pool: give either data_device + metadata_device or data_file (+ metadata_file)"
            )
        if devs and not (self.data_device and self.metadata_device):
            raise errors.InvalidArgument("dmthin pool: data_device and metadata_device go together")
        if files and (not self.data_file or self.data_size <= 0):
            raise errors.InvalidArgument("dmthin pool: data_file needs a positive data_size")
        # the kernel takes one device as both and formats the metadata at its start, where the first
        # data blocks land too: every volume's writes would then overwrite the pool's metadata
        pairs = ((self.data_device, self.metadata_device), (self.data_file, self.metadata_file))
        for data, meta in pairs:
            if data and meta and posixpath.normpath(data) == posixpath.normpath(meta):
                raise errors.InvalidArgument(
                    f"dmthin pool: data and metadata must be different devices or files, both are {data}"
                )
        bs = self.block_size
        if bs < 64 * model.KiB or bs > model.GiB or bs % (64 * model.KiB):
            raise errors.InvalidArgument(
                f"dmthin pool: block_size {bs} must be 64KiB..1GiB in multiples of 64KiB"
            )


@dataclasses.dataclass(frozen=True)
class ReflinkConfig:
    """A pool directory on a reflink-capable filesystem (XFS reflink=1, btrfs), either an existing
    mount or a loop-mounted image file the pool creates (image_file + image_size + fs_type)."""

    directory: str = ""
    image_file: str | None = None
    image_size: int = 0
    fs_type: str = "xfs"
    block_size: int = 64 * model.KiB  # sizes are rounded to this, like a thin pool's block


@dataclasses.dataclass(frozen=True)
class TrimConfig:
    """When the node trims the filesystems staged from this pool (fstrim: deleted files' blocks go
    back to the pool). A run starts `interval` after the last one finished (the first: after the
    node's first start), plus a random share of `jitter` so that nodes started together do not all
    trim at once. `enabled: false` turns it off; `csi-thin pool trim` still works."""

    enabled: bool = True
    interval_seconds: float = 24 * 3600.0
    jitter_seconds: float = 3600.0

    def validate(self) -> None:
        if self.interval_seconds < 60:
            raise errors.InvalidArgument(f"trim interval {self.interval_seconds:g}s: at least 60s")
        if self.jitter_seconds > self.interval_seconds:
            raise errors.InvalidArgument(
                f"trim jitter {self.jitter_seconds:g}s must not exceed "
                f"the interval {self.interval_seconds:g}s"
            )


def _trim_section(raw: Any) -> TrimConfig:
    """`trim: {enabled: true, interval: 24h, jitter: 1h}` (every key optional)."""
    if raw is None:
        return TrimConfig()
    if not isinstance(raw, dict):
        raise errors.InvalidArgument("trim: expected a mapping, e.g. {interval: 24h, jitter: 1h}")
    unknown = set(raw) - {"enabled", "interval", "jitter"}
    if unknown:
        raise errors.InvalidArgument(
            f"unknown trim keys: {sorted(unknown)} (known: enabled, interval, jitter)"
        )
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise errors.InvalidArgument(f"trim.enabled must be true or false, not {enabled!r}")
    default = TrimConfig()
    return TrimConfig(
        enabled=enabled,
        interval_seconds=parse_duration(str(raw["interval"]))
        if "interval" in raw
        else default.interval_seconds,
        jitter_seconds=parse_duration(str(raw["jitter"])) if "jitter" in raw else default.jitter_seconds,
    )


class LayerFs(enum.StrEnum):
    """The filesystems a snapshotter base layer is formatted with."""

    EXT4 = "ext4"
    XFS = "xfs"


@dataclasses.dataclass(frozen=True)
class SnapshotterConfig:
    """The containerd proxy snapshotter on this pool (csi_thin.snapshotter), the `snapshotter:`
    section. Its keys mirror containerd's devmapper snapshotter: a layer without a parent is a new
    thin device of `base_image_size` formatted with `fs_type` (+ `fs_options`, extra mkfs arguments);
    a layer with one is a snapshot of it. `async_remove`: Remove only forgets the snapshot and
    Cleanup deletes its device (containerd calls Cleanup after its garbage collection);
    `discard_blocks`: a device is discarded (blkdiscard) before it is deleted, so a pool on a thin
    or SSD device underneath gives the space back there too. `enabled` and `socket`: the node
    process (`csi-thin node`, `standalone`) serves it too, on that socket, sharing its engine."""

    enabled: bool = False
    socket: str = ""
    base_image_size: int = 10 * model.GiB
    fs_type: LayerFs = LayerFs.EXT4
    fs_options: tuple[str, ...] = ()
    async_remove: bool = False
    discard_blocks: bool = False

    def validate(self) -> None:
        if self.base_image_size < 16 * model.MiB or self.base_image_size > 1 << 50:
            raise errors.InvalidArgument(f"snapshotter.base_image_size {self.base_image_size}: 16MiB..1PiB")
        if self.fs_type == LayerFs.XFS and self.base_image_size < 300 * model.MiB:
            raise errors.InvalidArgument(
                f"snapshotter.base_image_size {self.base_image_size}: mkfs.xfs needs at least 300MB"
            )
        if self.enabled and not self.socket:
            raise errors.InvalidArgument("snapshotter.enabled needs snapshotter.socket (an absolute path)")
        if self.socket and not pathlib.PurePath(self.socket).is_absolute():
            raise errors.InvalidArgument(f"snapshotter.socket {self.socket!r} must be absolute")


def _snapshotter_section(raw: Any) -> SnapshotterConfig:
    """`snapshotter: {base_image_size: 10GiB, fs_type: ext4, fs_options: "-E nodiscard", ...}`."""
    if raw is None:
        return SnapshotterConfig()
    if not isinstance(raw, dict):
        raise errors.InvalidArgument("snapshotter: expected a mapping, e.g. {base_image_size: 10GiB}")
    known = {f.name for f in dataclasses.fields(SnapshotterConfig)}
    unknown = set(raw) - known
    if unknown:
        raise errors.InvalidArgument(f"unknown snapshotter keys: {sorted(unknown)} (known: {sorted(known)})")
    for key in ("enabled", "async_remove", "discard_blocks"):
        if not isinstance(raw.get(key, False), bool):
            raise errors.InvalidArgument(f"snapshotter.{key} must be true or false, not {raw[key]!r}")
    try:
        fs_type = LayerFs(raw.get("fs_type", LayerFs.EXT4.value))
    except ValueError:
        raise errors.InvalidArgument(
            f"snapshotter.fs_type {raw['fs_type']!r}: one of {[f.value for f in LayerFs]}"
        ) from None
    options = raw.get("fs_options", "")
    if not isinstance(options, str):
        raise errors.InvalidArgument(
            "snapshotter.fs_options: a string of mkfs arguments, e.g. '-E nodiscard'"
        )
    default = SnapshotterConfig()
    return SnapshotterConfig(
        enabled=raw.get("enabled", default.enabled),
        socket=str(raw.get("socket", "")),
        base_image_size=parse_size(raw.get("base_image_size", default.base_image_size)),
        fs_type=fs_type,
        fs_options=tuple(shlex.split(options)),
        async_remove=raw.get("async_remove", default.async_remove),
        discard_blocks=raw.get("discard_blocks", default.discard_blocks),
    )


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    name: str
    backend: BackendKind
    state_dir: str  # LMDB lives here
    dmthin: DmThinConfig | None = None
    reflink: ReflinkConfig | None = None
    thresholds: model.Thresholds = dataclasses.field(default_factory=model.Thresholds)
    trim: TrimConfig = dataclasses.field(default_factory=TrimConfig)
    snapshotter: SnapshotterConfig = dataclasses.field(default_factory=SnapshotterConfig)

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise errors.InvalidArgument(
                f"pool name {self.name!r}: 1-32 of [a-z0-9-], starting and ending alphanumeric"
            )
        if not pathlib.PurePath(self.state_dir).is_absolute():
            raise errors.InvalidArgument(f"state_dir {self.state_dir!r} must be absolute")
        for label, value in (("data", self.thresholds.data), ("metadata", self.thresholds.metadata)):
            if not 0.0 < value <= 1.0:
                raise errors.InvalidArgument(f"{label} threshold {value} must be in (0, 1]")
        self.trim.validate()
        self.snapshotter.validate()
        if self.backend == BackendKind.DMTHIN:
            if self.dmthin is None:
                raise errors.InvalidArgument("backend dmthin needs a 'dmthin' section")
            self.dmthin.validate()
        elif self.reflink is None or not self.reflink.directory:
            raise errors.InvalidArgument("backend reflink needs a 'reflink' section with a directory")

    @property
    def block_size(self) -> int:
        if self.dmthin is not None:
            return self.dmthin.block_size
        assert self.reflink is not None
        return self.reflink.block_size


_SIZE_FIELDS = {"data_size", "metadata_size", "block_size", "image_size"}


def _section(cls: type[Any], raw: dict[str, Any] | None) -> Any:
    if raw is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise errors.InvalidArgument(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    values = {k: parse_size(v) if k in _SIZE_FIELDS else v for k, v in raw.items()}
    return cls(**values)


def pool_from_dict(raw: dict[str, Any]) -> PoolConfig:
    """Build and validate a PoolConfig from a parsed YAML/JSON mapping."""
    known = {"name", "backend", "state_dir", "dmthin", "reflink", "thresholds", "trim", "snapshotter"}
    unknown = set(raw) - known
    if unknown:
        raise errors.InvalidArgument(f"unknown pool keys: {sorted(unknown)}")
    try:
        backend = BackendKind(raw.get("backend", "dmthin"))
    except ValueError as exc:
        raise errors.InvalidArgument(f"backend must be one of {[b.value for b in BackendKind]}") from exc
    cfg = PoolConfig(
        name=str(raw.get("name", "")),
        backend=backend,
        state_dir=str(raw.get("state_dir", "")),
        dmthin=_section(DmThinConfig, raw.get("dmthin")),
        reflink=_section(ReflinkConfig, raw.get("reflink")),
        thresholds=_section(model.Thresholds, raw.get("thresholds")) or model.Thresholds(),
        trim=_trim_section(raw.get("trim")),
        snapshotter=_snapshotter_section(raw.get("snapshotter")),
    )
    cfg.validate()
    return cfg


def load_pool(path: str) -> PoolConfig:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise errors.InvalidArgument(f"{path}: expected a mapping at the top level")
    return pool_from_dict(raw)
