"""Metrics: classification (scikit-learn) and entity-level NER scores, all offline."""

from __future__ import annotations

from collections import Counter


def classification_metrics(labels: list[int], preds: list[int]) -> dict:
    """Accuracy and macro-F1 (over the classes present in gold or predictions)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "n_eval": len(labels),
    }


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
