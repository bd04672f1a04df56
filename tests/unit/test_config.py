from __future__ import annotations

import pathlib

import pytest

from csi_thin import config, errors, model


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("64KiB", 64 * 1024),
        ("64k", 64 * 1024),
        ("10G", 10 * 1024**3),
        ("2GiB", 2 * 1024**3),
        (" 3 MiB ", 3 * 1024**2),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert config.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "-1", "1.5G", "5X", "../1"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        config.parse_size(text)


def _dm(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"data_file": "/var/lib/csi-thin/data.img", "data_size": "1G"}
    base.update(kw)
    return {"name": "pool1", "backend": "dmthin", "state_dir": "/var/lib/csi-thin", "dmthin": base}


def test_loop_pool_defaults() -> None:
    cfg = config.pool_from_dict(_dm())
    assert cfg.dmthin is not None
    assert cfg.dmthin.data_size == model.GiB
    assert cfg.block_size == 64 * model.KiB
    assert cfg.thresholds.metadata < cfg.thresholds.data


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_dm(block_size="32KiB"), "block_size"),
        (_dm(block_size="96KiB"), "block_size"),
        (_dm(block_size="2GiB"), "block_size"),
        (_dm(data_size=0), "data_size"),
        (_dm(data_device="/dev/sdb"), "either"),
        # one device (or file) for both: the pool's data writes would overwrite its metadata
        (
            {**_dm(), "dmthin": {"data_device": "/dev/sdb", "metadata_device": "/dev//sdb"}},
            "different",
        ),
        (_dm(metadata_file="/var/lib/csi-thin/./data.img"), "different"),
        (_dm(bogus=1), "unknown"),
        ({**_dm(), "name": "Bad_Name"}, "pool name"),
        ({**_dm(), "state_dir": "relative/dir"}, "absolute"),
        ({**_dm(), "backend": "zfs"}, "backend"),
        ({**_dm(), "thresholds": {"data": 1.5}}, "threshold"),
        ({"name": "p", "backend": "reflink", "state_dir": "/x"}, "reflink"),
    ],
)
def test_invalid_pool_configs(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=needle):
        config.pool_from_dict(raw)


def test_block_devices_pool() -> None:
    raw = {
        "name": "fast",
        "state_dir": "/var/lib/csi-thin",
        "dmthin": {"data_device": "/dev/sdb", "metadata_device": "/dev/sdc", "block_size": "1GiB"},
    }
    cfg = config.pool_from_dict(raw)
    assert cfg.dmthin is not None
    assert cfg.dmthin.block_size == model.GiB


def test_load_pool_yaml(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(
        "name: p\nbackend: reflink\nstate_dir: /var/lib/x\n"
        "reflink: {directory: /srv/pool, image_file: /srv/pool.img, image_size: 2G}\n"
        "thresholds: {data: 0.9, metadata: 0.7}\n"
    )
    cfg = config.load_pool(str(path))
    assert cfg.backend == config.BackendKind.REFLINK
    assert cfg.reflink is not None and cfg.reflink.image_size == 2 * model.GiB
    assert cfg.thresholds == model.Thresholds(data=0.9, metadata=0.7)


def test_load_pool_rejects_non_mapping(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(errors.InvalidArgument, match="mapping"):
        config.load_pool(str(path))
