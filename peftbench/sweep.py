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
    storage: postgresql+psycopg://host/db   # optional: workers claim cells there (peftbench.claims)
    claim_timeout: 90                       # seconds without a heartbeat before a claim is taken over

Each cell's identity is its run id (hash of the resolved config); its record is
``<output_dir>/<run id>/record.json``. Rerunning skips cells with a success
record (``retry_failed`` reruns failed ones). Workers on any number of machines
drain one sweep: each claims a cell before running it, in the results folder they share or, with
``storage``, in a database (each worker then writes to its own folder). ``shard=(i, n)`` takes every n-th
cell of the cells sorted by run id.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from peftbench import checkpoint, config
from peftbench.claims import CLAIM_TIMEOUT_S, Board, FolderBoard, open_board, outcome_of
from peftbench.config import RunConfig
from peftbench.errors import Interrupted, PeftbenchError, one_line
from peftbench.heartbeat import new_phase, wait_for_main
from peftbench.loop import process_state
from peftbench.records import RECORD_NAME, error_text, read_record
from peftbench.tasks import find_files, get_spec

VARIANTS = "variants"


@dataclass
class Cell:
    cfg: RunConfig
    status: str | None  # the existing record's status, None if there is none
    provenance: dict | None = None  # what the record says about this cell beyond the sweep (a search's trial)

    @property
    def run_id(self) -> str:
        return self.cfg.run_id


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    spec = config.read_recipe(path)
    unknown = set(spec) - {"recipe", "grid", "output_dir", "search", "final", "storage", "claim_timeout", "reuse"}
    if unknown:
        raise PeftbenchError(f"{path}: unknown sweep key '{sorted(unknown)[0]}' "
                             "(known: claim_timeout, final, grid, output_dir, recipe, reuse, search, storage)")
    reuse = spec.setdefault("reuse", [])
    if not isinstance(reuse, list) or not all(isinstance(d, str) and d for d in reuse):
        raise PeftbenchError(f"{path}: field 'reuse' must list folders of records, got {reuse!r}")
    search = spec.get("search")
    spec["storage"] = spec.get("storage") or (search.get("storage") if isinstance(search, dict) else None)
    if not isinstance(spec["storage"] or "", str):
        raise PeftbenchError(f"{path}: field 'storage' must be a database URL (e.g. postgresql+psycopg://host/db)")
    timeout = spec.setdefault("claim_timeout", CLAIM_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= 86_400:
        raise PeftbenchError(f"{path}: field 'claim_timeout' must be seconds between 1 and 86400, got {timeout!r}")
    if not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise PeftbenchError(f"{path}: field 'grid' must map keys to lists of values")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise PeftbenchError(f"{path}: field 'grid.{key}' must be a non-empty list")
        if key == VARIANTS and not all(isinstance(v, dict) for v in values):
            raise PeftbenchError(f"{path}: field 'grid.{VARIANTS}' must list mappings")
    recipe, spec["recipe_file"] = spec.get("recipe") or {}, None
    if isinstance(recipe, str):
        spec["recipe_file"] = str((path.parent / recipe) if not Path(recipe).is_absolute() else recipe)
        recipe = config.read_recipe(spec["recipe_file"])
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
    given = config.parse_overrides(overrides or [])
    base = config.merge(spec["recipe"], given)
    keys = list(spec["grid"])
    cfgs, seen = [], {}
    for cell in itertools.product(*(range(len(spec["grid"][k])) for k in keys)):
        values = [spec["grid"][k][i] for k, i in zip(keys, cell)]
        tree = base
        for key, value in zip(keys, values):
            tree = config.merge(tree, value if key == VARIANTS else config.nested(key, value))
        tree.pop("output_dir", None)
        try:
            cfg = config.resolve(tree)
        except PeftbenchError as exc:
            raise _located(exc, spec, given, dict(zip(keys, cell))) from None
        if cfg.run_id in seen:
            raise PeftbenchError(f"two grid cells resolve to the same config ({seen[cfg.run_id]} and "
                                 f"{dict(zip(keys, values))})")
        seen[cfg.run_id] = dict(zip(keys, values))
        cfg.output_dir = str(Path(spec["output_dir"]) / cfg.run_id)
        cfgs.append(cfg)
    return cfgs


def _located(exc: PeftbenchError, spec: dict, given: dict, cell: dict[str, int]) -> PeftbenchError:
    """A cell's config error at the line that sets the key it names: the grid value (the last that sets it wins)
    or the recipe, in the sweep file or the recipe file it names; unchanged where an override sets it."""
    key = config.named_key(exc)
    if key is None or "path" not in spec or config.sets(given, key):
        return exc
    lines = config.key_lines(spec["path"])
    for grid_key, i in reversed(cell.items()):
        value = spec["grid"][grid_key][i]
        if config.sets(value if grid_key == VARIANTS else config.nested(grid_key, value), key):
            return config.at_line(exc, spec["path"], lines.get(f"grid.{grid_key}.{i}"))
    if spec.get("recipe_file"):
        return config.at_line(exc, spec["recipe_file"], config.key_lines(spec["recipe_file"]).get(key))
    return config.at_line(exc, spec["path"], lines.get(f"recipe.{key}"))


def reusable(folders: list[str]) -> dict[str, list[Path]]:
    """Run id -> the run folders under ``folders`` (a sweep's ``reuse``, linked folders followed) that hold a
    record of that name: identical cells of other sweeps, taken instead of run again once :func:`adopt` has
    checked them."""
    found: dict[str, list[Path]] = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise PeftbenchError(f"field 'reuse': {folder} is not a folder")
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # not a staging or claims folder
            if RECORD_NAME in files:
                found.setdefault(Path(root).name, []).append(Path(root))
    return found


def adopt(sources: list[Path], cell: Cell) -> dict | None:
    """Copy the first of ``sources`` that holds this very run into the cell's folder (swapped in whole, as a
    run's own folder is); its record, else None. A source passed over is named with the reason."""
    for source in sources:
        try:
            why = _unfit(source, cell)
            if why is None:
                out = Path(cell.cfg.output_dir)
                stage = checkpoint.prepare_run_dir(out)
                for name in checkpoint.RUN_FILES:
                    if (source / name).is_dir():
                        shutil.copytree(source / name, stage / name)
                    elif (source / name).is_file():
                        shutil.copy2(source / name, stage / name)
                checkpoint.publish(stage, out)
                return read_record(out / RECORD_NAME)
        except (OSError, PeftbenchError) as exc:  # a file that went missing, a folder that is not a run's
            why = one_line(exc)
        print(f"cell {cell.run_id}: not reused from {source}: {why}", file=sys.stderr)
    return None


def reusable_here(sources: list[Path], cell: Cell) -> bool:
    """Whether :func:`adopt` would copy one of ``sources`` into ``cell`` (a dry run: nothing is copied)."""
    for source in sources:
        try:
            if _unfit(source, cell) is None:
                return True
        except (OSError, PeftbenchError):
            continue
    return False


def _unfit(source: Path, cell: Cell) -> str | None:
    """Why the run in ``source`` cannot stand for ``cell`` (None: it can): it must be a finished, successful run
    of the same run id, in the same role (search phase, study and budget; a final run's variant), with what the
    cell asks to be measured, on the files found here now."""
    record = read_record(source / RECORD_NAME)
    cfg, made, want = cell.cfg, _mapping(record.get("provenance")), cell.provenance or {}
    if record.get("run_id") != cfg.run_id:
        return f"its record is of run {record.get('run_id')!r}"
    if record.get("status") != "success" or record.get("interrupted"):
        return "not a finished, successful run"
    if any(made.get(key) != want.get(key) for key in ("phase", "study", "variant")) or \
            comparable_budget(made.get("budget")) != comparable_budget(want.get("budget")):
        return "made in another role (search phase, study, budget or variant)"
    if cfg.train.measure_inference and record.get("inference") is None and \
            _mapping(record.get("env")).get("engine") not in ("fsdp2", "deepspeed"):  # sharded runs measure none
        return "its serving cost was not measured (train.measure_inference)"
    return _changed_inputs(record, cfg)


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def comparable_budget(budget) -> dict | None:
    """A search run's budget (a record's ``provenance.budget``) as JSON would read it back, final seeds aside
    (they may grow): two runs were tuned alike when these are equal. None for a missing one (a run no search
    made); a malformed one equals no other budget, nor a missing one."""
    if budget is None:
        return None
    if not isinstance(budget, dict):
        return {"malformed": repr(budget)}
    return json.loads(json.dumps({k: v for k, v in budget.items() if k != "final_seeds"}, sort_keys=True))


def _changed_inputs(record: dict, cfg: RunConfig) -> str | None:
    """What differs between the files the record's run read and those here (None: nothing): a local backbone
    folder by its fingerprint; a local data folder by its split files' SHA-256 and the task's version. A hub
    backbone or dataset is taken by its name (its revision is in the record)."""
    backbone = _mapping(record.get("backbone"))
    if not backbone.get("random_init") and Path(cfg.model.name_or_path).expanduser().is_dir() and \
            backbone.get("fingerprint") != checkpoint.backbone_fingerprint(cfg.model.name_or_path, None, False):
        return f"another backbone is at {cfg.model.name_or_path} now"
    if not cfg.task.data_dir:
        return None
    data = _mapping(record.get("data"))
    if data.get("task_version") != get_spec(cfg.task).version:
        return f"task {cfg.task.name} is at another version now"
    read = {f.get("file"): f.get("sha256") for f in _mapping(data.get("fingerprints")).values() if isinstance(f, dict)}
    here = {path.name: path for path in find_files(Path(cfg.task.data_dir)).values()}
    if set(read) != set(here) or any(_sha256(str(p), p.stat().st_mtime_ns) != read[name] for name, p in here.items()):
        return f"the data files in {cfg.task.data_dir} are not those it read"
    return None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int) -> str:
    """A file's SHA-256, cached by (path, mtime): a sweep reads each data file once."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def board(spec: dict) -> Board:
    """Where the sweep's workers claim cells: the database of ``storage`` (the sweep's, else its search's), or
    claim files in its output folder."""
    return open_board(spec["output_dir"], spec["storage"], spec["claim_timeout"])


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PeftbenchError(f"--shard must look like i/N (e.g. 0/4), got '{text}'") from None
    if not 0 <= i < n:
        raise PeftbenchError(f"--shard {text}: need 0 <= i < N")
    return i, n


def plan(cfgs: list[RunConfig], shard: tuple[int, int] = (0, 1), board: Board | None = None) -> list[Cell]:
    """This shard's cells (sorted by run id), each with its status: the board's, else its record's here."""
    i, n = shard
    mine = [cfg for k, cfg in enumerate(sorted(cfgs, key=lambda c: c.run_id)) if k % n == i]
    if board is None:
        return [Cell(cfg, record_status(cfg)) for cfg in mine]
    return [Cell(cfg, (cell_outcome(cfg, board) or {}).get("status")) for cfg in mine]


def record_status(cfg: RunConfig) -> str | None:
    """The status of the record in ``cfg.output_dir`` (None: no record yet, or a run cut short from outside,
    which is still to do)."""
    path = Path(cfg.output_dir) / RECORD_NAME
    record = read_record(path) if path.is_file() else None
    return None if record is None or record.get("interrupted") else record["status"]


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
    reused: int = 0  # cells taken from another sweep's records (``reuse``)

    def summary(self) -> str:
        trials = f", failed search trials {self.failed_trials}" if self.failed_trials else ""
        refused = f", refused {self.refused}" if self.refused else ""
        reused = f", reused {self.reused}" if self.reused else ""
        return (f"sweep: {self.cells} cells, ran {self.ran}, done before {self.done_before}, "
                f"claimed elsewhere {self.claimed_elsewhere}, failed {self.failed}{trials}{refused}{reused}")

    def add(self, other: SweepOutcome) -> None:
        """Count ``other``'s cells and records into this outcome."""
        self.records += other.records
        for key in ("cells", "ran", "done_before", "claimed_elsewhere", "failed", "failed_trials", "refused",
                    "reused"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


def agree(value):
    """The main process's value on every process (all must run the same cells); the others wait for the main
    process to work it out (reading a claim, copying a run in) while its heartbeat goes on."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    if state.num_processes == 1:
        return value
    new_phase(state)  # (a run that failed on the main process alone leaves the waits in step)
    wait_for_main(state, "a sweep's next step")
    return broadcast_object_list([value])[0]


def run_sweep(cells: list[Cell], retry_failed: bool = False, runner=None, provenance: dict | None = None,
              board: Board | None = None, reuse: dict[str, list[Path]] | None = None) -> SweepOutcome:
    """Run the cells still to do; a failing cell leaves a failed record and the sweep goes on.

    Each cell is claimed on ``board`` before it runs (default: claim files beside the cells), so any number
    of workers may drain one sweep; ``provenance`` (the sweep file and command) goes into every record. A cell
    whose run is in ``reuse`` (:func:`reusable`) is copied in instead of run.
    """
    from peftbench.train import run

    runner = runner or (lambda cfg, cell_provenance: run(cfg, provenance={**(provenance or {}), **cell_provenance}))
    main = process_state().is_main_process
    outcome = SweepOutcome(records=[], cells=len(cells))

    def finished() -> str | None:  # read now: another worker may have finished the cell since planning
        status = agree((cell_outcome(cell.cfg, cell_board) or {}).get("status") if main else None)
        return status if status == "success" or (status == "failed" and not retry_failed) else None

    for number, cell in enumerate(cells, 1):
        cell_board = board or FolderBoard(Path(cell.cfg.output_dir).parent)
        path = Path(cell.cfg.output_dir) / RECORD_NAME
        if main:
            c = cell.cfg
            print(f"cell {number}/{len(cells)}: {c.task.name} {c.method.name} seed {c.train.seed} ({cell.run_id[:8]})",
                  flush=True)
        status = finished()
        claim, record = None, None
        if status is None:
            claim = cell_board.claim(cell.run_id, replace_failed=retry_failed) if main else None
            if not agree(claim is not None):
                outcome.claimed_elsewhere += 1
                continue
            status = finished()  # it may have finished between the look and the claim
        try:
            if status is not None:
                outcome.done_before += 1
                record = read_record(path) if path.is_file() else None  # None: finished in another worker's folder
            elif agree((adopt(reuse[cell.run_id], cell) is not None) if main and cell.run_id in (reuse or {})
                       else None):
                outcome.reused += 1
                record = read_record(path) if path.is_file() else None
            else:
                outcome.ran += 1
                try:
                    record = runner(cell.cfg, cell.provenance or {}).record
                except Interrupted:  # a stop signal or a lost process: the group cannot go on
                    raise
                except PeftbenchError as exc:  # bad input for this cell (no record: a rerun tries it again)
                    print(f"cell {cell.run_id} refused: {one_line(exc)}", file=sys.stderr)
                    outcome.refused += 1
                except Exception as exc:  # the run wrote its failed record where it could; the sweep goes on
                    print(f"cell {cell.run_id} failed: {error_text(exc)}", file=sys.stderr)
                    record, status = (read_record(path) if path.is_file() else None), "failed"
        finally:
            if claim is not None:
                claim.release(outcome_of(record) if record is not None else None)
        if record is not None:
            outcome.records.append(record)
        outcome.failed += (record["status"] if record is not None else status) == "failed"  # also in another folder
    return outcome


def cell_outcome(cfg: RunConfig, board: Board) -> dict | None:
    """A finished cell's status and score: what the board keeps, else its record here (which the board then
    keeps too); None while the cell is to do."""
    kept = board.outcome(cfg.run_id)
    if kept is None:
        path = Path(cfg.output_dir) / RECORD_NAME
        kept = outcome_of(read_record(path)) if path.is_file() else None
        if kept is not None:
            board.publish(cfg.run_id, kept)
    return kept
