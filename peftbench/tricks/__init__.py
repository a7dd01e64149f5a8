"""Training tricks: loop plug-ins, one file each, every one off at its default (``train.*`` keys, docs/tricks.md).

- the objective (what one micro-batch's loss is): label smoothing, R-Drop, distillation from a teacher;
- an adversary (losses back-propagated after the clean one): FGM, PGD;
- an averager (the weights evaluated and saved): EMA, SWA;
- per-layer rates for the optimizer: layer-wise learning-rate decay;
- early stopping, which the recipe decides from the dev history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from peftbench.tricks import distill, label_smoothing, rdrop
from peftbench.tricks.adversarial import Adversary
from peftbench.tricks.averaging import EMA, Averager, SnapshotMean
from peftbench.tricks.distill import Teacher
from peftbench.tricks.layer_decay import layer_scales


def plain_loss(model, batch: dict) -> torch.Tensor:
    """The model's own loss (with any regulariser it adds)."""
    return model(**batch["inputs"], labels=batch["labels"]).loss


@dataclass
class LoopTricks:
    """What the loop calls for each micro-batch: ``objective(model, batch)`` gives the loss to back-propagate,
    then each of ``adversarial_losses(model, batch)`` is back-propagated in turn."""

    objective: Callable = plain_loss
    adversary: Adversary | None = None

    def adversarial_losses(self, model, batch: dict) -> Iterable[torch.Tensor]:
        return self.adversary.losses(model, batch, self.objective) if self.adversary else ()


def objective(smoothing: float, rdrop_alpha: float, teacher: Teacher | None = None) -> Callable:
    """The micro-batch loss with label smoothing, R-Drop and distillation from ``teacher`` as configured (the
    model's own loss when all are off): ``(1 - alpha) * (loss + smoothing term) + alpha * distillation term
    + rdrop_alpha * R-Drop's KL``."""
    if not smoothing and not rdrop_alpha and teacher is None:
        return plain_loss

    def loss(model, batch: dict) -> torch.Tensor:
        inputs, labels = batch["inputs"], batch["labels"]
        if rdrop_alpha:
            inputs, labels = rdrop.doubled(inputs), torch.cat([labels, labels])
        out = model(**inputs, labels=labels)
        total = out.loss
        if smoothing:
            total = total + label_smoothing.smoothing_term(out.logits, labels, smoothing)
        if teacher is not None:
            soft = teacher.logits(batch["inputs"])
            soft = torch.cat([soft, soft]) if rdrop_alpha else soft
            total = (1 - teacher.alpha) * total + teacher.alpha * distill.soft_term(out.logits, soft, labels,
                                                                                   teacher.temperature)
        if rdrop_alpha:
            total = total + rdrop_alpha * rdrop.symmetric_kl(out.logits, labels)
        return total

    return loss


def loop_tricks(t, embedding_model: torch.nn.Module, trained: list[torch.nn.Parameter],
                teacher: torch.nn.Module | None = None) -> LoopTricks:
    """The loop's tricks for train config ``t``; the adversary watches ``embedding_model``'s input embeddings and
    sets aside and restores the gradients of the ``trained`` parameters; ``teacher``: the loaded model of
    ``t.distill.teacher``."""
    adversary = None
    if t.adversarial != "none":
        adversary = Adversary(embedding_model.get_input_embeddings(), trained, t.adversarial, t.adversarial_epsilon,
                              t.adversarial_steps, t.adversarial_alpha)
    distilled = Teacher(teacher, t.distill.temperature, t.distill.alpha) if teacher is not None else None
    return LoopTricks(objective(t.label_smoothing, t.rdrop_alpha, distilled), adversary)


def averager(t, named: dict[str, torch.Tensor]) -> Averager | None:
    """The weight averager of train config ``t`` over the trained tensors ``named`` (this process's), or None."""
    if t.ema_decay:
        return EMA(named, t.ema_decay)
    if t.swa_last:
        return SnapshotMean(named, t.swa_last)
    return None


def should_stop(evaluations: int, best_at: int, patience: int) -> bool:
    """Early stopping: ``patience`` evaluations have passed since the best dev score (evaluation ``best_at``,
    counted from 0) without beating it."""
    return patience > 0 and evaluations - 1 - best_at >= patience


__all__ = ["Adversary", "EMA", "SnapshotMean", "LoopTricks", "Teacher", "averager", "layer_scales", "loop_tricks",
           "objective", "plain_loss", "should_stop"]
