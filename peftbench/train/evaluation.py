"""Scoring a model on one split, exactly (the padding samples of the last batch dropped) and with a divergence
check."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator

from peftbench.errors import DivergedError
from peftbench.measure import synchronize
from peftbench.tasks import TaskData


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator, task: TaskData, split: str):
    """Metrics over exactly the split (``gather_for_metrics`` drops the padding samples of the last batch),
    with ``score``, the task's headline metric (accuracy; entity F1 for token classification).

    Returns (metrics, ids, predictions) in the loader's order: class indices, or span lists.
    """
    model.eval()
    synchronize(accelerator.device)
    start = time.perf_counter()
    kind, rows, finite = task.spec.kind, [], torch.ones((), dtype=torch.bool, device=accelerator.device)
    for batch in loader:
        logits = model(**batch["inputs"]).logits
        finite &= logits.isfinite().all()
        rows.append(kind.gather(accelerator, logits, batch))
    synchronize(accelerator.device)
    seconds = time.perf_counter() - start
    model.train()
    if not accelerator.reduce(finite.to(torch.int32), "sum").item() == accelerator.num_processes:
        raise DivergedError(f"diverged: {split} logits are not finite")
    metrics, ids, preds = kind.score(rows, task.spec, task.splits[split])
    metrics["eval_samples_per_s"] = len(ids) / seconds
    return metrics, ids, preds
