"""Deadlines carried down from the RPC (or the CLI) to every blocking step.

Nothing below the edge invents its own timeout: it asks the deadline how much time is left, and
retries back off only within that time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

from csi_thin import errors


@dataclasses.dataclass(frozen=True)
class Deadline:
    """An absolute point on the monotonic clock."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def check(self, what: str) -> None:
        if self.expired():
            raise errors.DeadlineExceeded(f"deadline exceeded before {what}")

    def backoff(self, *, first: float = 0.01, factor: float = 2.0, cap: float = 0.5) -> Iterator[int]:
        """Yield attempt numbers, sleeping with exponential backoff in between, until the deadline.

        The first attempt is immediate; iteration stops when the next sleep would pass the deadline.
        """
        delay = first
        attempt = 0
        while True:
            yield attempt
            attempt += 1
            if self.remaining() <= delay:
                return
            time.sleep(delay)
            delay = min(cap, delay * factor)


#: Used where no caller supplies one (start-up recovery, CLI commands): generous, never infinite.
DEFAULT_SECONDS = 120.0


def default() -> Deadline:
    return Deadline.after(DEFAULT_SECONDS)
