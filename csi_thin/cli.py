"""`csi-thin`: the command line. One subcommand group per concern; each group registers itself with
`register(subparsers)` and sets `func(args) -> exit code`, so `standalone` (csi_thin.csi.standalone)
and later groups plug in the same way.

    csi-thin pool create  --config FILE     assemble the pool (creating loop files if needed) + recover
    csi-thin pool status  --config FILE     health, transaction ids, space, devices, journal, orphans
    csi-thin pool list    --config FILE     device records
    csi-thin pool gc      --config FILE --orphans   delete pool devices no record owns
    csi-thin pool gc      --config FILE --orphans --node-id N [--grace 1h]
                                            Kubernetes mode: the running node agent deletes devices
                                            no CR owns, once orphans for the grace period
    csi-thin pool trim    --config FILE     trim the staged filesystems now (space back to the pool)
    csi-thin pool destroy --config FILE --yes       tear down and delete the pool and its store
    csi-thin snapshotter --pool-config FILE --socket S   containerd's Snapshots API (csi_thin.csi.snapshots)

Every command takes --json for machine-readable output. Domain errors print one line to stderr and
exit 1 (2 for bad input).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from csi_thin import app, config, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.node import control, trim
from csi_thin.pool import engine as engine_mod
from csi_thin.pool import health, modes, recovery

Printer = Callable[[str], None]


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _device_json(d: model.Device) -> dict[str, Any]:
    fields = dataclasses.asdict(d)
    fields["kind"] = d.kind.value
    fields["state"] = d.state.value
    return fields


def _report_json(r: recovery.RecoveryReport | None) -> dict[str, Any] | None:
    return (
        None
        if r is None
        else {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(r).items()}
    )


def _status_json(cfg: config.PoolConfig, eng: engine_mod.PoolEngine, st: model.PoolStatus) -> dict[str, Any]:
    # running totals and the index of LOST records: the same cost whatever the pool holds
    totals = eng.totals()
    lost = sorted(eng.lost())
    # the same issues NodeGetStorageHealth reports (CSI 1.13), reason and message
    issues = health.pool(st, cfg.thresholds, lost=lost)
    return {
        "pool": cfg.name,
        "backend": eng.backend.kind,
        "healthy": st.healthy,
        "condition": modes.condition(st).value,
        "hint": modes.hint(modes.condition(st)),
        "mode": st.mode.value,
        "needs_check": st.needs_check,
        "pool_transaction_id": st.transaction_id,
        "store_transaction_id": eng.store.transaction_id(),
        "block_size_bytes": st.block_size_bytes,
        "data_used_bytes": st.data_used_bytes,
        "data_total_bytes": st.data_total_bytes,
        "data_used_ratio": round(st.data_used_ratio, 6),
        "metadata_used_bytes": st.metadata_used_bytes,
        "metadata_total_bytes": st.metadata_total_bytes,
        "metadata_used_ratio": round(st.metadata_used_ratio, 6),
        "thresholds": dataclasses.asdict(cfg.thresholds),
        "volumes": totals.of(kind=model.DeviceKind.VOLUME).count,
        "snapshots": totals.of(kind=model.DeviceKind.SNAPSHOT).count,
        "layers": totals.of(kind=model.DeviceKind.LAYER).count,
        "active": totals.of().active,
        "lost": lost,
        "issues": [{"severity": i.severity.value, "reason": i.reason, "message": i.message} for i in issues],
        "provisioned_bytes": totals.provisioned_bytes,
        "open_intents": [f"{i.op} {i.name}" for i in eng.intents()],
        "orphans": eng.orphans(),
        "trim": _trim_json(cfg),
    }


def _trim_json(cfg: config.PoolConfig) -> dict[str, Any]:
    """The trim schedule and what the trims gave back so far (csi_thin.node.trim's totals)."""
    out: dict[str, Any] = dataclasses.asdict(cfg.trim)
    try:
        out.update(dataclasses.asdict(trim.read_stats(cfg.state_dir)))
    except errors.CsiThinError as exc:  # status still answers: the pool matters more than the totals
        out["error"] = exc.message
    return out


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _trim_line(t: dict[str, Any]) -> str:
    if "error" in t:
        return f"totals unreadable: {t['error']}"
    plan = (
        f"every {t['interval_seconds'] / 3600:g}h (+ up to {t['jitter_seconds'] / 60:g}m), "
        f"next {_when(t['next_at']) if t['next_at'] else 'not planned (no driver runs)'}"
        if t["enabled"]
        else "schedule off"
    )
    if not t["runs"]:
        return f"{plan}; no run yet"
    last = (
        f"last {_when(t['last_finished_at'])}: {t['last_filesystems']} filesystem(s), "
        f"{_human(t['last_reclaimed_bytes'])} reclaimed"
        + (f", FAILED: {t['last_error']}" if t["last_error"] else "")
    )
    total = f"{_human(t['reclaimed_bytes'])} reclaimed in {t['runs']} run(s), {t['failed_runs']} failed"
    return f"{plan}; {last}; {total}"


def _print_status(s: dict[str, Any], out: Printer) -> None:
    rows: list[tuple[str, object]] = [
        ("pool", f"{s['pool']} ({s['backend']})"),
        (
            "health",
            ("healthy" if s["healthy"] else "UNHEALTHY")
            + f" mode={s['mode']} needs_check={s['needs_check']}",
        ),
        *([("condition", f"{s['condition']}: {s['hint']}")] if s["hint"] else []),
        ("issues", ", ".join(f"{i['reason']} ({i['severity']})" for i in s["issues"]) or "none"),
        ("transaction id", f"pool {s['pool_transaction_id']}, store {s['store_transaction_id']}"),
        (
            "data",
            f"{_human(s['data_used_bytes'])} / {_human(s['data_total_bytes'])} ({s['data_used_ratio']:.1%}, "
            f"refuse above {s['thresholds']['data']:.0%})",
        ),
        (
            "metadata",
            f"{_human(s['metadata_used_bytes'])} / {_human(s['metadata_total_bytes'])} "
            f"({s['metadata_used_ratio']:.1%}, refuse above {s['thresholds']['metadata']:.0%})",
        ),
        (
            "devices",
            f"{s['volumes']} volumes, {s['snapshots']} snapshots, "
            + (f"{s['layers']} containerd layers, " if s["layers"] else "")
            + f"{s['active']} active",
        ),
        ("provisioned", _human(s["provisioned_bytes"])),
        ("lost", ", ".join(s["lost"]) or "none"),
        ("open intents", ", ".join(s["open_intents"]) or "none"),
        ("orphans", ", ".join(map(str, s["orphans"])) or "none"),
        ("trim", _trim_line(s["trim"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out(f"{key.ljust(width)}  {value}")


def _print_report(r: recovery.RecoveryReport, out: Printer) -> None:
    out(
        f"recovery: forward={list(r.rolled_forward)} back={list(r.rolled_back)} lost={list(r.lost)} "
        f"orphans={list(r.orphans)} active-fixed={list(r.active_fixed)}"
        + (" (store adopted the pool's transaction id)" if r.adopted_txid else "")
    )


# ---- pool commands -------------------------------------------------------------------------------


def _deadline(args: argparse.Namespace) -> deadline_mod.Deadline:
    return deadline_mod.Deadline.after(float(args.timeout))


def cmd_pool_create(args: argparse.Namespace, out: Printer = _out) -> int:
    cfg = config.load_pool(args.config)
    dl = _deadline(args)
    with app.open_engine(cfg, deadline=dl) as eng:
        st = eng.status(deadline=dl)
        status = _status_json(cfg, eng, st)
        if args.json:
            out(json.dumps({"status": status, "recovery": _report_json(eng.last_recovery)}, indent=2))
        else:
            _print_status(status, out)
            if eng.last_recovery is not None:
                _print_report(eng.last_recovery, out)
    return 0


def cmd_pool_status(args: argparse.Namespace, out: Printer = _out) -> int:
    cfg = config.load_pool(args.config)
    dl = _deadline(args)
    # read-only: no assembly, no recovery, no owner lock (works next to a running driver)
    with app.open_engine(cfg, assemble=False, recover=False, owner=False, deadline=dl) as eng:
        status = _status_json(cfg, eng, eng.status(deadline=dl))
    if args.json:
        out(json.dumps(status, indent=2))
    else:
        _print_status(status, out)
    return 0 if status["healthy"] else 1


def cmd_pool_list(args: argparse.Namespace, out: Printer = _out) -> int:
    cfg = config.load_pool(args.config)
    kind = model.DeviceKind(args.kind) if args.kind else None
    with app.open_store(cfg) as store:
        devs = sorted((d for d in store.devices() if kind is None or d.kind == kind), key=lambda d: d.name)
        # containerd's name for each layer device (csi_thin.pool.layers); a forgotten one has none
        snapshot = {x.device: x.key for x in store.layers() if x.pending == model.LayerPending.NONE}
    if args.json:
        out(
            json.dumps(
                [
                    {
                        **_device_json(d),
                        **({"snapshot": snapshot.get(d.name)} if d.kind == model.DeviceKind.LAYER else {}),
                    }
                    for d in devs
                ],
                indent=2,
            )
        )
        return 0
    layers = any(d.kind == model.DeviceKind.LAYER for d in devs)
    rows = [
        (
            d.name,
            d.kind.value,
            d.state.value,
            _human(d.size_bytes),
            d.dev_id,
            d.origin,
            "yes" if d.active else "no",
            d.path,
            *([snapshot.get(d.name)] if layers else []),
        )
        for d in devs
    ]
    headers = (
        "NAME",
        "KIND",
        "STATE",
        "SIZE",
        "ID",
        "ORIGIN",
        "ACTIVE",
        "PATH",
        *(["SNAPSHOT"] if layers else []),
    )
    out(table(headers, rows))
    return 0


def cmd_pool_gc(args: argparse.Namespace, out: Printer = _out) -> int:
    if not args.orphans:
        raise errors.InvalidArgument("say what to collect: --orphans")
    if args.node_id:
        return _gc_kubernetes(args, out)
    if args.grace is not None:
        raise errors.InvalidArgument("--grace is for Kubernetes mode (with --node-id)")
    cfg = config.load_pool(args.config)
    dl = _deadline(args)
    with app.open_engine(cfg, deadline=dl) as eng:  # recovery first: it finds (and reserves) orphans
        deleted = eng.gc_orphans(deadline=dl, force=args.force)
        left = eng.orphans()
    if args.json:
        out(json.dumps({"deleted": deleted, "left": left}))
    else:
        out(
            f"deleted {len(deleted)} orphan(s): {deleted}"
            + (f"; still there (active): {left}" if left else "")
        )
    return 0


def _gc_kubernetes(args: argparse.Namespace, out: Printer) -> int:
    """Kubernetes mode: the node agent that owns the pool deletes what no CR owns (csi_thin.node.control).
    Exit 0 when nothing failed (orphans still in their grace period are not a failure), else 1."""
    if args.force:
        raise errors.InvalidArgument(
            "--force is for standalone mode: in Kubernetes mode the CRs say what is legitimate"
        )
    grace = control.DEFAULT_GRACE_SECONDS if args.grace is None else config.parse_duration(args.grace)
    cfg = config.load_pool(args.config)
    got = control.request_gc(
        cfg.state_dir, node=args.node_id, grace_seconds=grace, timeout=float(args.timeout)
    )
    if args.json:
        out(json.dumps(got))
    else:
        out(f"deleted {len(got['deleted'])} orphan(s): {', '.join(got['deleted']) or 'none'}")
        for w in got["waiting"]:
            out(
                f"waiting: {w['name']} (an orphan for {w['orphan_seconds']:.0f}s of the {grace:.0f}s grace "
                f"period; eligible in {w['eligible_in_seconds']:.0f}s)"
            )
        for k in got["kept"]:
            out(f"kept: {k['name']}: {k['reason']}")
        for f in got["failed"]:
            out(f"failed: {f['name']}: {f['reason']}")
    return 1 if got["failed"] else 0


def cmd_pool_trim(args: argparse.Namespace, out: Printer = _out) -> int:
    """Trim the staged filesystems now, next to a running driver (no owner lock: a trim changes no
    record; the trim lock keeps it from running beside a scheduled one). Exit 1 when a filesystem
    could not be trimmed."""
    cfg = config.load_pool(args.config)
    dl = _deadline(args)
    with app.open_engine(cfg, assemble=False, recover=False, owner=False, deadline=dl) as eng:
        result = trim.Trimmer(engine=eng, pool=cfg.name, state_dir=cfg.state_dir).run(deadline=dl)
    if args.json:
        out(json.dumps(dataclasses.asdict(result)))
    else:
        out(
            f"trimmed {result.filesystems} filesystem(s): {_human(result.reclaimed_bytes)} given back to "
            f"the pool ({_human(result.trimmed_bytes)} discarded)"
        )
        for failure in result.failures:
            out(f"failed: {failure}")
    return 0 if result.ok else 1


def cmd_pool_destroy(args: argparse.Namespace, out: Printer = _out) -> int:
    if not args.yes:
        raise errors.InvalidArgument("destroying a pool deletes every volume and snapshot in it: pass --yes")
    cfg = config.load_pool(args.config)
    app.destroy(cfg, deadline=_deadline(args))
    out(json.dumps({"destroyed": cfg.name}) if args.json else f"pool {cfg.name} destroyed")
    return 0


def register(subparsers: Any) -> None:
    """Add the `pool` subcommand group."""
    pool: argparse.ArgumentParser = subparsers.add_parser("pool", help="manage the node's pool")
    sub = pool.add_subparsers(dest="pool_command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="pool config file (YAML)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--timeout", type=float, default=deadline_mod.DEFAULT_SECONDS, help="seconds")
        p.set_defaults(func=func)
        return p

    add("create", cmd_pool_create, "assemble the pool (creating loop files if needed) and recover")
    add("status", cmd_pool_status, "pool health, transaction ids, space, devices")
    add("list", cmd_pool_list, "device records").add_argument(
        "--kind", choices=[k.value for k in model.DeviceKind], help="only volumes, snapshots or layers"
    )
    gc = add("gc", cmd_pool_gc, "garbage-collect")
    gc.add_argument("--orphans", action="store_true", help="delete pool devices that no record owns")
    gc.add_argument(
        "--force",
        action="store_true",
        help="also when the store was rebuilt after a loss (the orphans are then its lost volumes)",
    )
    gc.add_argument(
        "--node-id",
        default="",
        help="Kubernetes mode: ask this node's running agent, which deletes only what no CR owns",
    )
    gc.add_argument(
        "--grace",
        default=None,
        help=f"Kubernetes mode: how long a device must have been an orphan (90s, 30m, 1h; "
        f"default {control.DEFAULT_GRACE_SECONDS / 3600:.0f}h)",
    )
    add("trim", cmd_pool_trim, "trim the staged filesystems now: deleted files' space back to the pool")
    add("destroy", cmd_pool_destroy, "tear down and delete the pool and its store").add_argument(
        "--yes", action="store_true", help="confirm: every volume and snapshot is lost"
    )


def _register_standalone(subparsers: Any) -> None:
    from csi_thin.csi import standalone  # noqa: PLC0415 - grpc loads only for this group

    standalone.register(subparsers, open_engine=app.open_engine)


def _register_kube(subparsers: Any) -> None:
    from csi_thin.csi import kubemode  # noqa: PLC0415 - grpc and the kubernetes client load only here

    kubemode.register(subparsers, open_engine=app.open_engine)


def _register_snapshotter(subparsers: Any) -> None:
    from csi_thin.csi import snapshots  # noqa: PLC0415 - grpc loads only for this group

    snapshots.register(subparsers, open_engine=app.open_engine)


#: The subcommand groups, in help order. Each adds its parser and sets `func(args) -> int`.
GROUPS: list[Callable[[Any], None]] = [register, _register_standalone, _register_kube, _register_snapshotter]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-thin", description="CSI driver on a node-local thin pool")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
            stream=sys.stderr,
        )
    try:
        return int(args.func(args))
    except errors.CsiThinError as exc:
        sys.stderr.write(f"csi-thin: {exc.code}: {exc.message}\n")
        for note in getattr(exc, "__notes__", []):
            sys.stderr.write(f"  {note}\n")
        return 2 if isinstance(exc, errors.InvalidArgument) else 1


if __name__ == "__main__":
    sys.exit(main())
