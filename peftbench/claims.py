"""Who runs which sweep cell, so that any number of workers drain a sweep exactly once.

Two boards hold the claims (one per cell being run, kept alive by a heartbeat) and, for the database one,
what came of each cell:

- :class:`FolderBoard` (the default): claim files in the results folder the workers share
  (``<output_dir>/.claims/<key>.json``); a cell's outcome is its record there.
- :class:`DatabaseBoard` (a sweep's ``storage:``, or ``search.storage``): one table in a database every
  worker reaches (PostgreSQL across machines; any SQLAlchemy URL), holding each claim and each finished
  cell's status and score, so workers with separate output folders share only the database. A cell is its
  run id: a cell any worker finished is done for all, and ``peftbench leaderboard`` merges their folders.

A claim whose holder is gone (same host, process ended) is taken over at once; one whose heartbeat is older
than the claim timeout (a machine that died or went silent) after that timeout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from peftbench.errors import PeftbenchError

CLAIMS_DIR = ".claims"  # in a sweep's output_dir: one file per cell being run
CLAIM_TIMEOUT_S = 90.0  # a claim whose heartbeat is older belongs to a dead or silent worker
BEATS_PER_TIMEOUT = 6  # heartbeats within one timeout
LOCK_WAIT_S = 0.2  # between tries for a held lock
TABLE = "peftbench_cells"
DATABASE_TRIES = 6  # a call the database drops (a restart, a network blip): 6 tries, 1, 2, 4, 8, 16 s apart


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


def _gone(held: dict) -> bool:
    """The holder ran on this host and its process has ended."""
    pid = held.get("pid")
    if held.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Claim:
    """One worker's hold on one key, kept alive by a heartbeat thread until :meth:`release`."""

    def __init__(self, beat, drop, every_s: float):
        self._beat, self._drop = beat, drop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            if not self._beat():  # taken over (this worker was silent too long): stop beating
                return

    def release(self, outcome: dict | None = None) -> None:
        """Let go; ``outcome`` (``{"status", "score"}`` of a finished cell) is kept where the board keeps
        outcomes. Without one the cell is to do again."""
        self._stop.set()
        self._thread.join()
        self._drop(outcome)


class Board:
    """Where claims are taken; a lock is a claim held while waiting for it."""

    def claim(self, key: str, replace_failed: bool = False) -> Claim | None:
        raise NotImplementedError

    def outcome(self, key: str) -> dict | None:
        """``{"status", "score"}`` of a finished cell, where the board keeps outcomes; else None."""
        return None

    def publish(self, key: str, outcome: dict) -> None:
        """Keep the outcome of a cell found finished in this worker's folder (where the board keeps outcomes)."""

    @contextmanager
    def hold(self, key: str):
        """Hold ``key`` alone, waiting while another worker has it (a lock)."""
        while (claim := self.claim(key)) is None:
            time.sleep(LOCK_WAIT_S)
        try:
            yield
        finally:
            claim.release()


class FolderBoard(Board):
    """Claims as files in the results folder the workers share; a cell's outcome is its record there."""

    def __init__(self, root: str | Path, timeout_s: float = CLAIM_TIMEOUT_S):
        self.root, self.timeout_s = Path(root) / CLAIMS_DIR, timeout_s

    def claim(self, key: str, replace_failed: bool = False) -> Claim | None:
        """The claim on ``key`` (created exclusively: ``O_EXCL``), or None while another live worker holds it."""
        path = self.root / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over(path):
                    return None
                continue
            holder = {**_holder(), "claimed_at": time.time()}
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(holder, fh)
            token = holder["token"]
            return Claim(lambda: self._touch(path, token), lambda outcome: self._drop(path, token),
                         self.timeout_s / BEATS_PER_TIMEOUT)
        return None

    @staticmethod
    def _ours(path: Path, token: str) -> bool | None:
        """Whether the claim file is still this worker's; None when it cannot be read now."""
        try:
            return json.loads(path.read_text(encoding="utf-8") or "{}").get("token") == token
        except FileNotFoundError:
            return False
        except (OSError, ValueError):  # a passing error of a shared disk, or a claim being written
            return None

    def _touch(self, path: Path, token: str) -> bool:
        """A heartbeat: False once the claim is gone or another worker's (taken over); a beat that fails for a
        passing reason is tried again at the next one."""
        if self._ours(path, token) is False:
            return False
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except OSError:
            pass
        return True

    def _drop(self, path: Path, token: str) -> None:
        """Let go of this worker's claim, never of the one that took it over."""
        if self._ours(path, token):
            path.unlink(missing_ok=True)

    def _take_over(self, path: Path) -> bool:
        """Move a stale claim aside; False if the claim is live (or another worker moved it first)."""
        try:
            held = json.loads(path.read_text(encoding="utf-8") or "{}")
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):  # gone meanwhile, or being written: look again later
            return False
        if not (_gone(held) or age > self.timeout_s):
            return False
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = json.loads(aside.read_text(encoding="utf-8") or "{}")
        if moved.get("token") != held.get("token"):  # a fresh claim was made meanwhile: give it back
            os.rename(aside, path)
            return False
        aside.unlink()
        return True


class DatabaseBoard(Board):
    """Claims and outcomes in the table ``peftbench_cells`` of a database (an SQLAlchemy URL).

    A row is a key (a cell's run id, or a lock's name), its status (``running``, ``success``, ``failed``), the
    score of a finished cell, a generation (one more at every claim) and, while running, its holder (host,
    pid, token) and heartbeat time (the holder's clock: machines' clocks must agree to well within the claim
    timeout, as NTP keeps them). Taking a claim is one insert, or one update of a stale (or, retried, failed)
    row conditioned on the generation read, so exactly one worker wins; every later write is conditioned on
    the winner's token, so a worker that comes back after its claim was taken over changes nothing. A call the
    database drops is made again (:data:`DATABASE_TRIES`); a claim whose answer was lost is found by its token.
    """

    def __init__(self, url: str, timeout_s: float = CLAIM_TIMEOUT_S):
        self.where = _without_password(url)
        try:
            import sqlalchemy as sa
        except ImportError:
            raise PeftbenchError(f"storage {self.where!r} needs SQLAlchemy and the database's driver: pip install "
                                 "'peftbench[postgres]' (PostgreSQL) or 'peftbench[tuning]' (SQLite)") from None
        self.sa, self.timeout_s = sa, timeout_s
        if url.startswith("sqlite:///"):  # SQLite creates the file, not its folder
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(url, pool_pre_ping=True, connect_args=(
                {"connect_timeout": 10} if url.startswith("postgresql") else {}))
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
            raise PeftbenchError(f"storage {self.where!r}: {_first_line(exc)}") from None
        self.table = sa.Table(TABLE, sa.MetaData(), sa.Column("key", sa.String(200), primary_key=True),
                              sa.Column("status", sa.String(16), nullable=False), sa.Column("score", sa.Float),
                              sa.Column("holder", sa.Text), sa.Column("token", sa.String(32)),
                              sa.Column("beat", sa.Float), sa.Column("generation", sa.Integer, nullable=False))
        try:
            self.table.metadata.create_all(self.engine)  # checks first; two workers may both try
        except sa.exc.SQLAlchemyError as exc:
            try:
                exists = sa.inspect(self.engine).has_table(TABLE)
            except sa.exc.SQLAlchemyError:
                exists = False
            if not exists:
                raise PeftbenchError(f"storage {self.where!r}: cannot use the database: {_first_line(exc)}") from None

    def _asked(self, call):
        """``call()``, made again while the database drops it; past the last try, one line naming the storage."""
        for attempt in range(DATABASE_TRIES):
            try:
                return call()
            except (self.sa.exc.OperationalError, self.sa.exc.InterfaceError) as exc:
                if attempt == DATABASE_TRIES - 1:
                    raise PeftbenchError(f"storage {self.where!r}: the database call failed {DATABASE_TRIES} times "
                                         f"over {2 ** (DATABASE_TRIES - 1) - 1} s: {_first_line(exc)}") from None
                time.sleep(2 ** attempt)

    def _write(self, statement) -> int:
        def write() -> int:
            with self.engine.begin() as conn:
                return conn.execute(statement).rowcount

        return self._asked(write)

    def claim(self, key: str, replace_failed: bool = False) -> Claim | None:
        """The claim on ``key``, or None while another live worker holds it or (unless ``replace_failed``) the
        cell has finished."""
        sa, t, me = self.sa, self.table, _holder()
        row = {"status": "running", "score": None, "holder": json.dumps(me), "token": me["token"], "beat": time.time()}
        if not self._took(key, row, replace_failed):
            return None
        where = (t.c.key == key, t.c.token == me["token"])

        def beat() -> bool:
            try:
                return self._write(t.update().where(*where).values(beat=time.time())) == 1
            except (sa.exc.SQLAlchemyError, PeftbenchError):  # the database is unreachable: try again next beat
                return True

        def drop(outcome: dict | None) -> None:
            done = t.update().where(*where).values(status=outcome["status"], score=outcome.get("score"), holder=None,
                                                   token=None, beat=None) if outcome else t.delete().where(*where)
            try:
                self._write(done)
            except (sa.exc.SQLAlchemyError, PeftbenchError) as exc:  # the record is written: it lapses instead
                print(f"warning: storage {self.where!r}: could not release the claim on {key} "
                      f"({_first_line(exc)}); it lapses after {self.timeout_s:g} s", file=sys.stderr)
        return Claim(beat, drop, self.timeout_s / BEATS_PER_TIMEOUT)

    def _took(self, key: str, row: dict, replace_failed: bool) -> bool:
        """Whether this worker now holds ``key``: by its insert, or by its update of a replaceable row conditioned on
        the generation read (a call made again after its answer was lost finds the row holding its token)."""
        t = self.table
        try:
            self._write(t.insert().values(key=key, generation=0, **row))
            return True
        except self.sa.exc.IntegrityError:
            held = self.row(key)
        if held is None or held["token"] == row["token"]:
            return held is not None
        if not self._replaceable(held, replace_failed):
            return False
        if self._write(t.update().where(t.c.key == key, t.c.generation == held["generation"])
                       .values(generation=held["generation"] + 1, **row)) == 1:
            return True
        return (self.row(key) or {}).get("token") == row["token"]  # else another worker took it first

    def _replaceable(self, held: dict, replace_failed: bool) -> bool:
        if held["status"] == "running":
            return _gone(json.loads(held["holder"] or "{}")) or time.time() - (held["beat"] or 0) > self.timeout_s
        return held["status"] == "failed" and replace_failed

    def row(self, key: str) -> dict | None:
        def read():
            with self.engine.connect() as conn:
                return conn.execute(self.sa.select(self.table).where(self.table.c.key == key)).mappings().first()

        found = self._asked(read)
        return dict(found) if found else None

    def outcome(self, key: str) -> dict | None:
        row = self.row(key)
        return {"status": row["status"], "score": row["score"]} if row and row["status"] != "running" else None

    def publish(self, key: str, outcome: dict) -> None:
        if self.row(key) is None:
            try:
                self._write(self.table.insert().values(key=key, status=outcome["status"], score=outcome.get("score"),
                                                       generation=0))
            except self.sa.exc.IntegrityError:
                pass


def _without_password(url: str) -> str:
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_board(output_dir: str | Path, storage: str | None = None, timeout_s: float = CLAIM_TIMEOUT_S):
    """The database board at ``storage``, else the folder board of ``output_dir``."""
    return DatabaseBoard(storage, timeout_s) if storage else FolderBoard(output_dir, timeout_s)


def outcome_of(record: dict) -> dict | None:
    """What a board keeps of a record: None for a run cut short from outside (it runs again)."""
    if record.get("interrupted"):
        return None
    return {"status": record["status"], "score": (record.get("metrics") or {}).get("score")}
