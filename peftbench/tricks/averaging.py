"""Weight averaging: what is evaluated, selected as the best dev state and saved is an average of the trained
parameters (in the method's own format: the same tensors, other values), not the last step's values.

- ``EMA``: an exponential moving average updated after every optimizer step (Polyak & Juditsky 1992), with the
  warm-up of TensorFlow's ``ExponentialMovingAverage``: the decay after ``n`` updates is
  ``min(decay, (1 + n) / (10 + n))``, so that a short fine-tuning run does not average in its initial weights;
- ``SnapshotMean``: SWA's equal-weight mean (Izmailov et al. 2018) of the weights at the last ``k`` evaluations.

The tensors handed in are this process's own (a shard's local tensor under FSDP2); averages are kept in float32."""

from __future__ import annotations

from collections import deque

import torch


class Averager:
    """The trained parameters and their average; ``swap()`` exchanges the two (before and after evaluating)."""

    def __init__(self, named: dict[str, torch.Tensor]):
        self.params = named
        self.average = {n: p.detach().float().clone() for n, p in named.items()}

    def on_optimizer_step(self) -> None:
        """After each optimizer step."""

    def on_eval(self) -> None:
        """Before each evaluation, with the trained (not the averaged) weights in place."""

    @torch.no_grad()
    def swap(self) -> None:
        for name, p in self.params.items():
            mine = p.detach()
            held = mine.float().clone()
            mine.copy_(self.average[name])
            self.average[name] = held

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.average = self._placed(state["average"])

    def _placed(self, average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved average (read onto the CPU) on its parameters' devices."""
        return {n: t.to(self.params[n].device) for n, t in average.items()}


class EMA(Averager):
    def __init__(self, named: dict[str, torch.Tensor], decay: float):
        super().__init__(named)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self.params.items():
            self.average[name].lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"average": self.average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.average, self.updates = self._placed(state["average"]), state["updates"]


class SnapshotMean(Averager):
    def __init__(self, named: dict[str, torch.Tensor], last: int):
        super().__init__(named)
        self.snapshots: deque[dict[str, torch.Tensor]] = deque(maxlen=last)

    @torch.no_grad()
    def on_eval(self) -> None:
        self.snapshots.append({n: p.detach().float().to("cpu", copy=True) for n, p in self.params.items()})
        for name, held in self.average.items():
            held.copy_(torch.stack([s[name] for s in self.snapshots]).mean(dim=0))

    def state_dict(self) -> dict:
        return {"average": self.average, "snapshots": list(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        self.average = self._placed(state["average"])
        self.snapshots.extend(state["snapshots"])
