"""R-Drop (Liang et al. 2021): every batch goes through the model twice with independent dropout masks (as one
batch of twice the size) and the loss adds ``alpha`` times the symmetric KL divergence between the two predicted
distributions, averaged over examples (tokens, for token classification) that take a loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftbench.tricks.label_smoothing import IGNORED, aligned


def doubled(batch: dict) -> dict:
    """The batch twice over, one copy after the other."""
    return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def symmetric_kl(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(KL(p1 || p2) + KL(p2 || p1)) / 2`` between the first and second half of a doubled batch's predictions."""
    first, second = aligned(logits, labels).float().chunk(2)
    kept = labels.chunk(2)[0].reshape(-1) != IGNORED
    p, q = (torch.log_softmax(x.reshape(-1, x.shape[-1])[kept], dim=-1) for x in (first, second))
    return 0.5 * (F.kl_div(q, p, log_target=True, reduction="batchmean")
                  + F.kl_div(p, q, log_target=True, reduction="batchmean"))
