"""The backbone's modules, wrapped to apply each row's own change: projections, layer norms, output blocks and
attention (prefixes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods.adapter import ACTIVATIONS
from peftbench.mixed.rows import Gathered

if TYPE_CHECKING:
    from peftbench.mixed.base import SharedBase

ATTENTION_NAME = "peftbench_mixed"


def _bottleneck(h: torch.Tensor, got: Gathered, activation: str) -> torch.Tensor:
    """up(act(down(h))) with each row's weights (padded hidden units have zero weights and biases)."""
    down_w, down_b, up_w, up_b = got.values
    act = ACTIVATIONS[activation]()
    if got.single:
        return F.linear(act(F.linear(h, down_w, down_b)), up_w, up_b)
    flat = h.reshape(h.shape[0], -1, h.shape[-1])
    hidden = act(torch.baddbmm(down_b[:, None], flat, down_w.transpose(1, 2)))
    return torch.baddbmm(up_b[:, None], hidden, up_w.transpose(1, 2)).view(h.shape)


def _per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (rows, d) tensor shaped to broadcast over ``like``'s middle dimensions."""
    return t.view(t.shape[0], *[1] * (like.dim() - 2), t.shape[-1])


class MultiLinear(nn.Module):
    """A frozen projection with each row's IA3 scales, bias, LoRA update and bottleneck adapter."""

    def __init__(self, base: nn.Linear, site: str, owner: SharedBase):
        super().__init__()
        self.base, self.site, self.owner = base, site, [owner]  # a list: not a sub-module

    def forward(self, x):
        rows = self.owner[0].rows
        if rows is None:
            return self.base(x)
        if got := rows.gather("ia3_in", self.site):
            (scale,) = got.values
            x = got.replace(x, got.select(x) * (scale if got.single else _per_row(scale, x)))
        if got := rows.gather("bias", self.site):
            y = F.linear(x, self.base.weight)
            bias = got.values[0] if got.single else _rows_bias(got, self.base.bias, len(rows.index), y)
            y = y + (bias if got.single else _per_row(bias, y))
        else:
            y = self.base(x)
        if got := rows.gather("ia3_out", self.site):
            (scale,) = got.values
            y = got.replace(y, got.select(y) * (scale if got.single else _per_row(scale, y)))
        if got := rows.gather("lora", self.site):
            a, b = got.values
            part = got.select(x)
            if got.single:
                delta = F.linear(F.linear(part, a), b)
            else:
                flat = part.reshape(part.shape[0], -1, part.shape[-1])
                delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)).view(*part.shape[:-1], -1)
            y = got.add_to(y, delta)
        for activation in ACTIVATIONS:
            if got := rows.gather("adapter", self.site, activation):
                y = got.add_to(y, _bottleneck(got.select(y), got, activation))
        return y


def _rows_bias(got: Gathered, base_bias: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(B, d): each row's own bias where its adapter has one, else the base's (or zeros)."""
    (own,) = got.values
    if got.rows is None:
        return own
    base = base_bias if base_bias is not None else torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    return base.expand(batch, -1).index_copy(0, got.rows, own)


class MultiLayerNorm(nn.Module):
    """A frozen layer norm with each row's bias (BitFit)."""

    def __init__(self, base: nn.LayerNorm, site: str, owner: SharedBase):
        super().__init__()
        self.base, self.site, self.owner = base, site, [owner]

    def forward(self, x):
        rows = self.owner[0].rows
        got = rows and rows.gather("bias", self.site)
        if not got:
            return self.base(x)
        y = F.layer_norm(x, self.base.normalized_shape, self.base.weight, None, self.base.eps)
        bias = got.values[0] if got.single else _rows_bias(got, self.base.bias, len(rows.index), y)
        return y + (bias if got.single else _per_row(bias, y))


class MultiOutputBlock(nn.Module):
    """A BERT-style output block, LN(dense(h) + x), with each row's Pfeiffer adapter: LN(h + x + A(LN(h + x)))."""

    def __init__(self, block: nn.Module, site: str, owner: SharedBase):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm
        self.site, self.owner = site, [owner]

    def forward(self, hidden_states, input_tensor):
        h = self.dropout(self.dense(hidden_states))
        rows = self.owner[0].rows
        found = [(a, g) for a in ACTIVATIONS if rows and (g := rows.gather("pfeiffer", self.site, a))]
        if not found:
            return self.LayerNorm(h + input_tensor)
        z = self.LayerNorm(h + input_tensor)
        delta = torch.zeros_like(z)  # rows without an adapter: h + x + 0 is h + x, exactly
        for activation, got in found:
            delta = got.add_to(delta, _bottleneck(got.select(z), got, activation))
        return self.LayerNorm(h + input_tensor + delta)


@dataclass
class _AttentionSite:
    owner: SharedBase
    site: str
    base_attention: object


def mixed_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention, with each row's prefix keys and values before its own (masked where a row's
    prefix is shorter than the batch's longest, or absent)."""
    link: _AttentionSite = module.peftbench_mixed
    rows = link.owner.rows
    got = rows and rows.gather("prefix", link.site)
    if not got:
        return link.base_attention(module, query, key, value, attention_mask, **kwargs)
    (prefix,) = got.values  # (rows, 2, kv_heads, n, head_dim), or (2, kv_heads, n, head_dim) for every row
    batch = key.shape[0]
    lengths = [s.prefix[link.site].shape[2] if link.site in s.prefix else 0 for s in rows.slots]
    longest = prefix.shape[-2]
    visible = torch.arange(longest, device=key.device) < torch.tensor(lengths, device=key.device)[rows.index, None]
    if got.single:
        prefix = prefix.expand(batch, *prefix.shape)
    elif got.rows is not None:
        prefix = prefix.new_zeros(batch, *prefix.shape[1:]).index_copy(0, got.rows, prefix)
    key = torch.cat([prefix[:, 0].to(key.dtype), key], dim=2)
    value = torch.cat([prefix[:, 1].to(value.dtype), value], dim=2)
    q_len = query.shape[2]
    if attention_mask is None:
        shape = (batch, 1, q_len, key.shape[2] - longest)
        attention_mask = torch.ones(shape, dtype=torch.bool, device=key.device)
        if link.base_attention is not _sdpa():
            attention_mask = torch.zeros(shape, dtype=query.dtype, device=key.device)
    mask = attention_mask.expand(batch, *attention_mask.shape[1:])
    seen = visible[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], longest)
    if mask.dtype != torch.bool:
        seen = torch.zeros(seen.shape, dtype=mask.dtype, device=mask.device).masked_fill(~seen, torch.finfo(
            mask.dtype).min)
    return link.base_attention(module, query, key, value, torch.cat([seen, mask], dim=-1), **kwargs)


def _sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, mixed_attention)


