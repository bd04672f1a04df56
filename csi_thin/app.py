"""Composition root: a PoolConfig in, a backend + LMDB store + pool engine out.

The CLI (and anything else that owns a pool) builds its engine here. Backends are imported lazily,
so a host without one backend's dependencies can still run the other.

Only one process may mutate a pool: `open_engine(..., exclusive=True)` holds an flock on
`<state_dir>/engine.lock` for as long as the engine is open, so `csi-thin pool gc` cannot race a
running driver (the engine's own locks are per process).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from csi_thin import config, errors
from csi_thin import deadline as deadline_mod
from csi_thin.node import trim
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import engine as engine_mod
from csi_thin.store import lmdb_store

LOCK_FILE = "engine.lock"
_LMDB_FILES = ("data.mdb", "lock.mdb")


@runtime_checkable
class _BlankProbe(Protocol):
    """A backend whose assembly formats a blank metadata device (dm-thin)."""

    def metadata_is_blank(self) -> bool: ...


def _refuse_formatting_over_a_store(pool: backend_mod.Backend, store: lmdb_store.LmdbStore) -> None:
    """The kernel formats a blank metadata device into a new, empty pool. With a store that has
    committed pool transactions, blank metadata means it was lost or wiped: formatting it would
    overwrite what thin_repair could still rebuild, and every volume's mappings with it."""
    txid = store.transaction_id()
    if txid > 0 and isinstance(pool, _BlankProbe) and pool.metadata_is_blank():
        raise errors.FailedPrecondition(
            f"the LMDB store in {store.path} has committed {txid} pool transactions, but the pool's "
            "metadata device is blank (missing or zeroed): assembling would format it into an empty "
            "pool. Restore or repair the metadata (thin_repair) first; to start over on purpose, run "
            "'csi-thin pool destroy'."
        )


def make_backend(cfg: config.PoolConfig) -> backend_mod.Backend:
    if cfg.backend == config.BackendKind.DMTHIN:
        from csi_thin.pool import dmthin  # noqa: PLC0415 - lazy: only the configured backend loads

        return dmthin.DmThinBackend(cfg)
    from csi_thin.pool import reflink  # noqa: PLC0415

    return reflink.ReflinkBackend(cfg)


def open_store(cfg: config.PoolConfig) -> lmdb_store.LmdbStore:
    return lmdb_store.LmdbStore(cfg.state_dir)


@contextlib.contextmanager
def exclusive(cfg: config.PoolConfig) -> Iterator[None]:
    """Hold the pool's owner lock; Unavailable if another process holds it."""
    os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(cfg.state_dir, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise errors.Unavailable(
                f"pool {cfg.name!r} is in use by another csi-thin process (lock {cfg.state_dir}/{LOCK_FILE})"
            ) from exc
        # destroy unlinks the file (holding the lock): locked after that, this fd holds a lock
        # nobody else sees, and the next process would lock a new file. Start again on that one.
        held = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_engine(
    cfg: config.PoolConfig,
    *,
    assemble: bool = True,
    recover: bool = True,
    owner: bool = True,
    deadline: deadline_mod.Deadline | None = None,
    backend: backend_mod.Backend | None = None,
) -> Iterator[engine_mod.PoolEngine]:
    """Assemble the pool, open LMDB, recover, and yield the engine; the store closes after.

    `owner=False` (read-only commands: status, list) skips the owner lock and must not mutate.
    """
    dl = deadline or deadline_mod.default()
    with contextlib.ExitStack() as stack:
        if owner:
            stack.enter_context(exclusive(cfg))
        pool = backend if backend is not None else make_backend(cfg)
        store = stack.enter_context(open_store(cfg))
        if assemble:
            _refuse_formatting_over_a_store(pool, store)
            pool.assemble(deadline=dl)
        eng = engine_mod.PoolEngine(
            backend=pool, store=store, thresholds=cfg.thresholds, block_size=cfg.block_size
        )
        if recover:
            eng.recover(deadline=dl)
        yield eng


def destroy(cfg: config.PoolConfig, *, deadline: deadline_mod.Deadline) -> None:
    """Tear down and remove the pool and its LMDB store. Irreversible."""
    with exclusive(cfg):
        make_backend(cfg).destroy(deadline=deadline)
        # the store, and the trim totals and lock (csi_thin.node.trim): they describe this pool only
        for name in (*_LMDB_FILES, trim.STATS_FILE, trim.LOCK_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cfg.state_dir, name))
        # unlinked while held: a process that opened it meanwhile sees the lock taken, or (locking
        # after we let go) sees that the path no longer names its file and starts again
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cfg.state_dir, LOCK_FILE))
    with contextlib.suppress(OSError):
        os.rmdir(cfg.state_dir)  # only if nothing else lives there
