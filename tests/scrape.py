"""An HTTP client for the process's /healthz and /metrics (127.0.0.1 only), and the exposition parsed
by prometheus_client's own parser, as Prometheus would read it."""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request

from prometheus_client import parser
from prometheus_client.metrics_core import Metric


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: str


def get(address: str, path: str, *, accept: str = "") -> Reply:
    assert address.startswith(("127.0.0.1:", "[::1]:")), f"tests talk to loopback only, not {address}"
    req = urllib.request.Request(f"http://{address}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Reply(resp.status, resp.headers["Content-Type"], resp.read().decode())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers["Content-Type"], exc.read().decode())


def metrics(address: str) -> dict[str, Metric]:
    reply = get(address, "/metrics")
    assert reply.status == 200, reply
    return {m.name: m for m in parser.text_string_to_metric_families(reply.body)}


def value(families: dict[str, Metric], name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels` (fails when none or several)."""
    family = next((f for f in families.values() if any(s.name == name for s in f.samples)), None)
    assert family is not None, f"no sample {name} in {sorted(families)}"
    found = [s for s in family.samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0].value
