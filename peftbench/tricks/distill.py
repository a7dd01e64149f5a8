"""Knowledge distillation (Hinton et al. 2015): the student also learns the teacher's softened predictions.

The loss is ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
the KL averaged over examples (tokens with a label, for token classification); ``T^2`` keeps the soft term's
gradients on the scale of the hard one's as ``T`` grows. The teacher is a fine-tuned checkpoint of the same task
and tokenizer (any method, any backbone of that tokenizer), frozen and in eval mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftbench.tricks.label_smoothing import IGNORED, aligned


def soft_term(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the softened distributions, over the positions that take a loss."""
    kept = labels.reshape(-1) != IGNORED
    s, t = (aligned(x, labels).float().reshape(-1, x.shape[-1])[kept] / temperature for x in (student, teacher))
    return temperature ** 2 * F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                       reduction="batchmean")


class Teacher:
    """A frozen model whose logits for a batch's inputs the objective asks for."""

    def __init__(self, model: torch.nn.Module, temperature: float, alpha: float):
        self.model, self.temperature, self.alpha = model.eval().requires_grad_(False), temperature, alpha
        self._last: tuple[dict, torch.Tensor] | None = None

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        """The teacher's logits for ``inputs``; the adversarial passes of a micro-batch reuse the clean pass's."""
        if self._last is None or self._last[0] is not inputs:
            self._last = (inputs, self.model(**inputs).logits)
        return self._last[1]
