"""Metrics: accuracy and macro-F1 (as scikit-learn computes them; tests/test_train.py checks) and entity-level
NER scores, all offline."""

from __future__ import annotations

import statistics
from collections import Counter


def classification_metrics(labels: list[int], preds: list[int]) -> dict:
    """Accuracy and macro-F1: the unweighted mean of per-class F1 over the classes present in gold or
    predictions (a class never predicted and never true is left out; an F1 with a zero denominator is 0)."""
    labels, preds = [int(x) for x in labels], [int(x) for x in preds]
    if len(labels) != len(preds) or not labels:
        raise ValueError(f"{len(labels)} labels and {len(preds)} predictions: need as many, and at least one")
    true_pos, n_gold, n_pred = Counter(), Counter(labels), Counter(preds)
    true_pos.update(g for g, p in zip(labels, preds) if g == p)
    classes = n_gold.keys() | n_pred.keys()
    f1 = [2 * true_pos[c] / (n_gold[c] + n_pred[c]) for c in classes]  # 2PR/(P+R) = 2TP/(gold + predicted)
    return {"accuracy": sum(true_pos.values()) / len(labels), "macro_f1": sum(f1) / len(f1), "n_eval": len(labels)}


def entity_metrics(gold: list[list], pred: list[list], types: tuple[str, ...]) -> dict:
    """Entity-level micro precision, recall and F1 over exact (start, end, type) matches (the CLUENER
    metric), plus F1 per type. ``gold`` and ``pred`` hold one list of spans per record."""
    hits, n_gold, n_pred = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred, strict=True):
        g, p = set(g), set(p)
        n_gold.update(s.type for s in g)
        n_pred.update(s.type for s in p)
        hits.update(s.type for s in g & p)

    def f1(h: int, ng: int, np_: int) -> tuple[float, float, float]:
        precision, recall = (h / np_ if np_ else 0.0), (h / ng if ng else 0.0)
        return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)

    precision, recall, f = f1(sum(hits.values()), sum(n_gold.values()), sum(n_pred.values()))
    return {
        "entity_precision": precision, "entity_recall": recall, "entity_f1": f,
        "per_type_f1": {t: f1(hits[t], n_gold[t], n_pred[t])[2] for t in types},
        "n_gold_entities": sum(n_gold.values()), "n_pred_entities": sum(n_pred.values()), "n_eval": len(gold),
    }


def clue_average(scores: dict[str, float]) -> float:
    """The CLUE-style average: the unweighted mean of the tasks' scores (a leaderboard's average column)."""
    if not scores:
        raise ValueError("no task scores to average")
    return statistics.fmean(scores.values())
