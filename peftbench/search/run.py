"""Running a search (trials, then the final seeds at the chosen settings) and describing one (``--dry-run``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from peftbench.claims import Board, FolderBoard
from peftbench.config import dotted
from peftbench.errors import PeftbenchError
from peftbench.loop import process_state
from peftbench.records import RECORD_NAME, read_record
from peftbench.search.spec import FINAL_DIR, SEARCH_DIR, SearchSpec, grid_lrs
from peftbench.search.study import Study
from peftbench.search.trials import choice, next_trial, open_study, settle, stored_studies, study_lock
from peftbench.sweep import Cell, SweepOutcome, agree, comparable_budget, record_status, reusable_here, run_sweep


def run_search(studies_: list[Study], search: SearchSpec, retry_failed: bool = False, runner=None,
               provenance: dict | None = None, board: Board | None = None,
               reuse: dict[str, list[Path]] | None = None) -> tuple[SweepOutcome, list[str], list[str]]:
    """Every study's trials, then its final runs. Returns the outcome, the studies whose last trials run in
    another worker (which runs their final seeds when they end), and the studies whose every trial failed.
    Workers claim cells and lock studies on ``board`` (default: claim files in the study's output folder);
    runs in ``reuse`` (:func:`sweep.reusable`) are copied in instead of run."""
    main = process_state().is_main_process
    outcome, waiting, failed = SweepOutcome(records=[]), [], []
    for study in studies_:  # a variant that is some study's plain run is refused before any trial runs
        _variants(study, search)
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
            tried = run_sweep(cells, retry_failed, runner, provenance, on, reuse)
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
        cells = [Cell(cfg, record_status(cfg), {**final, "variant": name} if name else final)
                 for name, keys in _variants(study, search)
                 for cfg in (study.cell_cfg(FINAL_DIR, {**chosen["settings"], **keys}, seed)
                             for seed in search.final_seeds)]
        outcome.add(run_sweep(cells, retry_failed, runner, provenance, on, reuse))
    return outcome, waiting, failed


def _variants(study: Study, search: SearchSpec) -> list[tuple[str | None, dict]]:
    """A study's final rows: (None, {}) for the plain one, then each ``final.variants`` entry that applies to its
    method, with its ``train.*`` keys."""
    method = study.cfg.method.name
    found = [(name, {k: v for k, v in keys.items() if k != "methods"})
             for name, keys in search.final_variants.items() if method in keys.get("methods", [method])]
    plain = study.cell_cfg(FINAL_DIR, {"lr": 1.0}, 0).run_id
    for name, keys in found:  # against the study's own settings, not the defaults: a recipe may set the key
        if study.cell_cfg(FINAL_DIR, {"lr": 1.0, **keys}, 0).run_id == plain:
            raise PeftbenchError(f"{search.source}: field 'final.variants.{name}': {study.label} already runs with "
                                 f"{', '.join(f'{k}={v}' for k, v in keys.items())}, so it would be its plain run")
    return [(None, {}), *found]


def _to_reuse(study: Study, search: SearchSpec, reuse: dict[str, list[Path]], retry_failed: bool,
              chosen: dict | None = None) -> str:
    """``; to reuse: N search, M final runs``: this study's runs that a source in ``reuse`` holds, that
    :func:`sweep.adopt` would copy (the same run, role and inputs) and that the run would take: not here yet (or
    failed here, with ``retry_failed``). Known ahead for the grid sampler (a trial takes one of its rates); a final
    run counts at any of them until the search has chosen, then at the ``chosen`` settings only."""
    method = study.cfg.method.name
    if not reuse or search.sampler != "grid":
        return ""
    lrs, budget = list(dict.fromkeys(grid_lrs(*search.lr_range(method), search.trials))), search.budget(method)
    role = {"study": study.name, "budget": budget}
    searched = [Cell(study.cell_cfg(SEARCH_DIR, {"lr": lr}, seed), None, {**role, "phase": SEARCH_DIR})
                for lr in lrs for seed in search.seeds]
    final = [Cell(study.cell_cfg(FINAL_DIR, {**settings, **keys}, seed), None,
                  {**role, "phase": FINAL_DIR, **({"variant": name} if search.final_variants else {})})
             for settings in ([chosen] if chosen else [{"lr": lr} for lr in lrs])
             for name, keys in _variants(study, search) for seed in search.final_seeds]
    wanted = (None, "failed") if retry_failed else (None,)
    counts = [sum(record_status(cell.cfg) in wanted and reusable_here(reuse.get(cell.run_id, []), cell)
                  for cell in cells) for cells in (searched, final)]
    return f"; to reuse: {counts[0]} search, {counts[1]} final runs" if any(counts) else ""


def shown(settings: dict) -> str:
    """``lr 0.003, method.r 16``: a trial's settings in a line."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())


def describe(studies_: list[Study], search: SearchSpec, board: Board | None = None,
             reuse: dict[str, list[Path]] | None = None, retry_failed: bool = False) -> list[str]:
    """One line per study: its trials so far, the chosen settings and the runs it will copy from ``reuse``
    (``--dry-run``)."""
    lines = []
    db = search.storage.removeprefix("sqlite:///")
    if db != search.storage and not Path(db).is_file():  # a fresh clone: the database is not kept with the records
        return [line + _to_reuse(study, search, reuse or {}, retry_failed, settings)
                for study, (line, settings) in zip(studies_, _describe_from_records(studies_, search), strict=True)]
    stored = stored_studies(search)  # a study not started yet is read from its records, not created by a dry run
    unstarted = [study for study in studies_ if study.name not in stored]
    from_records = dict(zip((s.name for s in unstarted), _describe_from_records(unstarted, search), strict=True))
    for study in studies_:
        if study.name in from_records:
            line, settings = from_records[study.name]
            lines.append(line + _to_reuse(study, search, reuse or {}, retry_failed, settings))
            continue
        optuna_study = open_study(study, search, board)
        trials = optuna_study.get_trials(deepcopy=False)
        tried = "; ".join(shown(t.params) + (f"={t.value:.4f}" if t.value is not None else f" {t.state.name}")
                          for t in trials if "lr" in t.params)
        chosen = choice(optuna_study, search)
        settings = None if not chosen or chosen["lr"] is None else chosen["settings"]
        pick = f"; chosen {shown(settings)}" if settings else ""
        lines.append(f"{study.label}: {len(trials)}/{search.trials} trials [{tried}]{pick}"
                     + _to_reuse(study, search, reuse or {}, retry_failed, settings))
    return lines


def _describe_from_records(studies_: list[Study], search: SearchSpec) -> list[tuple[str, dict | None]]:
    """``describe`` without the search database: each study's trials read back from its search records (each
    names its study and budget), so a copied or cloned sweep shows what it holds. A trial is a set of searched
    settings (trial numbers belong to one database) and counts once each search seed has a record; records of
    another budget and runs cut short from outside (still to do) are left out. A run rebuilds the database
    from the same records: a grid asks the same settings again and finds their records. Each line comes with
    the chosen settings (None before the search is complete)."""
    by_name = {study.name: study for study in studies_}
    found: dict[str, dict[str, dict]] = {}  # study -> settings -> {"order", "settings", "runs": {seed: record}}
    folders = {study.output_dir / SEARCH_DIR for study in studies_}
    for path in sorted(p for folder in folders for p in folder.glob(f"*/{RECORD_NAME}")):
        try:
            record = read_record(path)
        except (PeftbenchError, OSError):
            continue
        made = record.get("provenance")
        study = by_name.get(made.get("study")) if isinstance(made, dict) else None
        if study is None or record.get("interrupted") or \
                comparable_budget(made.get("budget")) != comparable_budget(search.budget(study.cfg.method.name)):
            continue
        settings = {"lr": record["config"]["train"]["lr"],
                    **{k: dotted(record["config"], k) for k in search.space.get(study.cfg.method.name, {})}}
        trial = found.setdefault(study.name, {}).setdefault(
            json.dumps(settings, sort_keys=True), {"order": made.get("trial"), "settings": settings, "runs": {}})
        trial["runs"][record["config"]["train"]["seed"]] = record
    lines = []
    for study in studies_:
        complete = [t for t in found.get(study.name, {}).values() if set(search.seeds) <= set(t["runs"])]
        trials = sorted(complete, key=lambda t: (t["order"] if isinstance(t["order"], int) else search.trials,
                                                 t["settings"]["lr"]))
        scored = [(t["settings"], statistics.fmean(t["runs"][seed]["metrics"]["score"] for seed in search.seeds)
                   if all(t["runs"][seed]["status"] == "success" for seed in search.seeds) else None) for t in trials]
        tried = "; ".join(shown(settings) + (f"={score:.4f}" if score is not None else " FAIL")
                          for settings, score in scored)
        done = [(score, -settings["lr"], settings) for settings, score in scored if score is not None]
        chosen = max(done, key=lambda d: d[:2])[2] if len(trials) >= search.trials and done else None
        pick = f"; chosen {shown(chosen)}" if chosen else ""
        lines.append((f"{study.label}: {len(trials)}/{search.trials} trials [{tried}]{pick} (from its records)",
                      chosen))
    return lines

