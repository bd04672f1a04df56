"""Prometheus metrics of a csi-thin process: one registry per process, served by csi_thin.httpserver.

Where the numbers come from:
- RPC latency and codes: the gRPC edge's one interceptor (csi_thin.csi.interceptor) observes every
  call into `operation_duration_seconds` by operation (the RPC's method name: a fixed set) and code.
- Pool gauges: read at scrape time by `PoolCollector` from the engine (seen through the `Pool`
  Protocol, so this module imports nothing of the pool layer): the pool's status line (one
  dm-thin status ioctl or one statvfs) plus one pass over the LMDB records for the device counts and
  provisioned bytes, the journal (open intents) and the id map (orphans). Those passes are O(devices)
  today: the store keeps no counters. At 1,000 devices they are a few milliseconds of LMDB reads.
- Kubelet registration state: set by csi_thin.csi.registration when kubelet notifies it.
- Reconcile errors, and the latency of the pool operations the node agent runs for CRs (Kubernetes
  mode: creates, snapshots, grows and deletes reach the node's pool through CRs, not through its
  gRPC edge): told by the node agent, by operation (a fixed set) and code.
- Trim totals (runs by result, bytes reclaimed and trimmed, the last run's time): read at scrape
  time from the file csi_thin.node.trim keeps in the pool's state dir (counting manual runs too).
- CR wait time (the controller, Kubernetes mode): how long a CreateVolume, CreateSnapshot, Delete or
  ControllerExpandVolume waited for the node agent's verdict on its CR, by operation and outcome;
  told by csi_thin.kube.crengine.

No label takes an unbounded value: no volume or snapshot names, only kinds, states, modes, method
names and status codes. Names follow Prometheus conventions (`_bytes`, `_seconds`, `_total`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import prometheus_client
from prometheus_client import core as prom_core
from prometheus_client import exposition
from prometheus_client import registry as prom_registry

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model

log = logging.getLogger(__name__)

PREFIX = "csi_thin"
#: RPCs run from a millisecond (Probe) to the interceptor's cap of 110 s (a big format or copy).
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: a scrape waits at most this long for the pool's status (Prometheus' default scrape timeout is 10 s)
STATUS_SECONDS = 5.0
#: the resources the node agent reconciles (label values of reconcile_errors_total)
RECONCILE_RESOURCES = ("thinvolume", "thinsnapshot", "thingroupsnapshot", "thinpool")
#: kubelet plugin registration: not yet notified, registered, refused
REGISTRATION_STATES = ("pending", "registered", "failed")
#: pool operations the node agent runs for CRs (label values of pool_operation_duration_seconds)
POOL_OPERATIONS = (
    "create_volume",
    "clone",
    "create_snapshot",
    "grow",
    "delete",
    "create_group_snapshot",
    "delete_group_snapshot",
)
#: what the controller waits on the node for, and how a wait ends (cr_wait_seconds): ok (the node
#: did it), failed (the node reported an error), lost (the device is gone), deleted (the object went
#: meanwhile), timeout (the RPC's deadline passed first), error (the API server failed the wait)
CR_WAIT_OPERATIONS = ("create_volume", "create_snapshot", "create_group_snapshot", "delete", "expand")
CR_WAIT_OUTCOMES = ("ok", "failed", "lost", "deleted", "timeout", "error")
#: a wait is a watch event away (tens of ms) up to a big format or copy on the node
CR_WAIT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Pool(Protocol):
    """What the scrape reads from the pool engine (csi_thin.pool.engine.PoolEngine has it all)."""

    @property
    def thresholds(self) -> model.Thresholds: ...

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus: ...

    def totals(self) -> model.Totals:
        """Counts and bytes of the records by kind and state (running totals: no scan per scrape)."""
        ...

    def intents(self) -> Sequence[object]: ...

    def orphans(self) -> Sequence[object]:
        """Pool devices no owner claims: ids no record owns (standalone); in Kubernetes mode also the
        records no CR owns (the node agent's view)."""
        ...


def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


def _check(what: str, label: str, value: str, allowed: tuple[str, ...]) -> None:
    """Label values come from fixed sets: anything else is a bug in the caller, not a new series."""
    if value not in allowed:
        raise errors.InvalidArgument(f"{what}: {label} {value!r} not in {allowed}")


class PoolCollector:
    """Pool gauges, computed at scrape time from whatever pool is attached (none: no samples)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: tuple[str, Pool] | None = None

    def attach(self, name: str, pool: Pool | None) -> None:
        with self._lock:
            self._pool = None if pool is None else (name, pool)

    def collect(self) -> Iterable[prom_core.Metric]:
        with self._lock:
            attached = self._pool
        if attached is None:
            return []
        name, pool = attached
        labels = ["pool"]
        ok = prom_core.GaugeMetricFamily(
            _name("pool_status_ok"),
            "1 when the last read of the pool's status succeeded (0: the pool gauges are missing)",
            labels=labels,
        )
        try:
            st = pool.status(deadline=deadline_mod.Deadline.after(STATUS_SECONDS))
        except errors.CsiThinError as exc:
            log.warning("msg=%s pool=%s code=%s error=%s", "metrics: pool status failed", name, exc.code, exc)
            ok.add_metric([name], 0)
            return [ok]
        ok.add_metric([name], 1)
        return [ok, *self._status(name, st, pool.thresholds), *self._records(name, pool)]

    @staticmethod
    def _status(name: str, st: model.PoolStatus, thresholds: model.Thresholds) -> list[prom_core.Metric]:
        def gauge(suffix: str, doc: str, value: float) -> prom_core.Metric:
            g = prom_core.GaugeMetricFamily(_name(suffix), doc, labels=["pool"])
            g.add_metric([name], value)
            return g

        threshold = prom_core.GaugeMetricFamily(
            _name("pool_threshold_ratio"),
            "used ratio above which new volumes and snapshots are refused, per resource",
            labels=["pool", "resource"],
        )
        threshold.add_metric([name, "data"], thresholds.data)
        threshold.add_metric([name, "metadata"], thresholds.metadata)
        mode = prom_core.StateSetMetricFamily(
            _name("pool_mode"),
            "the pool's mode (dm-thin status): rw is the only one that creates",
            labels=["pool"],
        )
        mode.add_metric([name], {m.value: m == st.mode for m in model.PoolMode})
        return [
            gauge("pool_data_used_bytes", "data space in use", st.data_used_bytes),
            gauge("pool_data_capacity_bytes", "data space of the pool", st.data_total_bytes),
            gauge("pool_metadata_used_bytes", "metadata space in use", st.metadata_used_bytes),
            gauge("pool_metadata_capacity_bytes", "metadata space of the pool", st.metadata_total_bytes),
            gauge(
                "pool_needs_check",
                "1 when the pool's metadata is flagged for thin_check",
                int(st.needs_check),
            ),
            gauge("pool_transaction_id", "the pool's committed transaction id", st.transaction_id),
            threshold,
            mode,
        ]

    @staticmethod
    def _records(name: str, pool: Pool) -> list[prom_core.Metric]:
        devices = prom_core.GaugeMetricFamily(
            _name("pool_devices"), "device records by kind and state", labels=["pool", "kind", "state"]
        )
        totals = pool.totals()
        for kind in model.DeviceKind:
            for state in model.DeviceState:
                devices.add_metric([name, kind.value, state.value], totals.of(kind=kind, state=state).count)
        provisioned = totals.provisioned_bytes
        lost = totals.of(state=model.DeviceState.LOST).count

        def gauge(suffix: str, doc: str, value: float) -> prom_core.Metric:
            g = prom_core.GaugeMetricFamily(_name(suffix), doc, labels=["pool"])
            g.add_metric([name], value)
            return g

        return [
            devices,
            gauge(
                "pool_provisioned_bytes", "sum of the sizes of the ready volumes and snapshots", provisioned
            ),
            gauge(
                "pool_open_intents", "journalled transactions not yet finished or undone", len(pool.intents())
            ),
            gauge(
                "pool_orphan_devices",
                "pool devices no record (Kubernetes mode: no CR) owns (csi-thin pool gc --orphans)",
                len(pool.orphans()),
            ),
            gauge("pool_lost_devices", "records whose pool device is gone (never re-created empty)", lost),
        ]


class TrimCollector:
    """The trim totals (model.TrimStats, kept in the pool's state dir by csi_thin.node.trim), read at
    scrape time: they count every run, scheduled or `csi-thin pool trim`, across restarts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._source: tuple[str, Callable[[], model.TrimStats]] | None = None

    def attach(self, name: str, read: Callable[[], model.TrimStats] | None) -> None:
        with self._lock:
            self._source = None if read is None else (name, read)

    def collect(self) -> Iterable[prom_core.Metric]:
        with self._lock:
            source = self._source
        if source is None:
            return []
        name, read = source
        try:
            stats = read()
        except errors.CsiThinError as exc:
            log.warning("msg=%s pool=%s error=%s", "metrics: trim totals unreadable", name, exc)
            return []

        def counter(suffix: str, doc: str, value: float) -> prom_core.Metric:
            c = prom_core.CounterMetricFamily(_name(suffix), doc, labels=["pool"])
            c.add_metric([name], value)
            return c

        runs = prom_core.CounterMetricFamily(
            _name("pool_trim_runs"), "trims of the staged filesystems, by result", labels=["pool", "result"]
        )
        runs.add_metric([name, "ok"], stats.runs - stats.failed_runs)
        runs.add_metric([name, "failed"], stats.failed_runs)
        last = prom_core.GaugeMetricFamily(
            _name("pool_trim_last_run_timestamp_seconds"),
            "when the last trim finished (0: never)",
            labels=["pool"],
        )
        last.add_metric([name], stats.last_finished_at or 0.0)
        return [
            runs,
            counter(
                "pool_reclaimed_bytes",
                "how far the pool's used data space fell across the trims: the space given back",
                stats.reclaimed_bytes,
            ),
            counter(
                "pool_trimmed_bytes",
                "what the filesystems discarded (a first trim counts all their free space)",
                stats.trimmed_bytes,
            ),
            last,
        ]


class Metrics:
    """The metrics of one process, in their own registry (tests and several servers never collide)."""

    def __init__(self) -> None:
        self.registry = prom_registry.CollectorRegistry()
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        self.pool = PoolCollector()
        self.registry.register(self.pool)
        self.trim = TrimCollector()
        self.registry.register(self.trim)
        self._operations = prometheus_client.Histogram(
            _name("operation_duration_seconds"),
            "gRPC calls served, by operation (method name) and status code",
            labelnames=["operation", "grpc_code"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self._reconcile_errors = prometheus_client.Counter(
            _name("reconcile_errors"),
            "node agent reconciliations that failed, by resource",
            labelnames=["resource"],
            registry=self.registry,
        )
        for resource in RECONCILE_RESOURCES:
            self._reconcile_errors.labels(resource=resource)
        self._pool_operations = prometheus_client.Histogram(
            _name("pool_operation_duration_seconds"),
            "pool operations the node agent ran for CRs (Kubernetes mode), by operation and status code",
            labelnames=["operation", "grpc_code"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self._cr_wait = prometheus_client.Histogram(
            _name("cr_wait_seconds"),
            "how long the controller waited for the node agent's status on a CR, by operation and outcome",
            labelnames=["operation", "outcome"],
            buckets=CR_WAIT_BUCKETS,
            registry=self.registry,
        )
        self._registration: prometheus_client.Enum | None = None  # only where registration runs
        self._registration_lock = threading.Lock()

    def observe_rpc(self, operation: str, code: str, seconds: float) -> None:
        self._operations.labels(operation=operation, grpc_code=code).observe(seconds)

    def reconcile_error(self, resource: str) -> None:
        _check("reconcile_error", "resource", resource, RECONCILE_RESOURCES)
        self._reconcile_errors.labels(resource=resource).inc()

    def pool_operation(self, operation: str, code: str, seconds: float) -> None:
        """A pool operation the node agent ran (code: the gRPC code name of its result, OK or not)."""
        _check("pool_operation", "operation", operation, POOL_OPERATIONS)
        self._pool_operations.labels(operation=operation, grpc_code=code).observe(seconds)

    def cr_wait(self, operation: str, outcome: str, seconds: float) -> None:
        """A wait of the controller for the node agent's verdict on a CR."""
        _check("cr_wait", "operation", operation, CR_WAIT_OPERATIONS)
        _check("cr_wait", "outcome", outcome, CR_WAIT_OUTCOMES)
        self._cr_wait.labels(operation=operation, outcome=outcome).observe(seconds)

    def registration(self, state: str) -> None:
        """The kubelet registration state (the metric appears with the first call)."""
        with self._registration_lock:
            if self._registration is None:
                self._registration = prometheus_client.Enum(
                    _name("kubelet_registration"),
                    "kubelet plugin registration of this node plugin",
                    states=list(REGISTRATION_STATES),
                    registry=self.registry,
                )
        self._registration.state(state)

    def attach_pool(self, name: str, pool: Pool | None) -> None:
        """Scrapes read this pool from now on (None: stop reading, e.g. the engine is closing)."""
        self.pool.attach(name, pool)

    def attach_trim(self, name: str, read: Callable[[], model.TrimStats] | None) -> None:
        """Scrapes read this pool's trim totals from now on (None: stop)."""
        self.trim.attach(name, read)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated from the Accept header."""
        encoder, content_type = exposition.choose_encoder(accept)
        return encoder(self.registry), content_type
