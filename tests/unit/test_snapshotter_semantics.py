"""containerd's filter syntax, Update's field paths and the `snapshotter:` config section: pure
functions of csi_thin.snapshotter and csi_thin.config, table-driven."""

from __future__ import annotations

import types

import pytest

from csi_thin import config, errors, model
from csi_thin.snapshotter import filters, service

INFO = service.Info(
    name="a-wl",
    parent="p-wl",
    kind=model.LayerKind.ACTIVE,
    created_at=0.0,
    updated_at=0.0,
    labels=(("containerd.io/gc.root", "check-walk"), ("l", "2"), ("with space", "x y")),
)


@pytest.mark.parametrize(
    ("texts", "matches"),
    [
        ([], True),
        ([""], True),
        (["name==a-wl"], True),
        (["name==a"], False),
        (["name==a", "name==a-wl"], True),  # filters OR
        (["name==a-wl,labels.l==3"], False),  # selectors AND
        (["kind==active"], True),
        (["kind==committed"], False),
        (["parent==p-wl"], True),
        (['parent!=""'], True),
        (['labels."containerd.io/gc.root"==check-walk'], True),
        (["labels.l"], True),
        (["labels.m"], False),
        (["labels.m!=x"], True),  # an absent field is "" for !=
        (['labels.m==""'], False),  # but == needs it present
        (['labels."with space"=="x y"'], True),
        (["name~=^a-"], True),
        (["name~=/^p-/"], False),
        (["name~=|w.$|"], True),
        (["  name == a-wl , kind==active "], True),
        (["unknown"], False),
    ],
)
def test_filters_match_as_containerd_does(texts: list[str], matches: bool) -> None:
    assert filters.parse_all(texts).match(service._adaptor(INFO)) is matches


@pytest.mark.parametrize(
    "text", ["name==", "==x", "name==a,", 'labels."open==x', "name~=(", "name==a b", "a..b"]
)
def test_bad_filters_are_invalid_argument(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        filters.parse_all([text])


@pytest.mark.parametrize(
    ("paths", "given", "want"),
    [
        ([], {"x": "1"}, {"x": "1"}),  # no mask: every mutable field (the labels) replaced
        (["labels"], {"x": "1"}, {"x": "1"}),
        (["labels.b"], {"b": "9"}, {"a": "1", "b": "9"}),
        (["labels.a"], {}, {"b": "2"}),  # a path to a label not given removes it
        (["labels.a", "labels.c"], {"c": "3"}, {"b": "2", "c": "3"}),
    ],
)
def test_update_field_paths(paths: list[str], given: dict[str, str], want: dict[str, str]) -> None:
    assert service.updated_labels({"a": "1", "b": "2"}, given, paths) == want


@pytest.mark.parametrize("path", ["name", "parent", "kind", "created_at"])
def test_update_of_an_immutable_field_is_invalid(path: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        service.updated_labels({}, {}, [path])


def _pool(snapshotter: object) -> dict[str, object]:
    return {
        "name": "p",
        "backend": "reflink",
        "state_dir": "/var/lib/x",
        "reflink": {"directory": "/srv/x"},
        "snapshotter": snapshotter,
    }


def test_snapshotter_section_mirrors_the_seed() -> None:
    raw = {
        "enabled": True,
        "socket": "/run/csi-thin/snap.sock",
        "base_image_size": "1GiB",
        "fs_type": "xfs",
        "fs_options": "-m crc=1 -i size=512",
        "async_remove": True,
        "discard_blocks": True,
    }
    got = config.pool_from_dict(_pool(raw)).snapshotter
    assert got == config.SnapshotterConfig(
        enabled=True,
        socket="/run/csi-thin/snap.sock",
        base_image_size=model.GiB,
        fs_type=config.LayerFs.XFS,
        fs_options=("-m", "crc=1", "-i", "size=512"),
        async_remove=True,
        discard_blocks=True,
    )
    assert config.pool_from_dict(_pool(None)).snapshotter == config.SnapshotterConfig()


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"fs_type": "btrfs"}, "fs_type"),
        ({"enabled": True}, "socket"),
        ({"socket": "relative.sock"}, "absolute"),
        ({"base_image_size": "1MiB"}, "base_image_size"),
        ({"fs_type": "xfs", "base_image_size": "100MiB"}, "300MB"),
        ({"async_remove": "yes"}, "true or false"),
        ({"pool_name": "x"}, "unknown"),
        ({"fs_options": ["-E", "x"]}, "fs_options"),
    ],
)
def test_bad_snapshotter_section(raw: dict[str, object], says: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=says):
        config.pool_from_dict(_pool(raw))


@pytest.mark.parametrize("text", ["\u00b2", "\uff11\uff12\uff13", "-1", "1e9", "", " 100000000"])
def test_max_size_label_is_ascii_digits_or_invalid_argument(text: str) -> None:
    """containerd's max-size label comes from any client: anything but ASCII digits (str.isdigit
    accepts '²', which int() then refuses with a ValueError: an INTERNAL error) is InvalidArgument."""
    sn = service.Snapshotter(types.SimpleNamespace(store=None), config.SnapshotterConfig())  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="max-size"):
        sn._base_size({service.LABEL_MAX_SIZE: text})
    assert sn._base_size({service.LABEL_MAX_SIZE: str(64 * model.MiB)}) == 64 * model.MiB
