"""The Optuna side: a study's storage and sampler, its next trial, the trials' values, the chosen one."""

from __future__ import annotations

import statistics
from pathlib import Path

from peftbench.claims import Board, FolderBoard
from peftbench.errors import PeftbenchError
from peftbench.search.spec import SEARCH_DIR, SearchSpec, grid_lrs
from peftbench.search.study import Study
from peftbench.sweep import cell_outcome, comparable_budget


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
        sampler = _tpe(search, 0)
    with (board or FolderBoard(study.output_dir)).hold("search-storage"):  # one worker creates the tables
        optuna_study = optuna.create_study(storage=search.storage, study_name=study.name, direction="maximize",
                                           sampler=sampler, load_if_exists=True)
        _same_budget(optuna_study, study, search)
    return optuna_study


def stored_studies(search: SearchSpec) -> set[str]:
    """The names of the studies the search's database holds (none is created)."""
    return set(_optuna().study.get_all_study_names(search.storage))


def _tpe(search: SearchSpec, seed: int):
    return _optuna().samplers.TPESampler(seed=seed, n_startup_trials=max(1, search.trials // 2))


def _same_budget(optuna_study, study: Study, search: SearchSpec) -> None:
    """A study keeps the budget it was started with (rates, trials, sampler, seeds): a sweep edited since would
    otherwise choose among the old trials and label the result with the new budget. Final seeds may grow."""
    budget = comparable_budget(search.budget(study.cfg.method.name))
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
        if search.sampler == "tpe":  # seeded by the trial's number: a new worker, or a restart, draws anew
            optuna_study.sampler = _tpe(search, len(trials))  # instead of repeating trial 0's settings
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
