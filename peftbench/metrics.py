"""Classification metrics, computed offline with scikit-learn."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(labels: list[int], preds: list[int]) -> dict:
    """Accuracy and macro-F1 (over the classes present in gold or predictions)."""
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "n_eval": len(labels),
    }
