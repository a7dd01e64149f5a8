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
record (``retry_failed`` reruns failed ones); ``shard=(i, n)`` takes every n-th
cell of the cells sorted by run id, so n machines share one results folder.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from peftbench import config
from peftbench.config import RunConfig
from peftbench.errors import PeftbenchError
from peftbench.records import RECORD_NAME, read_record

VARIANTS = "variants"


@dataclass
class Cell:
    cfg: RunConfig
    status: str | None  # the existing record's status, None if there is none

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
    unknown = set(spec) - {"recipe", "grid", "output_dir"}
    if unknown:
        raise PeftbenchError(f"{path}: unknown sweep key '{sorted(unknown)[0]}' (known: grid, output_dir, recipe)")
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
    return spec


def expand(spec: dict, overrides: list[str] | None = None) -> list[RunConfig]:
    """Every grid cell as a resolved config (overrides apply to the base recipe); cells differ in run id."""
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
            raise PeftbenchError(f"two grid cells resolve to the same config ({seen[cfg.run_id]} and {dict(zip(keys, values))})")
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
    cells = []
    for k, cfg in enumerate(sorted(cfgs, key=lambda c: c.run_id)):
        if k % n != i:
            continue
        record_path = Path(cfg.output_dir) / RECORD_NAME
        status = read_record(record_path)["status"] if record_path.is_file() else None
        cells.append(Cell(cfg, status))
    return cells


def run_sweep(cells: list[Cell], retry_failed: bool = False, runner=None, provenance: dict | None = None) -> list[dict]:
    """Run the cells still to do; a failing cell leaves a failed record and the sweep goes on.

    ``provenance`` (the sweep file and command) goes into every record.
    """
    from functools import partial

    from peftbench.train import run

    runner = runner or partial(run, provenance=provenance)
    done = []
    for cell in cells:
        if cell.status == "success" or (cell.status == "failed" and not retry_failed):
            done.append(read_record(Path(cell.cfg.output_dir) / RECORD_NAME))
            continue
        try:
            done.append(runner(cell.cfg).record)
        except Exception as exc:  # the run wrote its failed record; the sweep goes on
            print(f"cell {cell.run_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            path = Path(cell.cfg.output_dir) / RECORD_NAME
            if path.is_file():
                done.append(read_record(path))
    return done
