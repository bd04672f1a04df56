"""`csi-thin pool ...` end to end over FakeBackend (the backend factory is swapped in app)."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib

import pytest

from csi_thin import app, cli, config, errors
from csi_thin import deadline as deadline_mod
from csi_thin.pool import backend as backend_mod
from tests import fakes


@pytest.fixture
def cfg_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    state = tmp_path / "state"
    path = tmp_path / "pool.yaml"
    path.write_text(
        "name: dev\nbackend: dmthin\n"
        f"state_dir: {state}\n"
        f"dmthin:\n  data_file: {tmp_path}/data.img\n  data_size: 1GiB\n"
        "thresholds:\n  data: 0.9\n  metadata: 0.75\n"
    )

    def fake_backend(cfg: config.PoolConfig) -> backend_mod.Backend:
        return fakes.FakeBackend(str(tmp_path / "fake-pool.json"))

    monkeypatch.setattr(app, "make_backend", fake_backend)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pool_lifecycle(cfg_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pool", "create", "--config", cfg_file)
    assert code == 0 and "healthy" in out and "transaction id  pool 0, store 0" in out
    code, out, _ = run(capsys, "pool", "create", "--config", cfg_file, "--json")
    doc = json.loads(out)
    assert doc["status"]["pool"] == "dev" and doc["recovery"]["orphans"] == []

    cfg = config.load_pool(cfg_file)
    with app.open_engine(cfg) as eng:
        eng.create_volume("vol-1", 10 << 20, deadline=deadline_mod.default())
        eng.create_snapshot("snap-1", "vol-1", deadline=deadline_mod.default())
        eng.activate("vol-1", deadline=deadline_mod.default())
        eng.backend.create_thin(999, 1 << 20, deadline=deadline_mod.default())  # an orphan

    code, out, _ = run(capsys, "pool", "list", "--config", cfg_file)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "STATE", "SIZE", "ID", "ORIGIN", "ACTIVE", "PATH"]
    assert lines[1].split()[:4] == ["snap-1", "snapshot", "ready", "10.0MiB"]
    assert lines[2].split()[0] == "vol-1" and "yes" in lines[2]
    code, out, _ = run(capsys, "pool", "list", "--config", cfg_file, "--kind", "volume", "--json")
    assert [d["name"] for d in json.loads(out)] == ["vol-1"]

    code, out, _ = run(capsys, "pool", "status", "--config", cfg_file, "--json")
    st = json.loads(out)
    assert code == 0 and st["volumes"] == 1 and st["snapshots"] == 1 and st["active"] == 1
    assert st["pool_transaction_id"] == st["store_transaction_id"] == 2
    assert st["orphans"] == []  # status does not recover: the orphan is found by create/gc

    code, out, err = run(capsys, "pool", "gc", "--config", cfg_file)
    assert code == 2 and "--orphans" in err
    code, out, _ = run(capsys, "pool", "gc", "--config", cfg_file, "--orphans", "--json")
    assert json.loads(out) == {"deleted": [999], "left": []}

    code, out, err = run(capsys, "pool", "destroy", "--config", cfg_file)
    assert code == 2 and "--yes" in err
    code, out, _ = run(capsys, "pool", "destroy", "--config", cfg_file, "--yes")
    assert code == 0 and "destroyed" in out
    assert not os.path.exists(os.path.join(cfg.state_dir, "data.mdb"))


def test_owner_lock_refuses_a_second_mutator(cfg_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config.load_pool(cfg_file)
    assert run(capsys, "pool", "create", "--config", cfg_file)[0] == 0
    with app.exclusive(cfg):  # what a running driver holds (its LMDB env is in another process)
        code, _, err = run(capsys, "pool", "gc", "--config", cfg_file, "--orphans")
        assert code == 1 and "UNAVAILABLE" in err and "in use" in err
        code, out, _ = run(capsys, "pool", "status", "--config", cfg_file)  # read-only works
        assert code == 0 and "healthy" in out


def test_bad_config_is_a_clear_error(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad_Name\nstate_dir: /x\n")
    code, _, err = run(capsys, "pool", "status", "--config", str(bad))
    assert code == 2 and "INVALID_ARGUMENT" in err and "pool name" in err


def test_help_lists_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "pool" in out and "standalone" in out


def test_owner_lock_is_not_lost_to_a_destroy_unlinking_the_lock_file(
    cfg_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """destroy unlinks engine.lock. A process that opened the old file and locks it after the unlink
    holds a lock nobody else can see: the next process creates a new file, locks that, and two
    processes mutate one pool. The owner lock must be on the file the path names."""
    cfg = config.load_pool(cfg_file)
    lock_path = os.path.join(cfg.state_dir, app.LOCK_FILE)
    real_flock = fcntl.flock
    raced: list[int] = []

    def flock(fd: int, op: int) -> None:
        if not raced:  # a destroy finished between this process's open and its flock
            raced.append(fd)
            os.unlink(lock_path)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with app.exclusive(cfg):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert raced
        with pytest.raises(errors.Unavailable, match="in use"), app.exclusive(cfg):
            pass  # a second mutator: must be refused


def test_destroy_unlinks_the_lock_file_while_holding_it(
    cfg_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlinked after the lock was released, a process locking in between owns the doomed file while
    the next one creates and locks a new one."""
    cfg = config.load_pool(cfg_file)
    lock_path = os.path.join(cfg.state_dir, app.LOCK_FILE)
    held_at_unlink: list[bool] = []
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        if path == lock_path:
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_at_unlink.append(True)
            else:
                held_at_unlink.append(False)
            finally:
                os.close(fd)
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink)
    app.destroy(cfg, deadline=deadline_mod.default())
    assert held_at_unlink == [True]


class _BlankMetadataBackend(fakes.FakeBackend):
    """A backend whose metadata device is blank: assembling it would format a new, empty pool."""

    assembled = False

    def metadata_is_blank(self) -> bool:
        return True

    def assemble(self, *, deadline: deadline_mod.Deadline) -> None:
        self.assembled = True
        super().assemble(deadline=deadline)


def test_blank_metadata_is_not_assembled_over_a_store_with_transactions(
    cfg_file: str, tmp_path: pathlib.Path
) -> None:
    cfg = config.load_pool(cfg_file)
    blank = _BlankMetadataBackend(str(tmp_path / "blank-pool.json"))
    with app.open_engine(cfg, backend=blank):  # a pristine store: a new pool is what is wanted
        pass
    assert blank.assembled
    with app.open_engine(cfg) as eng:
        eng.create_volume("v", 1 << 20, deadline=deadline_mod.default())
    blank = _BlankMetadataBackend(str(tmp_path / "blank-pool-2.json"))
    with pytest.raises(errors.FailedPrecondition, match="blank"), app.open_engine(cfg, backend=blank):
        pass
    assert not blank.assembled


def test_gc_refuses_a_lost_stores_volumes_without_force(
    cfg_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """LMDB lost and rebuilt over the pool: every old volume is an orphan. The recovery log says they
    are the lost store's volumes, and `gc --orphans` refuses them unless --force."""
    cfg = config.load_pool(cfg_file)
    with app.open_engine(cfg) as eng:
        ids = {eng.create_volume(f"v{i}", 1 << 20, deadline=deadline_mod.default()).dev_id for i in range(2)}
    for name in app._LMDB_FILES:  # the store is lost; the pool is not
        os.unlink(os.path.join(cfg.state_dir, name))

    code, _, err = run(capsys, "pool", "gc", "--config", cfg_file, "--orphans")
    assert code == 1 and "not garbage" in err and "--force" in err
    with app.open_engine(cfg) as eng:
        assert set(eng.backend.device_ids(deadline=deadline_mod.default())) == ids  # nothing deleted
    code, out, _ = run(capsys, "pool", "gc", "--config", cfg_file, "--orphans", "--force", "--json")
    assert code == 0 and sorted(json.loads(out)["deleted"]) == sorted(ids)


@pytest.mark.parametrize(
    ("condition", "says"),
    [({"mode": "out_of_data_space"}, "deletes still run"), ({"mode": "ro"}, "thin_repair")],
)
def test_pool_status_says_what_a_full_or_degraded_pool_still_does(
    cfg_file: str, capsys: pytest.CaptureFixture[str], condition: dict[str, object], says: str
) -> None:
    assert run(capsys, "pool", "create", "--config", cfg_file)[0] == 0
    cfg = config.load_pool(cfg_file)
    with app.open_engine(cfg, recover=False) as eng:
        assert isinstance(eng.backend, fakes.FakeBackend)
        eng.backend.set_condition(**condition)
    code, out, _ = run(capsys, "pool", "status", "--config", cfg_file)
    assert code == 1 and "UNHEALTHY" in out and says in out
    code, out, _ = run(capsys, "pool", "status", "--config", cfg_file, "--json")
    doc = json.loads(out)
    assert doc["condition"] in ("out_of_data_space", "read_only") and says in doc["hint"]


def test_pool_trim_and_status_over_a_pool_with_nothing_staged(
    cfg_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pool trim` runs next to nothing staged (zero filesystems, a run all the same), `pool status`
    shows it, and `pool destroy` leaves no trim file behind (the state dir goes with the pool)."""
    assert run(capsys, "pool", "create", "--config", cfg_file)[0] == 0
    code, out, err = run(capsys, "pool", "trim", "--json", "--config", cfg_file)
    assert code == 0, err
    result = json.loads(out)
    assert (result["filesystems"], result["failures"]) == (0, [])
    code, out, _ = run(capsys, "pool", "status", "--config", cfg_file)
    trim_line = next(line for line in out.splitlines() if line.startswith("trim"))
    assert "every 24h (+ up to 60m), next not planned" in trim_line
    assert "0 filesystem(s), 0B reclaimed; 0B reclaimed in 1 run(s), 0 failed" in trim_line
    cfg = config.load_pool(cfg_file)
    assert run(capsys, "pool", "destroy", "--yes", "--config", cfg_file)[0] == 0
    assert not os.path.exists(cfg.state_dir)
