"""Pagination tokens for ListVolumes/ListSnapshots.

A token is a cursor: "continue after this id" (ids are listed in sorted order). Devices created or
deleted between pages never shift a page, and a token stays valid after the device it names is
deleted. The "c1." prefix versions the format; anything else is not a token we issued.
"""

from __future__ import annotations

import base64
import binascii

_PREFIX = "c1."


def token_after(name: str) -> str:
    return _PREFIX + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def start_after(token: str) -> str | None:
    """The id a token continues after; None for an empty or foreign token."""
    if not token.startswith(_PREFIX):
        return None
    body = token[len(_PREFIX) :]
    try:
        name = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return name or None
