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

from peftbench.search.run import describe, run_search, shown
from peftbench.search.spec import (
                                   BUDGET_KEYS,
                                   FINAL_DIR,
                                   SAMPLERS,
                                   SEARCH_DIR,
                                   SEARCH_KEYS,
                                   SearchSpec,
                                   grid_lrs,
                                   read_search,
                                   read_space,
                                   read_sweep,
                                   read_variants,
)
from peftbench.search.study import Study, studies
from peftbench.search.trials import choice, next_trial, open_study, settle, study_lock

__all__ = ["BUDGET_KEYS", "FINAL_DIR", "SAMPLERS", "SEARCH_DIR", "SEARCH_KEYS", "SearchSpec", "Study", "choice",
           "describe", "grid_lrs", "next_trial", "open_study", "read_search", "read_space", "read_sweep",
           "read_variants", "run_search", "settle", "shown", "studies", "study_lock"]
