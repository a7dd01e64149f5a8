"""Which differences a table marks (★ best, ☆ not significantly worse), and PEFT-Bench's PSCP."""

from __future__ import annotations

import math
import statistics
import warnings

from peftbench.leaderboard.grouping import Group, Row, Scores

ALPHA = 0.05
MIN_SEEDS_FOR_TEST = 3
# PEFT-Bench's PSCP (Belanec et al. 2025, arXiv:2511.21285): score x (1 + M/C)^-beta per cost, with its constants
PSCP_C = {"params": 5e8, "tflops": 10.0, "memory_gb": 94.0}
PSCP_BETA = {"params": 1.0, "tflops": 1.0, "memory_gb": 1.0}


def significance(group: Group) -> dict[tuple[str, str], str]:
    """(row label, task) -> '★' for the best mean, '☆' for rows not significantly worse (Welch, p >= ALPHA)."""
    from scipy.stats import ttest_ind

    marks = {}
    if group.random_init:
        return marks
    for task in group.tasks:
        candidates = [row for row in group.rows.values()
                      if len(row.cells.get(task, Scores()).scores) >= MIN_SEEDS_FOR_TEST]
        if len(candidates) < 2:
            continue
        best = max(candidates, key=lambda row: (row.cells[task].mean, row.label))
        marks[(best.label, task)] = "★"
        for row in candidates:
            if row is best:
                continue
            a, b = best.cells[task].scores, row.cells[task].scores
            with warnings.catch_warnings():  # identical seeds (a constant cell) are handled just below
                warnings.simplefilter("ignore", RuntimeWarning)
                p = ttest_ind(a, b, equal_var=False).pvalue
            if math.isnan(p):  # both without variance
                p = 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
            if p >= ALPHA:
                marks[(row.label, task)] = "☆"
    return marks


def pscp(row: Row, tasks: list[str]) -> float | None:
    """PEFT-Bench's PSCP of a row: its average score (%) times a soft penalty per cost, (1 + M/C)^-beta, for
    trainable parameters, extra inference TFLOPs per sample over the plain backbone, and peak training
    memory (GiB); None when the row lacks a task or a cost."""
    means = [row.cells[t].mean if t in row.cells else None for t in tasks]
    served, base = row.mean_of("inference", "flops_per_sample"), row.mean_of("inference", "base_flops_per_sample")
    costs = {"params": row.mean_of("params", "trainable"), "memory_gb": row.mean_of("metrics", "peak_memory_mb"),
             "tflops": None if served is None or base is None else max(served - base, 0.0) / 1e12}
    if any(m is None for m in means) or any(c is None for c in costs.values()):
        return None
    costs["memory_gb"] /= 1024
    return 100 * statistics.fmean(means) * math.prod((1 + costs[k] / PSCP_C[k]) ** -PSCP_BETA[k] for k in costs)
