"""A sweep's ``search`` and ``final`` sections, read and checked: rates, spaces, seeds, variants."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

from peftbench import sweep
from peftbench.config import TrainConfig, merge, nested, resolve, yaml_float
from peftbench.errors import PeftbenchError
from peftbench.methods import get_method
from peftbench.sweep import VARIANTS

SAMPLERS = ("grid", "tpe")
SEARCH_KEYS = {"trials", "lr", "space", "seeds", "sampler", "storage"}
SEARCH_DIR, FINAL_DIR = "search", "final"  # in the sweep's output_dir


@dataclass
class SearchSpec:
    trials: int
    seeds: list[int]
    lr: dict[str, list[float]]  # method -> [low, high], where the sweep sets it
    sampler: str
    storage: str
    final_seeds: list[int]  # empty: search only
    source: str = "sweep"  # the sweep file, for messages
    space: dict[str, dict[str, dict]] = field(default_factory=dict)  # method -> key -> distribution (read_space)
    final_variants: dict[str, dict] = field(default_factory=dict)  # name -> train.* keys, at the chosen settings

    def lr_range(self, method: str) -> tuple[float, float]:
        low, high = self.lr.get(method) or get_method(method).lr_range
        return float(low), float(high)

    def budget(self, method: str) -> dict:
        """What a record says about the tuning that produced it."""
        budget = {"trials": self.trials, "seeds": self.seeds, "final_seeds": self.final_seeds,
                  "sampler": self.sampler, "lr_range": list(self.lr_range(method))}
        if self.space.get(method):  # (a search of the rate alone keeps the budget it was started with)
            budget["space"] = self.space[method]
        return budget

    def suggest(self, trial, method: str) -> dict:
        """The settings of an Optuna trial: ``lr``, then each searched key of the method's space."""
        settings = {"lr": trial.suggest_float("lr", *self.lr_range(method), log=True)}
        for key, d in self.space.get(method, {}).items():
            if "choices" in d:
                settings[key] = trial.suggest_categorical(key, d["choices"])
            elif d["int"]:
                settings[key] = trial.suggest_int(key, d["low"], d["high"], log=d["log"])
            else:
                settings[key] = trial.suggest_float(key, d["low"], d["high"], log=d["log"])
        return settings

    def drawn(self, trial, method: str) -> bool:
        """Whether every setting of ``trial`` has been drawn (a worker may die between asking and drawing)."""
        return {"lr", *self.space.get(method, {})} <= set(trial.params)


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                         for s in value) or len(set(value)) != len(value):
        raise PeftbenchError(f"{where} must be a list of distinct integers, got {value!r}")
    return value


def read_sweep(path: str | Path) -> dict:
    """A sweep file (:func:`peftbench.sweep.read_sweep`) with its ``search`` section as a :class:`SearchSpec`."""
    spec = sweep.read_sweep(path)
    spec["search"] = read_search(spec, Path(path))
    return spec


def read_search(spec: dict, path: Path) -> SearchSpec:
    """The ``search`` and ``final`` sections of sweep file ``path``, checked."""
    search, final = spec.get("search"), spec.get("final")
    if not isinstance(search, dict):
        raise PeftbenchError(f"{path}: field 'search' must be a mapping (a 'final' section needs a search)")
    unknown = set(search) - SEARCH_KEYS
    if unknown:
        raise PeftbenchError(f"{path}: unknown key 'search.{sorted(unknown)[0]}' (known: "
                             f"{', '.join(sorted(SEARCH_KEYS))})")
    trials = search.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise PeftbenchError(f"{path}: field 'search.trials' must be an integer >= 1, got {trials!r}")
    lr = search.get("lr") or {}
    if not isinstance(lr, dict):
        raise PeftbenchError(f"{path}: field 'search.lr' must map method names to [low, high]")
    for method, bounds in lr.items():
        get_method(method)  # a known method
        if isinstance(bounds, list):
            bounds = lr[method] = [yaml_float(b, float) for b in bounds]
        if (not isinstance(bounds, list) or len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds)
                or not 0 < bounds[0] <= bounds[1]):
            raise PeftbenchError(f"{path}: field 'search.lr.{method}' must be [low, high] with 0 < low <= high, "
                                 f"got {bounds!r}")
    sampler = search.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise PeftbenchError(f"{path}: field 'search.sampler' must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    for method, (low, high) in lr.items() if sampler == "grid" else ():
        if len(set(grid_lrs(low, high, trials))) < trials:  # trials that would be one run
            raise PeftbenchError(f"{path}: field 'search.lr.{method}': [{low:g}, {high:g}] holds fewer than {trials} "
                                 "grid rates of 3 significant digits; widen it or lower search.trials")
    if final is not None and (not isinstance(final, dict) or "seeds" not in final or set(final) - {"seeds",
                                                                                                  "variants"}):
        raise PeftbenchError(f"{path}: field 'final' must hold 'seeds' (and optionally 'variants')")
    for key in ("train.lr", "train.seed"):
        if key in spec["grid"]:
            raise PeftbenchError(f"{path}: field 'grid.{key}' cannot be set with a search (the search sets it)")
    if any("lr" in (v.get("train") or {}) for v in spec["grid"].get(VARIANTS, [])):
        raise PeftbenchError(f"{path}: field 'grid.{VARIANTS}' cannot set train.lr with a search (the search sets it)")
    space = read_space(search.get("space"), spec, path)
    if space and sampler == "grid":
        raise PeftbenchError(f"{path}: field 'search.space' needs sampler: tpe (a grid spends the same trials only "
                             "on the learning rate)")
    storage = (search.get("storage") or spec.get("storage")
               or f"sqlite:///{Path(spec['output_dir']).resolve() / 'search.db'}")
    return SearchSpec(trials, _seeds(search.get("seeds", [42]), f"{path}: field 'search.seeds'"), lr, sampler,
                      storage, _seeds(final["seeds"], f"{path}: field 'final.seeds'") if final else [], str(path),
                      space, read_variants((final or {}).get("variants"), space, path))


BUDGET_KEYS = ("train.lr", "train.seed", "train.epochs", "train.max_steps", "train.max_minutes")  # never searched


def read_variants(variants, space: dict, path: Path) -> dict[str, dict]:
    """``final.variants``: name -> ``{train.key: value}``, each run at a study's chosen settings (a training
    trick at the rate the search chose for the plain run); every key a ``train.*`` key the search does not set."""
    if variants is None:
        return {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) and v for v in variants.values()):
        raise PeftbenchError(f"{path}: field 'final.variants' must map names to {{train.key: value}}")
    searched = {key for keys in space.values() for key in keys}
    for name, keys in variants.items():
        methods = keys.get("methods", [])
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise PeftbenchError(f"{path}: field 'final.variants.{name}.methods' must be a list of method names")
        for method in methods:
            get_method(method)  # a known method
        for key, value in keys.items():
            if key == "methods":
                continue
            where = f"{path}: field 'final.variants.{name}.{key}'"
            if not str(key).startswith("train.") or key in BUDGET_KEYS or key in searched:
                raise PeftbenchError(f"{where}: a variant sets train.* keys other than the rate, the seed, the "
                                     "training budget and the searched keys")
            try:
                resolve(nested(key, value))
            except PeftbenchError as err:
                raise PeftbenchError(f"{where}: {value!r} does not make a valid run ({err})") from None
    return variants  # a variant that changes nothing for a study is refused with it (search.run)


def read_space(space, spec: dict, path: Path) -> dict[str, dict[str, dict]]:
    """``search.space``: method -> key -> ``{"choices": [...]}`` or ``{"low", "high", "log", "int"}``, checked
    against the method's keys; every choice and both ends of a range must make a valid run."""
    if space is None:
        return {}
    if not isinstance(space, dict):
        raise PeftbenchError(f"{path}: field 'search.space' must map method names to {{key: distribution}}")
    out = {}
    for method, keys in space.items():
        config_class = get_method(method).Config
        if not isinstance(keys, dict) or not keys:
            raise PeftbenchError(f"{path}: field 'search.space.{method}' must map keys to distributions")
        out[method] = {}
        for key, d in keys.items():
            where = f"{path}: field 'search.space.{method}.{key}'"
            section, _, name = str(key).partition(".")
            owner = {"method": config_class, "train": TrainConfig}.get(section)
            hints = typing.get_type_hints(owner) if owner else {}
            if (name.split(".")[0] not in hints or key in BUDGET_KEYS or key == "method.name"
                    or (name.count(".") and not name.startswith("options."))):
                raise PeftbenchError(f"{where}: not a searchable key of method {method} (method.* or train.*, not "
                                     f"the rate, the seed or the training budget: {', '.join(BUDGET_KEYS[2:])})")
            if key in spec["grid"]:
                raise PeftbenchError(f"{where}: the grid sets it too")
            out[method][key] = _distribution(d, hints.get(name), where)
            probes = out[method][key].get("choices") or [out[method][key]["low"], out[method][key]["high"]]
            for value in probes:  # each must make a valid run of the method
                try:
                    resolve(merge({"method": {"name": method}}, nested(key, value)))
                except PeftbenchError as err:
                    raise PeftbenchError(f"{where}: {value!r} does not make a valid run ({err})") from None
    return out


def _distribution(d, hint, where: str) -> dict:
    """A list of values, or ``{low, high[, log]}``: integers where the key is an int (floats where a float)."""
    if isinstance(d, list) and d and all(isinstance(v, (bool, int, float, str)) for v in d):
        return {"choices": d}
    if isinstance(d, dict) and {"low", "high"} <= set(d) <= {"low", "high", "log"}:
        low, high = (yaml_float(d[k], float) for k in ("low", "high"))
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        kinds = set(typing.get_args(hint)) - {type(None)} or {hint}  # ``int | None``: an int where one is set
        integer = kinds == {int} or (hint is None and all(isinstance(v, int) for v in (low, high)))
        log = d.get("log", False)
        if numbers and low <= high and isinstance(log, bool) and (low > 0 or not log):
            if not integer:
                low, high = float(low), float(high)
            return {"low": low, "high": high, "log": log, "int": integer}
    raise PeftbenchError(f"{where} must be a list of values or {{low, high}} (low <= high; log: true needs low > 0), "
                         f"got {d!r}")


def grid_lrs(low: float, high: float, n: int) -> list[float]:
    """``n`` log-spaced learning rates from ``low`` to ``high``, to 3 significant digits (one: the geometric mean)."""
    if n == 1:
        return [float(f"{(low * high) ** 0.5:.3g}")]
    return [min(max(float(f"{low * (high / low) ** (k / (n - 1)):.3g}"), low), high) for k in range(n)]
