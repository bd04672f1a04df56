"""The one place that spawns subprocesses.

argv lists only (never a shell), `LC_ALL=C` so output parses the same everywhere, a timeout taken
from the caller's deadline, and stderr kept on the raised exception.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess

from csi_thin import deadline as deadline_mod
from csi_thin import errors

log = logging.getLogger(__name__)

_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C", "DM_DISABLE_UDEV": "1"}


@dataclasses.dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: list[str],
    *,
    deadline: deadline_mod.Deadline,
    check: bool = True,
    input_text: str | None = None,
    pass_fds: tuple[int, ...] = (),
) -> Result:
    """Run argv to completion within the deadline.

    Raises CommandTimeout when the deadline passes (the child is killed), CommandFailed on a non-zero
    exit when `check` is set. `pass_fds` stay open in the child, at the same numbers.
    """
    timeout = deadline.remaining()
    if timeout <= 0:
        raise errors.CommandTimeout(argv, 0.0)
    try:
        proc = subprocess.run(
            argv,
            input=input_text,
            capture_output=True,
            text=True,
            env=_ENV,
            timeout=timeout,
            check=False,
            pass_fds=pass_fds,
        )
    except subprocess.TimeoutExpired as exc:
        raise errors.CommandTimeout(argv, timeout) from exc
    except FileNotFoundError as exc:
        raise errors.CommandFailed(argv, 127, f"{argv[0]}: command not found") from exc
    log.debug("cmd=%s rc=%d", argv[0], proc.returncode)
    result = Result(argv=argv, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
    if check and proc.returncode != 0:
        raise errors.CommandFailed(argv, proc.returncode, proc.stderr or proc.stdout)
    return result
