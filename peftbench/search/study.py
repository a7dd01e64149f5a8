"""A study: one (task, method, settings) of the grid, and the runs of its trials and final seeds."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from peftbench.config import RunConfig, resolve
from peftbench.errors import PeftbenchError
from peftbench.search.spec import SEARCH_DIR, SearchSpec
from peftbench.sweep import MAX_CELLS, expand


@dataclass
class Study:
    """One (task, method, settings): the grid cell without learning rate and seed."""

    cfg: RunConfig
    output_dir: Path  # the sweep's

    @property
    def name(self) -> str:
        probe = copy.deepcopy(self.cfg)
        probe.train.lr, probe.train.seed = 0.0, 0
        return f"{self.cfg.task.name}-{self.cfg.method.name}-{probe.run_id[:8]}"

    @property
    def label(self) -> str:
        """The name with the method settings that differ from their defaults (what tells studies apart)."""
        changed = self.cfg.changed_settings()["method"]
        return self.name + (f" ({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})" if changed else "")

    def cell_cfg(self, phase: str, settings: dict, seed: int) -> RunConfig:
        """The run of one trial's (or the final) ``settings`` (``lr`` and any searched keys) at ``seed``."""
        cfg = copy.deepcopy(self.cfg)
        searched = {k: v for k, v in settings.items() if k != "lr"}
        if searched:
            tree = cfg.to_dict()
            for key, value in searched.items():  # the value replaces the key's (a mapping too, not merged)
                *parents, leaf = key.split(".")
                node = tree
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
            cfg = resolve(tree)
        cfg.train.lr, cfg.train.seed = settings["lr"], seed
        if phase == SEARCH_DIR:  # dev decides: no test score, nothing to keep
            cfg.train.evaluate_test = cfg.train.save_checkpoint = cfg.train.measure_inference = False
        cfg.output_dir = str(self.output_dir / phase / cfg.run_id)
        return cfg


def studies(spec: dict, overrides: list[str] | None = None, shard: tuple[int, int] = (0, 1),
            max_cells: int = MAX_CELLS) -> list[Study]:
    """This shard's studies (every N-th, sorted by name). A searched key that a cell sets already (a grid
    section, a variant, the recipe) is an error: the search would overwrite it, and the rows pool."""
    found = sorted((Study(cfg, Path(spec["output_dir"])) for cfg in expand(spec, overrides, max_cells)),
                   key=lambda s: s.name)
    search = spec.get("search")
    for study in found if isinstance(search, SearchSpec) else ():
        default = resolve({"method": {"name": study.cfg.method.name}}).to_dict()
        mine = study.cfg.to_dict()
        for key in search.space.get(study.cfg.method.name, {}):
            value, start = mine, default
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
                start = start.get(part) if isinstance(start, dict) else None
            if value != start:
                raise PeftbenchError(f"{search.source}: field 'search.space.{study.cfg.method.name}.{key}': the "
                                     f"sweep sets it too ({value!r} in {study.name})")
    i, n = shard
    return [s for k, s in enumerate(found) if k % n == i]
