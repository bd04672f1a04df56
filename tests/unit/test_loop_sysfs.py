"""csi_thin.dm.loop's reading of /sys/block, with the kernel's answers injected: a loop torn down
between open() and read() of its backing_file attribute answers ENODEV (kernfs), and that means
"not attached", never an error."""

from __future__ import annotations

import builtins
import errno
import io
from typing import Any

import pytest

from csi_thin.dm import loop

WANT = "/srv/pool/devices/7.img"


@pytest.fixture
def sysfs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake /sys/block: name -> backing file text, or an errno to raise on read."""
    entries: dict[str, Any] = {}
    real_open = builtins.open

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        p = str(path)
        if p.startswith("/sys/block/"):
            value = entries.get(p.split("/")[3])
            if value is None:
                raise FileNotFoundError(errno.ENOENT, "absent", p)
            if isinstance(value, int):
                raise OSError(value, "injected", p)
            return io.StringIO(value + "\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(loop.os, "listdir", lambda _: sorted(entries))
    monkeypatch.setattr(loop, "_ensure_node", lambda *a, **k: None)
    return entries


@pytest.mark.parametrize("code", [errno.ENODEV, errno.ENXIO])
def test_find_skips_loops_torn_down_mid_read(sysfs: dict[str, Any], code: int) -> None:
    sysfs.update({"loop0": code, "loop1": "/other.img", "loop2": WANT, "sda": "/x"})
    assert loop.find(WANT) == "/dev/loop2"
    assert loop.backing_file("/dev/loop0") is None


def test_other_read_errors_are_not_ours_in_a_scan_but_said_when_asked(sysfs: dict[str, Any]) -> None:
    """A scan passes over someone else's unreadable loop device (tests/unit/test_loop_foreign.py);
    a question about that one device gets the error."""
    sysfs.update({"loop0": errno.EIO, "loop1": WANT})
    assert loop.find(WANT) == "/dev/loop1"
    with pytest.raises(OSError, match="injected"):
        loop.backing_file("/dev/loop0")
