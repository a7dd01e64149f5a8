"""Sweeps drained through a database: claims, takeovers and outcomes on SQLite and on a real PostgreSQL server
(started here as an unprivileged user), and two workers with separate folders that share only the database."""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from glob import glob
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftbench import config
from peftbench.claims import DatabaseBoard
from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.records import RECORD_NAME, make_record, read_record, write_atomic
from peftbench.sweep import Cell, run_sweep

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl") or next(iter(sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)), None)
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """The URL of a PostgreSQL server started for these tests (initdb refuses root: it runs as 'nobody' then)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is absent: pip install 'peftbench[postgres]'")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server here (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="peftbench-pg-"))
    as_user = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data, port = root / "data", _free_port()
    run = dict(capture_output=True, text=True, cwd=root, **as_user)
    done = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "peftbench", "--auth=trust",
                           "--encoding=UTF8", "--locale=C"], **run)
    assert done.returncode == 0, done.stderr
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} -c fsync=off"
    done = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                           "start"], **run)
    assert done.returncode == 0, done.stderr + (root / "log").read_text()
    yield f"postgresql+psycopg://peftbench@127.0.0.1:{port}/postgres"
    subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], **run)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'claims.db'}"
    return request.getfixturevalue("postgres")


def test_a_claim_is_exclusive_and_its_outcome_is_seen_by_every_worker(url, request):
    key = f"cell-{request.node.callspec.id}-{time.time_ns()}"  # one server serves several tests
    mine, theirs = DatabaseBoard(url, timeout_s=30), DatabaseBoard(url, timeout_s=30)
    claim = mine.claim(key)
    assert claim is not None and theirs.claim(key) is None and theirs.outcome(key) is None
    claim.release({"status": "failed", "score": None})
    assert theirs.outcome(key) == {"status": "failed", "score": None}
    assert theirs.claim(key) is None  # a failed cell stays failed unless a worker retries failed cells
    retry = theirs.claim(key, replace_failed=True)
    assert retry is not None and mine.claim(key, replace_failed=True) is None
    retry.release({"status": "success", "score": 0.75})
    assert mine.outcome(key) == {"status": "success", "score": 0.75}
    assert mine.claim(key, replace_failed=True) is None  # success is final
    cut_short = mine.claim(key + "-b")
    cut_short.release()  # no outcome: the cell is to do again
    assert theirs.outcome(key + "-b") is None and theirs.claim(key + "-b") is not None


def test_a_silent_holder_loses_its_claim_after_the_timeout_and_a_dead_one_at_once(url, request):
    key = f"silent-{request.node.callspec.id}-{time.time_ns()}"
    board = DatabaseBoard(url, timeout_s=2)
    held = board.claim(key)
    t = board.table
    with board.engine.begin() as conn:  # the holder is a machine that stopped answering ...
        conn.execute(t.update().where(t.c.key == key).values(holder=json.dumps({"host": "elsewhere", "pid": 1})))
    held._stop.set()  # ... and beating
    assert board.claim(key) is None  # not yet: its last heartbeat is fresh
    time.sleep(2.5)
    taken = board.claim(key)
    assert taken is not None
    held.release({"status": "success", "score": 1.0})  # the old holder comes back: it changes nothing
    assert board.row(key)["status"] == "running" and board.row(key)["token"] is not None
    taken.release({"status": "success", "score": 0.5})
    assert board.outcome(key) == {"status": "success", "score": 0.5}

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = DatabaseBoard(url, timeout_s=3600).claim(key + "-dead")
    with board.engine.begin() as conn:  # a holder on this host whose process has ended
        conn.execute(t.update().where(t.c.key == key + "-dead").values(
            holder=json.dumps({"host": socket.gethostname(), "pid": dead.pid})))
    gone._stop.set()
    assert DatabaseBoard(url, timeout_s=3600).claim(key + "-dead") is not None


class DroppingEngine:
    """An engine whose next ``drops`` calls fail as they do while a database restarts."""

    def __init__(self, engine, drops: int):
        self.engine, self.drops = engine, drops

    def _call(self, name: str):
        import sqlalchemy as sa

        if self.drops:
            self.drops -= 1
            raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
        return getattr(self.engine, name)()

    def begin(self):
        return self._call("begin")

    def connect(self):
        return self._call("connect")


def test_a_call_the_database_drops_is_made_again_and_a_claim_whose_answer_was_lost_is_found(tmp_path,
                                                                                            monkeypatch):
    from peftbench import claims

    waits = []
    monkeypatch.setattr(claims.time, "sleep", waits.append)
    board = DatabaseBoard(f"sqlite:///{tmp_path / 'claims.db'}")
    engine = board.engine
    board.engine = DroppingEngine(engine, drops=2)
    held = board.claim("a")  # its insert dropped twice, made a third time
    assert held is not None and waits == [1, 2] and board.row("a")["status"] == "running"
    board.engine = DroppingEngine(engine, drops=1)
    held.release({"status": "success", "score": 0.5})
    assert board.outcome("a") == {"status": "success", "score": 0.5}

    # an insert that reached the database but whose answer was lost: made again, it meets its own row
    me = {"host": "here", "pid": os.getpid(), "token": "mine"}
    monkeypatch.setattr(claims, "_holder", lambda: me)
    with engine.begin() as conn:
        conn.execute(board.table.insert().values(key="b", status="running", holder=json.dumps(me), token="mine",
                                                 beat=time.time(), generation=0))
    ours = [board.claim("b") for _ in range(2)]
    assert None not in ours  # ours, not another worker's
    monkeypatch.setattr(claims, "_holder", lambda: {**me, "token": "theirs"})
    assert board.claim("b") is None

    board.engine = DroppingEngine(engine, drops=99)
    with pytest.raises(PeftbenchError, match=r"storage '.*claims.db': the database call failed 6 times over 31 s: "
                                             "server closed the connection unexpectedly"):
        board.claim("c")
    board.engine = engine
    for claim in ours:
        claim.release()


def test_a_heartbeat_keeps_a_claim_alive(tmp_path):
    board = DatabaseBoard(f"sqlite:///{tmp_path / 'claims.db'}", timeout_s=1.2)  # a beat every 0.2 s
    held = board.claim("cell")
    first = board.row("cell")["beat"]
    time.sleep(2)
    assert board.row("cell")["beat"] > first and board.claim("cell") is None
    held.release()


def test_workers_with_separate_folders_share_outcomes_through_the_database(tmp_path):
    url, ran = f"sqlite:///{tmp_path / 'claims.db'}", []

    def runner(cfg, provenance):
        ran.append(cfg.run_id)
        score = 0.5 + 0.1 * cfg.train.seed
        return SimpleNamespace(record={"status": "success", "run_id": cfg.run_id, "metrics": {"score": score}})

    def cells(folder):
        out = []
        for seed in (1, 2, 3):
            cfg = config.load(None, ["model.name_or_path=tiny", "task.name=synthetic", f"train.seed={seed}"])
            cfg.output_dir = str(tmp_path / folder / cfg.run_id)
            out.append(Cell(cfg, None))
        return out

    first = run_sweep(cells("a")[:2], runner=runner, board=DatabaseBoard(url))
    second = run_sweep(cells("b"), runner=runner, board=DatabaseBoard(url))
    assert (first.ran, second.ran, second.done_before) == (2, 1, 2)
    assert len(ran) == len(set(ran)) == 3
    assert DatabaseBoard(url).outcome(ran[0]) == {"status": "success", "score": pytest.approx(0.6)}


def test_what_a_run_leaves_in_the_database_on_every_path(tmp_path):
    """A success or a failed record keeps its status; a refused cell, a run cut short and a crash that left no
    record free the cell for a later worker; a failed cell counts as failed also in a worker that did not run it."""
    from peftbench.errors import Interrupted

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    outcomes = {1: "success", 2: "failed", 3: "refused", 4: "interrupted", 5: "crash"}

    def runner(cfg, provenance):
        what = outcomes[cfg.train.seed]
        if what == "refused":
            raise PeftbenchError("bad data")
        if what == "interrupted":
            raise Interrupted("stopped")
        if what == "crash":
            raise RuntimeError("no record written")
        if what == "failed":
            write_atomic(Path(cfg.output_dir) / RECORD_NAME, make_record("failed", cfg.to_dict(), cfg.run_id, {},
                                                                         error="DivergedError: nan"))
            raise RuntimeError("diverged")
        return SimpleNamespace(record={"status": "success", "run_id": cfg.run_id, "metrics": {"score": 0.9}})

    def cell(folder, seed):
        cfg = config.load(None, ["model.name_or_path=tiny", "task.name=synthetic", f"train.seed={seed}"])
        cfg.output_dir = str(tmp_path / folder / cfg.run_id)
        return Cell(cfg, None)

    board = DatabaseBoard(url)
    for seed in outcomes:
        try:
            run_sweep([cell("a", seed)], runner=runner, board=board)
        except Interrupted:
            assert outcomes[seed] == "interrupted"
    status = {seed: (board.row(cell("a", seed).run_id) or {}).get("status") for seed in outcomes}
    assert status == {1: "success", 2: "failed", 3: None, 4: None, 5: None}
    elsewhere = run_sweep([cell("b", 2)], runner=runner, board=DatabaseBoard(url))
    assert (elsewhere.ran, elsewhere.done_before, elsewhere.failed) == (0, 1, 1)


def test_database_errors_are_one_line_without_the_password():
    with pytest.raises(PeftbenchError) as err:
        DatabaseBoard(f"postgresql+psycopg://user:secret@127.0.0.1:{_free_port()}/db")
    assert "secret" not in str(err.value) and "user:***@" in str(err.value) and "\n" not in str(err.value)


def _search_worker(spec_path: str, log: str) -> None:
    from test_search import fake_runner

    from peftbench import search, sweep

    spec = search.read_sweep(spec_path)
    search.run_search(search.studies(spec), spec["search"], runner=fake_runner(Path(log), pause=0.05),
                      board=sweep.board(spec))


def test_two_workers_with_separate_folders_drain_one_search_through_the_database(tmp_path):
    """Study locks, trial outcomes and cell claims in one database: each cell runs once, in one folder or the
    other, and both workers' Optuna studies are the one in the database."""
    import multiprocessing

    from test_search import SWEEP

    from peftbench import search

    paths = []
    for name in ("a", "b"):
        text = SWEEP.format(trials=3, sampler="grid", out=tmp_path / name)
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(text + f"storage: sqlite:///{tmp_path / 'shared.db'}\n", encoding="utf-8")
    log = tmp_path / "calls"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_search_worker, args=(str(p), str(log))) for p in paths]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        if w.is_alive():
            w.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    calls = [line for line in log.read_text().split()]
    assert len(calls) == len(set(calls)) == 2 * (3 * 2 + 3)  # methods x (trials x seeds + final seeds), once each
    records = [read_record(p) for p in glob(str(tmp_path / "*" / "*" / "*" / RECORD_NAME))]
    assert sorted(r["run_id"] for r in records) == sorted(set(calls))
    spec = search.read_sweep(paths[1])
    assert spec["search"].storage == f"sqlite:///{tmp_path / 'shared.db'}"
    for study in search.studies(spec):
        assert len(search.open_study(study, spec["search"]).get_trials()) == 3


def test_a_bad_storage_is_one_clear_line(tmp_path):
    with pytest.raises(PeftbenchError, match="storage 'nosuchdb://x'"):
        DatabaseBoard("nosuchdb://x")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("grid: {train.seed: [1]}\nclaim_timeout: 0\n", encoding="utf-8")
    from peftbench.sweep import read_sweep

    with pytest.raises(PeftbenchError, match="field 'claim_timeout' must be seconds"):
        read_sweep(sweep_file)


def _worker(sweep_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftbench", "sweep", str(sweep_file)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(proc: subprocess.Popen) -> dict:
    """The counts of a worker's last line: ``sweep: 4 cells, ran 3, done before 0, claimed elsewhere 1, ...``."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return _counts(out)


def _counts(out: str) -> dict:
    counts = {}
    for part in out.strip().splitlines()[-1].removeprefix("sweep: ").split(", "):
        words = part.split()
        counts[" ".join(w for w in words if not w.isdigit())] = int(next(w for w in words if w.isdigit()))
    return counts


@pytest.mark.slow
def test_two_machines_drain_a_sweep_through_postgresql_and_a_frozen_one_loses_its_cell(postgres, tmp_path, capsys):
    """Two workers with separate output folders and one PostgreSQL database run every cell once; one frozen
    mid-cell (a machine cut off) keeps its claim until the timeout: the other worker skips that cell while the
    claim is fresh (a worker started after the timeout then runs it) or, reaching it later, takes it over."""
    cells = 4
    recipe = ("recipe: {model: {name_or_path: tiny}, task: {name: synthetic, max_length: 32}, method: {name: lora}, "
              "train: {max_steps: 3, save_checkpoint: false, lr: 5e-3, measure_inference: false}}\n"
              f"grid: {{train.seed: [{', '.join(str(s) for s in range(1, cells + 1))}]}}\n"
              f"storage: {postgres}\nclaim_timeout: 4\n")
    files = {}
    for name in ("a", "b"):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(recipe + f"output_dir: {tmp_path / name}\n", encoding="utf-8")
    board = DatabaseBoard(postgres)
    t = board.table
    with board.engine.begin() as conn:
        conn.execute(t.delete())
    frozen, other = _worker(files["a"]), _worker(files["b"])
    deadline, held = time.time() + 300, None
    while held is None and time.time() < deadline and frozen.poll() is None:
        with board.engine.connect() as conn:
            running = [row["key"] for row in conn.execute(board.sa.select(t).where(t.c.status == "running")).mappings()
                       if json.loads(row["holder"])["pid"] == frozen.pid]
        if running:
            os.kill(frozen.pid, signal.SIGSTOP)  # mid-cell: no heartbeat, no record, its claim in the database
            still = board.row(running[0])
            if still["status"] == "running" and json.loads(still["holder"])["pid"] == frozen.pid:
                held = running[0]
            else:  # it finished that cell just before the stop: let it go on to the next one
                os.kill(frozen.pid, signal.SIGCONT)
        time.sleep(0.05)
    assert held is not None, "worker a never held a cell"
    frozen_at = time.time()
    try:
        drained = _summary(other)  # it skips the frozen cell while its claim is fresh, or takes it once stale
        while board.row(held)["status"] == "running" and time.time() - board.row(held)["beat"] <= 4:
            time.sleep(0.2)
        assert main(["sweep", str(files["b"])]) == 0  # a worker started after the timeout (in this process)
        late = _counts(capsys.readouterr().out)
        assert late["ran"] + late["done before"] == cells, late
    finally:
        frozen.kill()
        frozen.communicate()
    done_in_a = list((tmp_path / "a").glob(f"*/{RECORD_NAME}"))
    assert drained["ran"] + late["ran"] == cells - len(done_in_a), (drained, late)  # every cell once
    taken = read_record(tmp_path / "b" / held / RECORD_NAME)
    started = datetime.fromisoformat(taken["finished_at"]).timestamp() - taken["metrics"]["wall_s"]
    assert started >= frozen_at + 4 - 2, (started, frozen_at)  # not before the claim timed out (last beat and
    # finished_at, written to the second, each shift this by under a second)
    records = [read_record(p) for p in glob(str(tmp_path / "*" / "*" / RECORD_NAME))]
    assert sorted(r["run_id"] for r in records) == sorted({r["run_id"] for r in records})  # no cell twice
    assert len(records) == cells and all(r["status"] == "success" for r in records)
    assert not (tmp_path / "a" / held / RECORD_NAME).exists()
    with board.engine.connect() as conn:
        rows = conn.execute(board.sa.select(t.c.status)).scalars().all()
    assert sorted(rows) == ["success"] * cells
    board_dir = tmp_path / "board"
    assert main(["leaderboard", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(board_dir)]) == 0
    assert f"{cells} records" in (board_dir / "leaderboard.md").read_text(encoding="utf-8")
