"""Label smoothing (Szegedy et al. 2016): the target puts ``1 - eps`` on the gold class and spreads ``eps`` evenly
over all classes. The smoothed cross-entropy is ``(1 - eps) * nll + eps * mean_c(-log p_c)``, which is the model's
own loss plus ``eps * (mean_c(-log p_c) - nll)``: adding that term keeps any regulariser the model adds to its loss
(AdaLoRA's orthogonality) and equals ``F.cross_entropy(..., label_smoothing=eps)`` on the plain loss."""

from __future__ import annotations

import torch

IGNORED = -100  # labels of positions that take no loss (padding and continued word pieces)


def aligned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token logits cut to the labelled tokens: prompt and P-tuning put their virtual tokens before them."""
    return logits[:, -labels.shape[1]:] if labels.dim() == 2 and logits.shape[1] != labels.shape[1] else logits


def smoothing_term(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """What turns the mean cross-entropy over the labelled positions into the smoothed one."""
    logits = aligned(logits, labels)
    logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    kept = labels != IGNORED
    log_p = torch.log_softmax(logits[kept], dim=-1)
    nll = -log_p.gather(1, labels[kept, None]).squeeze(1)
    return eps * (-log_p.mean(dim=-1) - nll).mean()
