"""Sweeps: a base recipe times a grid, one run (and one record) per cell.

A sweep file::

    recipe: {model: {name_or_path: tiny}, train: {epochs: 10}}   # or a path to a recipe file
    grid:
      task:                       # a dotted key; a mapping value merges into that section
        - {name: tnews, data_dir: data/tnews, max_length: 64}
        - {name: eprstmt, data_dir: data/eprstmt}
      variants:                   # special key: each entry merges into the whole recipe
        - {method: {name: full}, train: {lr: 2e-5}}
        - {method: {name: lora}, train: {lr: 5e-4}}
      train.seed: [1, 2, 3]
    output_dir: results/my-sweep

Each cell's identity is its run id (hash of the resolved config); its record is
``<output_dir>/<run id>/record.json``. Rerunning skips cells with a success
record (``retry_failed`` reruns failed ones). Workers on any number of machines
may drain one sweep folder: each claims a cell before running it. ``shard=(i, n)`` takes every n-th
cell of the cells sorted by run id, so n machines share one results folder.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from peftbench import config
from peftbench.config import RunConfig
from peftbench.errors import Interrupted, PeftbenchError, one_line
from peftbench.loop import process_state
from peftbench.records import RECORD_NAME, error_text, read_record

VARIANTS = "variants"


@dataclass
class Cell:
    cfg: RunConfig
    status: str | None  # the existing record's status, None if there is none
    provenance: dict | None = None  # what the record says about this cell beyond the sweep (a search's trial)

    @property
    def run_id(self) -> str:
        return self.cfg.run_id


def _nested(key: str, value) -> dict:
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    spec = config.read_recipe(path)
    unknown = set(spec) - {"recipe", "grid", "output_dir", "search", "final"}
    if unknown:
        raise PeftbenchError(f"{path}: unknown sweep key '{sorted(unknown)[0]}' "
                             "(known: final, grid, output_dir, recipe, search)")
    if not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise PeftbenchError(f"{path}: field 'grid' must map keys to lists of values")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise PeftbenchError(f"{path}: field 'grid.{key}' must be a non-empty list")
        if key == VARIANTS and not all(isinstance(v, dict) for v in values):
            raise PeftbenchError(f"{path}: field 'grid.{VARIANTS}' must list mappings")
    recipe = spec.get("recipe") or {}
    if isinstance(recipe, str):
        recipe = config.read_recipe((path.parent / recipe) if not Path(recipe).is_absolute() else recipe)
    if not isinstance(recipe, dict):
        raise PeftbenchError(f"{path}: field 'recipe' must be a mapping or a recipe file path")
    spec["recipe"] = recipe
    spec["output_dir"] = spec.get("output_dir") or f"results/{path.stem}"
    spec["path"] = str(path)
    return spec  # a 'search' / 'final' section is read by peftbench.search


MAX_CELLS = 10_000  # cells a sweep may have unless --max-cells raises it


def count_cells(spec: dict) -> int:
    """The grid's cells, from its shape (nothing expanded)."""
    return math.prod(len(values) for values in spec["grid"].values())


def expand(spec: dict, overrides: list[str] | None = None, max_cells: int = MAX_CELLS) -> list[RunConfig]:
    """Every grid cell as a resolved config (overrides apply to the base recipe); cells differ in run id. A grid
    of more than ``max_cells`` cells is refused before anything is expanded."""
    cells = count_cells(spec)
    if cells > max_cells:
        shape = " x ".join(str(len(v)) for v in spec["grid"].values())
        raise PeftbenchError(f"{spec.get('path', 'sweep')}: field 'grid' has {cells:,} cells ({shape}), more than "
                             f"{max_cells:,}; split the sweep, or raise the limit with --max-cells")
    base = config.merge(spec["recipe"], config.parse_overrides(overrides or []))
    keys = list(spec["grid"])
    cfgs, seen = [], {}
    for values in itertools.product(*(spec["grid"][k] for k in keys)):
        tree = base
        for key, value in zip(keys, values):
            tree = config.merge(tree, value if key == VARIANTS else _nested(key, value))
        tree.pop("output_dir", None)
        cfg = config.resolve(tree)
        if cfg.run_id in seen:
            raise PeftbenchError(f"two grid cells resolve to the same config ({seen[cfg.run_id]} and "
                                 f"{dict(zip(keys, values))})")
        seen[cfg.run_id] = dict(zip(keys, values))
        cfg.output_dir = str(Path(spec["output_dir"]) / cfg.run_id)
        cfgs.append(cfg)
    return cfgs


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PeftbenchError(f"--shard must look like i/N (e.g. 0/4), got '{text}'") from None
    if not 0 <= i < n:
        raise PeftbenchError(f"--shard {text}: need 0 <= i < N")
    return i, n


def plan(cfgs: list[RunConfig], shard: tuple[int, int] = (0, 1)) -> list[Cell]:
    """This shard's cells (sorted by run id), each with the status of its existing record."""
    i, n = shard
    return [Cell(cfg, record_status(cfg)) for k, cfg in enumerate(sorted(cfgs, key=lambda c: c.run_id)) if k % n == i]


def record_status(cfg: RunConfig) -> str | None:
    """The status of the record in ``cfg.output_dir`` (None: no record yet, or a run cut short from outside,
    which is still to do)."""
    path = Path(cfg.output_dir) / RECORD_NAME
    record = read_record(path) if path.is_file() else None
    return None if record is None or record.get("interrupted") else record["status"]


CLAIMS_DIR = ".claims"  # in the sweep's output_dir: one file per cell being run
HEARTBEAT_S = 15.0  # a worker touches its claim this often
STALE_S = 90.0  # a claim untouched this long belongs to a dead worker


class Claim:
    """One worker's exclusive hold on one cell, so that workers sharing a folder run each cell once.

    The claim file is created exclusively (``O_EXCL``) and holds the host, pid and a token; a thread
    touches it every ``HEARTBEAT_S`` seconds. A claim whose process is gone (same host) or whose heartbeat
    is older than ``STALE_S`` is taken over: renamed aside (one worker's rename wins), then created anew.
    """

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    @classmethod
    def take(cls, path: Path) -> Claim | None:
        """The claim, or None while another live worker holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not cls._take_over(path):
                    return None
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                           "claimed_at": time.time()}, fh)
            claim = cls(path)
            claim._thread.start()
            return claim
        return None

    @staticmethod
    def _take_over(path: Path) -> bool:
        """Move a stale claim aside; False if the claim is live (or another worker moved it first)."""
        try:
            held = json.loads(path.read_text(encoding="utf-8") or "{}")
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):  # gone meanwhile, or being written: look again later
            return False
        dead = held.get("host") == socket.gethostname() and not _alive(held.get("pid"))
        if not (dead or age > STALE_S):
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

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class SweepOutcome:
    records: list[dict]  # of every cell this worker ran or found done
    cells: int = 0
    ran: int = 0
    done_before: int = 0
    claimed_elsewhere: int = 0
    failed: int = 0
    failed_trials: int = 0  # search runs that failed: a tried learning rate, not an error of the sweep
    refused: int = 0  # cells whose input a run refused (no record: a rerun tries them again)

    def summary(self) -> str:
        trials = f", failed search trials {self.failed_trials}" if self.failed_trials else ""
        refused = f", refused {self.refused}" if self.refused else ""
        return (f"sweep: {self.cells} cells, ran {self.ran}, done before {self.done_before}, "
                f"claimed elsewhere {self.claimed_elsewhere}, failed {self.failed}{trials}{refused}")

    def add(self, other: SweepOutcome) -> None:
        """Count ``other``'s cells and records into this outcome."""
        self.records += other.records
        for key in ("cells", "ran", "done_before", "claimed_elsewhere", "failed", "failed_trials", "refused"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


def agree(value):
    """The main process's value on every process (all must run the same cells)."""
    from accelerate.utils import broadcast_object_list

    return value if process_state().num_processes == 1 else broadcast_object_list([value])[0]


def run_sweep(cells: list[Cell], retry_failed: bool = False, runner=None,
              provenance: dict | None = None) -> SweepOutcome:
    """Run the cells still to do; a failing cell leaves a failed record and the sweep goes on.

    Each cell is claimed before it runs (:class:`Claim`), so any number of workers may drain one sweep
    folder; ``provenance`` (the sweep file and command) goes into every record.
    """
    from peftbench.train import run

    runner = runner or (lambda cfg, cell_provenance: run(cfg, provenance={**(provenance or {}), **cell_provenance}))
    main = process_state().is_main_process
    outcome = SweepOutcome(records=[], cells=len(cells))

    def finished() -> str | None:  # read now: another worker may have finished the cell since planning
        status = agree(record_status(cell.cfg) if main else None)
        return status if status == "success" or (status == "failed" and not retry_failed) else None

    for number, cell in enumerate(cells, 1):
        if main:
            c = cell.cfg
            print(f"cell {number}/{len(cells)}: {c.task.name} {c.method.name} seed {c.train.seed} ({cell.run_id[:8]})",
                  flush=True)
        status = finished()
        claim = None
        if status is None:
            claim = Claim.take(Path(cell.cfg.output_dir).parent / CLAIMS_DIR / f"{cell.run_id}.json") if main else None
            if not agree(claim is not None):
                outcome.claimed_elsewhere += 1
                continue
            status = finished()  # it may have finished between the look and the claim
        try:
            if status is not None:
                outcome.done_before += 1
                record = read_record(Path(cell.cfg.output_dir) / RECORD_NAME)
            else:
                outcome.ran += 1
                try:
                    record = runner(cell.cfg, cell.provenance or {}).record
                except Interrupted:  # a stop signal or a lost process: the group cannot go on
                    raise
                except PeftbenchError as exc:  # bad input for this cell (no record: a rerun tries it again)
                    print(f"cell {cell.run_id} refused: {one_line(exc)}", file=sys.stderr)
                    outcome.refused += 1
                    record = None
                except Exception as exc:  # the run wrote its failed record; the sweep goes on
                    print(f"cell {cell.run_id} failed: {error_text(exc)}", file=sys.stderr)
                    path = Path(cell.cfg.output_dir) / RECORD_NAME
                    record = read_record(path) if path.is_file() else None
        finally:
            if claim is not None:
                claim.release()
        if record is not None:
            outcome.records.append(record)
            outcome.failed += record["status"] == "failed"
    return outcome
