"""CSI names -> pool device names (which are also the CSI volume and snapshot ids).

CSI names are up to 128 bytes of arbitrary UTF-8 (csi-sanity uses spaces); pool device names must be
short and safe (they end up in LMDB keys, log lines and, for some backends, dm names and file names).
The mapping is deterministic, so a retried CreateVolume finds the device its first attempt made:

- a name that is already safe and short (the external-provisioner's `pvc-<uuid>`) keeps its readable
  form behind a kind prefix: `v-pvc-...` / `s-snapshot-...`;
- any other name becomes the prefix plus the first 40 hex digits of its SHA-256: `vh-...` / `sh-...`.

Volume group snapshots are `g-...` / `gh-...`; the member snapshot of each source volume is named from
the group id and the volume id joined by a NUL (`group_member_name`): no CSI name holds a control
character, so that name is always hashed and never one a CreateSnapshot can ask for.

The two forms cannot collide (their second character differs), volumes and snapshots cannot collide
(their first differs). The hashed form is one-way on purpose: after CreateVolume every CSI call
names the volume by its id, never by its name, so nothing needs the CSI name back; the readable form
is kept where possible for the humans reading `dmsetup ls`.
"""

from __future__ import annotations

import enum
import hashlib
import re

#: What stays readable: lowercase DNS-label-like names of a bounded length.
_READABLE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Every id this driver hands out matches this.
_OWN_ID = re.compile(r"^(v|vh|s|sh|g|gh)-[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HASH_DIGITS = 40


class IdKind(enum.Enum):
    VOLUME = "v"
    SNAPSHOT = "s"
    GROUP = "g"  # a volume group snapshot


def device_name(csi_name: str, kind: IdKind) -> str:
    """The device name (= CSI id) for a CSI volume or snapshot name."""
    if _READABLE.match(csi_name):
        return f"{kind.value}-{csi_name}"
    digest = hashlib.sha256(csi_name.encode("utf-8")).hexdigest()[:_HASH_DIGITS]
    return f"{kind.value}h-{digest}"


def group_member_name(group_id: str, volume_id: str) -> str:
    """The snapshot name (= CSI snapshot id) of volume `volume_id`'s member of group `group_id`."""
    return device_name(f"{group_id}\x00{volume_id}", IdKind.SNAPSHOT)


def is_own_id(device: str, kind: IdKind) -> bool:
    """True when `device` has the shape of an id this driver hands out for `kind`.

    A well-formed id of another shape (another driver's, or made up by a test) cannot name anything
    in this pool: callers treat it as absent (NOT_FOUND, or done for deletes).
    """
    return bool(_OWN_ID.match(device)) and device.split("-", 1)[0] in (kind.value, kind.value + "h")
