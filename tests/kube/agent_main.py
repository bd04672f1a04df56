"""`csi-thin` as a test launches it, with one fault seam: CSI_THIN_TEST_KILL_AT=<step point> makes
the process SIGKILL itself when the pool layer reaches that fault point (the one registry's
`faults.hook` seam), as a node crash would in the middle of a create, snapshot or delete."""

from __future__ import annotations

import os
import signal
import sys

from csi_thin import cli
from csi_thin.pool import faults


def _kill_at(point: str) -> None:
    if point == os.environ.get("CSI_THIN_TEST_KILL_AT"):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if os.environ.get("CSI_THIN_TEST_KILL_AT"):
        faults.hook = _kill_at
    sys.exit(cli.main(sys.argv[1:]))
