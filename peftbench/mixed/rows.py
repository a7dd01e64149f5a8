"""A batch's rows and what their adapters have at one place of the backbone, gathered per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from peftbench.mixed.slots import Slot

if TYPE_CHECKING:
    from peftbench.mixed.base import SharedBase


@dataclass
class Gathered:
    """What the batch's adapters have at one place: ``rows`` (the batch rows that have it; None: every row) and
    ``values``, one tensor per item with a leading row dimension, or, when one adapter serves every row
    (``single``), that adapter's own tensors."""

    rows: torch.Tensor | None
    values: tuple
    single: bool = False

    def add_to(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return y + delta if self.rows is None else y.index_add(0, self.rows, delta)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rows is None else x.index_select(0, self.rows)

    def replace(self, y: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return part if self.rows is None else y.index_copy(0, self.rows, part)


class Rows:
    """A batch's rows: ``index`` (B,) into ``slots``, the batch's distinct adapters, on ``owner``."""

    def __init__(self, owner: SharedBase, slots: list[Slot], order: list[int], device: torch.device):
        """``order``: each row's position in ``slots``, kept on the host so that choosing rows reads no device."""
        self.owner, self.slots, self.order = owner, slots, order
        self.index = torch.tensor(order, device=device)
        self.present = {table: set().union(*(getattr(s, table) for s in slots)) for table in PAD_DIMS}
        self.cache: dict[tuple, Gathered | None] = {}

    def gather(self, table: str, site: str, activation: str | None = None) -> Gathered | None:
        """The values of ``table[site]`` for the rows whose adapter has one (bottleneck adapters: those with
        ``activation``), padded to one shape where sizes differ (zeros: no effect); None when no row has one."""
        if site not in self.present[table]:
            return None
        key = (table, site, activation)
        if key not in self.cache:
            self.cache[key] = self._gather(table, site, activation)
        return self.cache[key]

    def _gather(self, table, site, activation) -> Gathered | None:
        if len(self.slots) == 1:
            value = getattr(self.slots[0], table)[site]
            if activation is not None and value[0] != activation:
                return None
            value = value[1:] if activation is not None else value
            return Gathered(None, value if isinstance(value, tuple) else (value,), single=True)
        positions, stacked = self.owner.bank(table, site, activation)
        if not positions:
            return None
        where = [positions.get(s.name, -1) for s in self.slots]
        local = [where[k] for k in self.order]
        device = self.index.device
        if min(local) >= 0:
            index = torch.tensor(local, device=device)
            return Gathered(None, tuple(t[index] for t in stacked))
        rows = [i for i, position in enumerate(local) if position >= 0]
        if not rows:
            return None
        index = torch.tensor([local[i] for i in rows], device=device)
        return Gathered(torch.tensor(rows, device=device), tuple(t[index] for t in stacked))


# per table, per item: the dimension padded with zeros when adapters' sizes differ (None: sizes agree)
PAD_DIMS = {"lora": (0, 1), "ia3_in": (None,), "ia3_out": (None,), "bias": (None,),
            "adapter": (0, 0, 1, None), "pfeiffer": (0, 0, 1, None), "prefix": (2,)}


def _stack_padded(parts: tuple[torch.Tensor, ...], dim: int | None) -> torch.Tensor:
    if dim is not None:
        size = max(t.shape[dim] for t in parts)
        parts = [F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]) for t in parts]
    return torch.stack(parts)


