"""The network rule, checked on the running cluster with the chart installed: every socket of the
cluster's processes (daemons, shims, every container: all on the host's network) is bound to
loopback, and every connection they hold is to loopback."""

from __future__ import annotations

import ipaddress
import os
import pathlib

from tests.e2e import cluster as cluster_mod
from tests.e2e.conftest import Driver

#: /proc/net/tcp's state of a listening socket
TCP_LISTEN = "0A"


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net's address: the kernel's bytes as host-order (little-endian) 32-bit words, in hex."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    # a tcp6 socket serving IPv4 shows its peer as ::ffff:a.b.c.d
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def _sockets() -> dict[int, tuple[str, str, str, str]]:
    """inode -> (protocol, state, local address, remote address) of the host netns' inet sockets."""
    out = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in pathlib.Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            out[int(f[9])] = (proto, f[3], f[1], f[2])
    return out


def _ours(c: cluster_mod.Cluster) -> set[int]:
    """The cluster's processes: the daemons it started, everything under them (shims, runc), and
    everything in kubelet's pod cgroups (the containers)."""
    parents: dict[int, int] = {}
    for d in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            parents[int(d.name)] = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    ours = {p.pid for p in c.procs.values() if p.poll() is None} | cluster_mod._kubepods_pids()
    grown = True
    while grown:
        more = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        ours |= more
        grown = bool(more)
    return ours


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:  # gone meanwhile
        pass
    return inodes


def test_every_socket_is_on_loopback(driver: Driver) -> None:
    c = driver.cluster
    sockets = _sockets()
    checked, bad = 0, []
    for pid in sorted(_ours(c)):
        comm = (
            pathlib.Path(f"/proc/{pid}/comm").read_text().strip() if os.path.exists(f"/proc/{pid}") else "?"
        )
        for inode in _socket_inodes(pid):
            if inode not in sockets:
                continue  # a unix socket
            proto, state, local, remote = sockets[inode]
            local_ip, remote_ip = _address(local.split(":")[0]), _address(remote.split(":")[0])
            checked += 1
            if not local_ip.is_loopback:
                bad.append(f"{comm}[{pid}] {proto} bound to {local_ip}")
            listening = (proto.startswith("tcp") and state == TCP_LISTEN) or remote_ip.is_unspecified
            if not listening and not remote_ip.is_loopback:
                bad.append(f"{comm}[{pid}] {proto} connected to {remote_ip}")
    # the apiserver, etcd, kubelet, the sidecars and the driver all listen: a check of nothing fails
    assert checked > 10, f"only {checked} inet sockets found for the cluster's processes"
    assert not bad, bad
