"""Learning-rate search with the same budget for every method: a sweep's ``search`` and ``final`` sections.

    search:
      trials: 4                       # settings tried per (task, method): the same for every method
      lr: {full: [1e-5, 1e-3]}        # log range per method; others: the method's default (docs/methods/<name>.md)
      space:                          # more searched keys per method (optional; the sampler must then be tpe)
        lora: {method.r: [4, 8, 16], train.warmup_ratio: {low: 0.0, high: 0.1}}
      seeds: [1]                      # seeds per trial; a trial's value is its mean dev score
      sampler: grid                   # grid: log-spaced points, deterministic | tpe: Optuna's TPE
      storage: null                   # SQLAlchemy URL; default: the sweep's, else sqlite:///<output_dir>/search.db
    final:
      seeds: [1, 2, 3]                # fresh runs at the settings with the best mean dev score
      variants:                       # optional: each also runs at those settings, with its train.* keys set
        cosine: {train.scheduler: cosine}
        llrd: {train.layer_decay: 0.8, methods: [full, lora]}   # methods: only these (default: every one)

A ``space`` key is any ``method.*`` or ``train.*`` key but the rate, the seed and the training budget
(``method.options.r`` for a PEFT tuner's own option); its distribution is a list (one of these values) or
``{low, high}`` (integers for an integer key, log-spaced with ``log: true``).

A *study* is a grid cell without its searched keys and seed: one (task, method, settings). Each is an Optuna
study in ``storage`` with exactly ``trials`` trials. A trial's runs are ordinary sweep cells (records under
``output_dir/search/``, dev only: no test score, no checkpoint); once every trial of a study has finished,
the final runs at the chosen settings go to ``output_dir/final/``. Each record's ``provenance`` says its
phase, study, trial and budget. Optuna holds what is shared between workers (the settings each trial
drew, which trials are done); the records hold the results, and the tables read only the records. With a
database storage (``search.storage`` or the sweep's ``storage``), cell claims, study locks and each run's
outcome go through that database too (:mod:`peftbench.claims`), so workers need not share a folder.
"""

from __future__ import annotations

import copy
import statistics
import typing
from dataclasses import dataclass, field
from pathlib import Path

from peftbench import sweep
from peftbench.claims import Board, FolderBoard
from peftbench.config import RunConfig, TrainConfig, dotted, resolve, yaml_float
from peftbench.errors import PeftbenchError
from peftbench.loop import process_state
from peftbench.methods import get_method
from peftbench.records import RECORD_NAME, read_record
from peftbench.sweep import (
    MAX_CELLS,
    VARIANTS,
    Cell,
    SweepOutcome,
    agree,
    cell_outcome,
    expand,
    record_status,
    run_sweep,
)

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
            tree: dict = {}
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
            try:
                resolved = resolve(tree)
            except PeftbenchError as err:
                raise PeftbenchError(f"{where}: {value!r} does not make a valid run ({err})") from None
            if resolved.to_dict() == resolve({}).to_dict():
                raise PeftbenchError(f"{where}: {value!r} is its default, which changes nothing")
    return variants


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
                tree = {"method": {"name": method}}
                node = tree.setdefault(section, {})
                *parents, leaf = name.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
                try:
                    resolve(tree)
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
        integer = hint is int or (hint is None and all(isinstance(v, int) for v in (low, high)))
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
            for key, value in searched.items():
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


def _optuna():
    try:
        import optuna
    except ImportError:
        raise PeftbenchError("a sweep with a 'search' section needs Optuna: pip install 'peftbench[tuning]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    return optuna


def _grid_sampler_class():
    optuna = _optuna()

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, asked and told by hand: the budget is counted here, so it need not stop an
        ``optimize`` loop (there is none) when the grid is used up."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler


def open_study(study: Study, search: SearchSpec, board: Board | None = None):
    optuna = _optuna()
    if search.storage.startswith("sqlite:///"):
        Path(search.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    low, high = search.lr_range(study.cfg.method.name)
    if search.sampler == "grid":
        sampler = _grid_sampler_class()({"lr": grid_lrs(low, high, search.trials)}, seed=0)
    else:
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=max(1, search.trials // 2))
    with (board or FolderBoard(study.output_dir)).hold("search-storage"):  # one worker creates the tables
        optuna_study = optuna.create_study(storage=search.storage, study_name=study.name, direction="maximize",
                                           sampler=sampler, load_if_exists=True)
        _same_budget(optuna_study, study, search)
    return optuna_study


def _same_budget(optuna_study, study: Study, search: SearchSpec) -> None:
    """A study keeps the budget it was started with (rates, trials, sampler, seeds): a sweep edited since would
    otherwise choose among the old trials and label the result with the new budget. Final seeds may grow."""
    budget = {k: v for k, v in search.budget(study.cfg.method.name).items() if k != "final_seeds"}
    started = optuna_study.user_attrs.get("budget")
    if started is None:
        optuna_study.set_user_attr("budget", budget)
        return
    changed = sorted(k for k in set(budget) | set(started) if budget.get(k) != started.get(k))
    if changed:
        key = changed[0]
        raise PeftbenchError(
            f"{search.source}: field 'search' sets {key} {budget.get(key)!r} for {study.name}, but its search in "
            f"{search.storage} ran with {started.get(key)!r}; restore it, or give the changed search a new "
            "output_dir (or search.storage)")


def study_lock(study: Study, board: Board):
    """Hold ``study`` alone while looking at and adding to its trials."""
    return board.hold(f"study-{study.name}")


def _trial_outcomes(study: Study, search: SearchSpec, settings: dict, board: Board) -> list[dict] | None:
    """The outcomes (status, score) of a trial's runs, or None while any is missing or was cut short from
    outside (it runs again)."""
    outcomes = [cell_outcome(study.cell_cfg(SEARCH_DIR, settings, seed), board) for seed in search.seeds]
    return None if any(o is None for o in outcomes) else outcomes


def settle(optuna_study, study: Study, search: SearchSpec, board: Board) -> None:
    """Tell Optuna the value (mean dev score) of every running trial whose runs all have records; a trial
    with a failed run fails (a learning rate that diverges has been tried: it counts in the budget)."""
    from optuna.trial import TrialState

    for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not search.drawn(trial, study.cfg.method.name):  # not drawn yet (next_trial draws it)
            continue
        outcomes = _trial_outcomes(study, search, trial.params, board)
        if outcomes is None:
            continue
        if all(o["status"] == "success" for o in outcomes):
            optuna_study.tell(trial.number, statistics.fmean(o["score"] for o in outcomes),
                              skip_if_finished=True)
        else:
            optuna_study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def next_trial(optuna_study, study: Study, search: SearchSpec, attempted: set[int],
               board: Board) -> tuple[int, dict] | None:
    """(trial number, settings) to work on: a running trial not yet attempted by this worker (another
    worker's, or a killed one's), else a new trial while the study has fewer than ``trials``; None when done."""
    from optuna.trial import TrialState

    method = study.cfg.method.name
    with study_lock(study, board):
        settle(optuna_study, study, search, board)
        trials = optuna_study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state == TrialState.RUNNING and trial.number not in attempted:
                if search.drawn(trial, method):
                    return trial.number, dict(trial.params)
                # a worker died between asking for the trial and drawing its settings: draw them now
                return trial.number, search.suggest(_optuna().Trial(optuna_study, trial._trial_id), method)
        if len(trials) >= search.trials:
            return None
        trial = optuna_study.ask()
        return trial.number, search.suggest(trial, method)


def choice(optuna_study, search: SearchSpec) -> dict | None:
    """The chosen trial once every trial has finished: ``{"trial", "lr", "settings", "dev_score"}`` (``trial``
    None when every trial failed); None while trials are missing or running."""
    from optuna.trial import TrialState

    trials = optuna_study.get_trials(deepcopy=False)
    if len(trials) < search.trials or any(not t.state.is_finished() for t in trials):
        return None
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return {"trial": None, "lr": None, "settings": None, "dev_score": None}
    best = max(done, key=lambda t: (t.value, -t.params["lr"]))  # a tie goes to the smaller learning rate
    return {"trial": best.number, "lr": best.params["lr"], "settings": dict(best.params), "dev_score": best.value}


def run_search(studies_: list[Study], search: SearchSpec, retry_failed: bool = False, runner=None,
               provenance: dict | None = None, board: Board | None = None) -> tuple[SweepOutcome, list[str], list[str]]:
    """Every study's trials, then its final runs. Returns the outcome, the studies whose last trials run in
    another worker (which runs their final seeds when they end), and the studies whose every trial failed.
    Workers claim cells and lock studies on ``board`` (default: claim files in the study's output folder)."""
    main = process_state().is_main_process
    outcome, waiting, failed = SweepOutcome(records=[]), [], []
    for study in studies_:
        method = study.cfg.method.name
        on = board or FolderBoard(study.output_dir)
        optuna_study = open_study(study, search, on) if main else None
        attempted: set[int] = set()
        refused_before = outcome.refused
        while (trial := agree(next_trial(optuna_study, study, search, attempted, on) if main else None)) is not None:
            number, settings = trial
            attempted.add(number)
            if main:
                print(f"{study.label}: trial {number + 1}/{search.trials}, {shown(settings)}", flush=True)
            cells = [Cell(cfg, record_status(cfg), {"phase": SEARCH_DIR, "study": study.name, "trial": number,
                                                    "budget": search.budget(method)})
                     for cfg in (study.cell_cfg(SEARCH_DIR, settings, seed) for seed in search.seeds)]
            tried = run_sweep(cells, retry_failed, runner, provenance, on)
            tried.failed_trials, tried.failed = tried.failed, 0
            outcome.add(tried)
        if main:
            with study_lock(study, on):
                settle(optuna_study, study, search, on)
        chosen = agree(choice(optuna_study, search) if main else None)
        if not search.final_seeds:
            continue
        if outcome.refused > refused_before:  # its input is bad (the refusals say why): mend it, run again
            continue
        if chosen is None or chosen["trial"] is None:
            (waiting if chosen is None else failed).append(study.label)
            continue
        if main:
            print(f"{study.name}: {shown(chosen['settings'])} chosen (trial {chosen['trial'] + 1}, mean dev "
                  f"{chosen['dev_score']:.4f}); final seeds {search.final_seeds}", flush=True)
        final = {"phase": FINAL_DIR, "study": study.name, "trial": chosen["trial"], "chosen_lr": chosen["lr"],
                 "search_dev_score": chosen["dev_score"], "budget": search.budget(method)}
        if len(chosen["settings"]) > 1:
            final["chosen_settings"] = {k: v for k, v in chosen["settings"].items() if k != "lr"}
        if search.final_variants:  # the plain row is the variant None
            final["variant"] = None
        variants = [(name, {k: v for k, v in keys.items() if k != "methods"})
                    for name, keys in search.final_variants.items() if method in keys.get("methods", [method])]
        cells = [Cell(cfg, record_status(cfg), {**final, "variant": name} if name else final)
                 for name, keys in [(None, {}), *variants]
                 for cfg in (study.cell_cfg(FINAL_DIR, {**chosen["settings"], **keys}, seed)
                             for seed in search.final_seeds)]
        outcome.add(run_sweep(cells, retry_failed, runner, provenance, on))
    return outcome, waiting, failed


def shown(settings: dict) -> str:
    """``lr 0.003, method.r 16``: a trial's settings in a line."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())


def describe(studies_: list[Study], search: SearchSpec, board: Board | None = None) -> list[str]:
    """One line per study: its trials so far and the chosen settings (``--dry-run``)."""
    lines = []
    db = search.storage.removeprefix("sqlite:///")
    if db != search.storage and not Path(db).is_file():  # a fresh clone: the database is not kept with the records
        return _describe_from_records(studies_, search)
    for study in studies_:
        optuna_study = open_study(study, search, board)
        trials = optuna_study.get_trials(deepcopy=False)
        tried = "; ".join(shown(t.params) + (f"={t.value:.4f}" if t.value is not None else f" {t.state.name}")
                          for t in trials if "lr" in t.params)
        chosen = choice(optuna_study, search)
        pick = "" if not chosen or chosen["lr"] is None else f"; chosen {shown(chosen['settings'])}"
        lines.append(f"{study.label}: {len(trials)}/{search.trials} trials [{tried}]{pick}")
    return lines


def _describe_from_records(studies_: list[Study], search: SearchSpec) -> list[str]:
    """``describe`` without the search database: each study's trials read back from its search records (which
    name their study and trial), so a copied or cloned sweep shows what it holds; a trial counts once every
    search seed has a record. The sweep itself rebuilds the database from the same records when it runs."""
    found: dict[str, dict[int, list[dict]]] = {}
    folders = {study.output_dir / SEARCH_DIR for study in studies_}
    for path in sorted(p for folder in folders for p in folder.glob(f"*/{RECORD_NAME}")):
        try:
            record = read_record(path)
        except PeftbenchError:
            continue
        made = record.get("provenance") or {}
        if isinstance(made.get("study"), str) and isinstance(made.get("trial"), int):
            found.setdefault(made["study"], {}).setdefault(made["trial"], []).append(record)
    lines = []
    for study in studies_:
        keys = list(search.space.get(study.cfg.method.name, {}))
        trials = [runs for _, runs in sorted(found.get(study.name, {}).items()) if len(runs) == len(search.seeds)]
        scored = [({"lr": runs[0]["config"]["train"]["lr"], **{k: dotted(runs[0]["config"], k) for k in keys}},
                   statistics.fmean(r["metrics"]["score"] for r in runs)
                   if all(r["status"] == "success" for r in runs) else None) for runs in trials]
        tried = "; ".join(shown(settings) + (f"={score:.4f}" if score is not None else " FAIL")
                          for settings, score in scored)
        done = [(score, -settings["lr"], settings) for settings, score in scored if score is not None]
        pick = f"; chosen {shown(max(done, key=lambda d: d[:2])[2])}" if len(trials) >= search.trials and done else ""
        lines.append(f"{study.label}: {len(trials)}/{search.trials} trials [{tried}]{pick} (from its records)")
    return lines
