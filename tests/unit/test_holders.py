"""csi_thin.dm.holders: mount lookup by device number or source, and the busy retry's rules (a
transient holder is waited out within the deadline, a mount here is not, a lasting one is named).
The real holders (processes, mounts) are exercised in tests/root/test_foreign_loops.py and
tests/vm/test_dmthin_foreign.py."""

from __future__ import annotations

import os
import time

import pytest

from csi_thin import deadline as deadline_mod
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import holders

MOUNTINFO = (
    "22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "43 27 0:39 / /var/pool rw,relatime - btrfs /dev/loop0 rw,space_cache=v2\n"
    "50 22 7:3 / /mnt/with\\040space ro,noatime shared:7 master:2 - ext4 /dev/loop3 ro\n"
)


@pytest.mark.parametrize(
    ("rdev", "source", "points"),
    [
        (os.makedev(7, 3), "", ["/mnt/with space"]),
        (os.makedev(7, 0), "/dev/loop0", ["/var/pool"]),  # btrfs: an anonymous number, found by source
        (os.makedev(7, 0), "", []),
        (os.makedev(252, 0), "", ["/"]),
    ],
)
def test_mount_points(rdev: int, source: str, points: list[str]) -> None:
    assert holders._mount_points(MOUNTINFO, rdev, source) == points


NOBODY = os.makedev(7, 1 << 19)  # a loop minor nobody has


def test_a_transient_busy_is_waited_out() -> None:
    answers = [dm_errors.DeviceBusy("x busy"), dm_errors.DeviceBusy("x busy"), "done"]

    def step() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    d = deadline_mod.Deadline.after(10)
    assert holders.retry_busy(step, rdev=NOBODY, source="", what="t", deadline=d) == "done"
    assert not answers


def test_a_lasting_busy_is_raised_at_the_deadline_with_its_type_and_errno() -> None:
    class Busy(dm_errors.DeviceBusy):
        pass

    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        raise Busy("dev busy", errno=16)

    started = time.monotonic()
    with pytest.raises(Busy, match=r"dev busy: still in use after .* no holder visible") as info:
        holders.retry_busy(step, rdev=NOBODY, source="", what="t", deadline=deadline_mod.Deadline.after(0.5))
    assert time.monotonic() - started >= 0.25
    assert calls > 2
    assert info.value.errno == 16
    assert info.value.code == "FAILED_PRECONDITION"


def test_other_errors_are_not_retried() -> None:
    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        raise dm_errors.DeviceNotFound("gone")

    with pytest.raises(dm_errors.DeviceNotFound):
        holders.retry_busy(step, rdev=NOBODY, source="", what="t", deadline=deadline_mod.Deadline.after(5))
    assert calls == 1
