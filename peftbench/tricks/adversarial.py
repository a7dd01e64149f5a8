"""Adversarial training on the input embeddings' output: FGM (Miyato et al. 2017) and PGD (Madry et al. 2018).

After the clean backward pass, the output ``e`` of the model's input-embedding module is moved along the gradient
``g`` of the loss with respect to it, and the loss of the moved input is back-propagated too, so that the step
descends on the clean and the adversarial loss together. Per example, with L2 norms over the sequence:

- FGM: ``r = epsilon * g / ||g||``, one extra forward and backward pass;
- PGD: ``steps`` ascent steps ``r <- project_epsilon(r + alpha * g_r / ||g_r||)``; the intermediate passes only find
  the direction (the trained parameters' gradients are set aside and put back before the last one).

The module's output is perturbed, not its weights, so this works with frozen embeddings (every PEFT method)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch


class Adversary:
    """Watches the input-embedding module's output during training forwards and yields the adversarial losses
    for the loop to back-propagate."""

    def __init__(self, embedding: torch.nn.Module, params: list[torch.nn.Parameter], kind: str, epsilon: float,
                 steps: int, alpha: float):
        self.params, self.epsilon = params, epsilon
        self.steps, self.alpha = (1, epsilon) if kind == "fgm" else (steps, alpha)
        self.delta: torch.Tensor | None = None  # added to the embeddings' output in the next training forward
        self.embedded: torch.Tensor | None = None  # the last training forward's embeddings output
        embedding.register_forward_hook(self._watch)

    def _watch(self, module, args, out):
        if not (module.training and torch.is_grad_enabled()):  # evaluation is left alone
            return None
        if self.delta is not None:
            out = out + self.delta
        if out.requires_grad:
            out.retain_grad()
        else:  # frozen embeddings: the output is a leaf of its own
            out.requires_grad_()
        self.embedded = out
        return out

    def losses(self, model, batch: dict, objective: Callable) -> Iterator[torch.Tensor]:
        """The adversarial losses of one micro-batch, each to be back-propagated before the next is asked for;
        the clean loss's backward pass must have run."""
        grad = self.embedded.grad
        kept = [p.grad for p in self.params] if self.steps > 1 else None
        delta = torch.zeros_like(grad)
        for step in range(self.steps):
            delta = _clipped(delta + self.alpha * _unit(grad), self.epsilon)
            if kept is not None:  # the last pass adds to the clean gradients; the others only find the direction
                for p, g in zip(self.params, kept):
                    p.grad = g if step == self.steps - 1 else None
            self.delta = delta.detach()
            try:
                loss = objective(model, batch)
            finally:
                self.delta = None
            yield loss
            grad = self.embedded.grad
        self.embedded = None


def _unit(g: torch.Tensor) -> torch.Tensor:
    """``g`` scaled to norm 1 per example (zero where its norm is zero or not finite: a skipped fp16 step)."""
    norm = g.float().flatten(1).norm(dim=1).view(-1, *[1] * (g.dim() - 1))
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, g / torch.where(ok, norm, 1.0).to(g.dtype), torch.zeros_like(g))


def _clipped(r: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``r`` projected onto the L2 ball of radius ``epsilon``, per example."""
    norm = r.float().flatten(1).norm(dim=1).view(-1, *[1] * (r.dim() - 1))
    return r * torch.clamp(epsilon / norm.clamp_min(1e-12), max=1.0).to(r.dtype)
