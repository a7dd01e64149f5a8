"""Which differences a table marks (★ best, ☆ not significantly worse), and PEFT-Bench's PSCP."""

from __future__ import annotations

import functools
import math
import statistics
import warnings

from peftbench.leaderboard.grouping import Group, Row, Scores

ALPHA = 0.05
MIN_SEEDS_FOR_TEST = 3
# PEFT-Bench's PSCP (Belanec et al. 2025, arXiv:2511.21285): score x (1 + M/C)^-beta per cost, with its constants
PSCP_C = {"params": 5e8, "tflops": 10.0, "memory_gb": 94.0}
PSCP_BETA = {"params": 1.0, "tflops": 1.0, "memory_gb": 1.0}


RESAMPLES = 1000  # bootstrap resamples of examples and seeds together


def significance(group: Group) -> dict[tuple[str, str], str]:
    """(row label, task) -> '★' for the best mean, '☆' for rows not significantly worse (two-sided, p >= ALPHA):
    a paired bootstrap over the evaluated examples and the seeds together where every run of both rows holds
    its per-example results on the same examples (:func:`paired_bootstrap_p`), else Welch's t-test over seeds."""
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
            paired = examples(group, best, task), examples(group, row, task)
            if paired[0] is not None and paired[1] is not None and paired[0][0] == paired[1][0]:
                p = paired_bootstrap_p(paired[0][1], paired[1][1], paired[0][2])
            else:
                p = welch_p(best.cells[task].scores, row.cells[task].scores)
            if p >= ALPHA:
                marks[(row.label, task)] = "☆"
    return marks


def welch_p(a: list[float], b: list[float]) -> float:
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # identical seeds (a constant cell) are handled just below
        warnings.simplefilter("ignore", RuntimeWarning)
        p = ttest_ind(a, b, equal_var=False).pvalue
    if math.isnan(p):  # both without variance
        p = 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return p


def examples(group: Group, row: Row, task: str):
    """(examples' digest, per-seed per-example array, metric) of a cell's successful runs on the table's split,
    or None where a run lacks them or the runs were scored on other examples."""
    import numpy as np

    split, found = group.split[task], []
    for r in row.records:
        if group.task_of(r) != task or r["status"] != "success" or r.get("interrupted"):
            continue
        part = (r.get("per_example") or {}).get(split)
        if part is None:
            return None
        found.append(part)
    if not found or len({(p["ids_sha256"], p["metric"]) for p in found}) != 1:
        return None
    metric = found[0]["metric"]
    values = [[int(c) for c in p["values"]] if metric == "accuracy" else p["values"] for p in found]
    return found[0]["ids_sha256"], np.asarray(values, dtype=np.float64), metric


def _scores(values, weights, metric: str):
    """Each seed's score on examples weighted by how often a resample drew them: ``values`` is (seeds, n) for
    accuracy, (seeds, n, 3) hit/predicted-only/gold-only counts for entity F1; ``weights`` is (resamples, n)."""
    import numpy as np

    if metric == "accuracy":
        return weights @ values.T / weights.sum(axis=1, keepdims=True)  # (resamples, seeds)
    hits, pred_only, gold_only = (np.einsum("rn,sn->rs", weights, values[:, :, k]) for k in range(3))
    denominator = 2 * hits + pred_only + gold_only
    return np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)


def _resampling(n: int):
    """(weights, rng): how often each of ``n`` examples is drawn in each of ``RESAMPLES`` resamples, (resamples, n),
    drawn from a generator seeded 0, and that generator as the drawing leaves it (for the seeds' resampling)."""
    import numpy as np

    weights, state = _drawn(n)
    rng = np.random.default_rng(0)
    rng.bit_generator.state = state
    return weights, rng


@functools.lru_cache(maxsize=8)
def _drawn(n: int):
    """The weights of :func:`_resampling` and the generator's state after them: the same for every cell of ``n``
    examples, so a page draws them once per size (read-only)."""
    import numpy as np

    rng = np.random.default_rng(0)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(RESAMPLES)]).astype(np.float64)
    weights.flags.writeable = False
    return weights, rng.bit_generator.state


def _resampled_means(values, metric: str, weights, rng):
    """The cell's mean over resampled seeds for each resample of the examples."""
    import numpy as np

    per_seed = _scores(values, weights, metric)
    seeds = rng.integers(0, values.shape[0], size=per_seed.shape)
    return np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)


def paired_bootstrap_p(a, b, metric: str) -> float:
    """Two-sided p-value of mean(a) = mean(b): both cells' seed means recomputed on the same resamples of the
    examples (paired), each with its seeds resampled too (Dror et al. 2018; Bouthillier et al. 2021)."""
    weights, rng = _resampling(a.shape[1])
    diff = _resampled_means(a, metric, weights, rng) - _resampled_means(b, metric, weights, rng)
    return float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))


def difference(group: Group, row: Row, reference: Row, task: str) -> dict | None:
    """``row``'s mean minus ``reference``'s on ``task``, with a 95 % interval and a two-sided p-value: a paired
    bootstrap over the evaluated examples and the seeds where every run of both holds per-example results on
    the same examples, else Welch's t over seeds (>= 2 each); None where neither applies."""
    import numpy as np

    cells = row.cells.get(task, Scores()), reference.cells.get(task, Scores())
    if not cells[0].scores or not cells[1].scores:
        return None
    diff = cells[0].mean - cells[1].mean
    paired = examples(group, row, task), examples(group, reference, task)
    if paired[0] is not None and paired[1] is not None and paired[0][0] == paired[1][0]:
        weights, rng = _resampling(paired[0][1].shape[1])
        resampled = (_resampled_means(paired[0][1], paired[0][2], weights, rng)
                     - _resampled_means(paired[1][1], paired[1][2], weights, rng))
        low, high = np.quantile(resampled, [0.025, 0.975])
        p = float(min(1.0, 2 * min((resampled <= 0).mean(), (resampled >= 0).mean())))
        return {"diff": diff, "low": float(low), "high": float(high), "p": p, "test": "paired bootstrap"}
    if min(len(c.scores) for c in cells) < 2:
        return None
    from scipy.stats import t as student

    (a, b) = (np.asarray(c.scores, dtype=np.float64) for c in cells)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return {"diff": diff, "low": diff, "high": diff, "p": 1.0 if diff == 0 else 0.0, "test": "welch"}
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(student.ppf(0.975, dof) * math.sqrt(va + vb))
    return {"diff": diff, "low": diff - half, "high": diff + half, "p": welch_p(list(a), list(b)), "test": "welch"}


def interval(group: Group, row: Row, task: str) -> tuple[float, float] | None:
    """95 % bootstrap interval of a cell's mean over examples and seeds (None without per-example results)."""
    import numpy as np

    found = examples(group, row, task)
    if found is None:
        return None
    _, values, metric = found
    weights, rng = _resampling(values.shape[1])
    low, high = np.quantile(_resampled_means(values, metric, weights, rng), [0.025, 0.975])
    return float(low), float(high)


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
