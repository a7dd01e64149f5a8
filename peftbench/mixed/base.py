"""The shared base: one frozen backbone, its modules wrapped, the slots on it, and the one forward pass."""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods.adapter import is_post_ln_block
from peftbench.methods.prefix import base_attention
from peftbench.mixed.layers import (
    ATTENTION_NAME,
    MultiLayerNorm,
    MultiLinear,
    MultiOutputBlock,
    _AttentionSite,
    _register_attention,
)
from peftbench.mixed.rows import PAD_DIMS, Rows, _stack_padded
from peftbench.mixed.slots import NotShareable, Slot, extract

ATTENTION_MODULES = re.compile(r"(attention\.self|self_attn)$")


class SharedBase:
    """One frozen encoder backbone and the adapters (slots) that run on it, mixed in one forward pass."""

    def __init__(self, task_model: nn.Module):
        """``task_model``: a plain transformers task model of the base (its head is not used)."""

        self.backbone = getattr(task_model, task_model.base_model_prefix)
        if any(getattr(m, "is_causal", False) for m in self.backbone.modules()):
            raise NotShareable("a causal decoder (the shared pass is written for encoders)")
        self.backbone.pooler = None  # each head brings its own pooler
        self.backbone.eval().requires_grad_(False)
        self.weights = dict(self.backbone.named_parameters())
        self.slots: dict[str, Slot] = {}
        self.rows: Rows | None = None  # the batch in the current forward pass
        self.banks: dict[tuple, tuple] = {}  # (table, site, activation) -> :meth:`bank`
        _register_attention()
        for name, module in list(self.backbone.named_modules()):  # output blocks first: their parts are wrapped next
            if name and is_post_ln_block(module):
                self._put(name, MultiOutputBlock(module, name, self))
        for name, module in list(self.backbone.named_modules()):
            if isinstance(module, nn.Linear):
                self._put(name, MultiLinear(module, name, self))
            elif isinstance(module, nn.LayerNorm):
                self._put(name, MultiLayerNorm(module, name, self))
            elif ATTENTION_MODULES.search(name) and module.config._attn_implementation in ("eager", "sdpa"):
                module.peftbench_mixed = _AttentionSite(self, name, base_attention(  # other attentions: no prefix
                    module, module.config._attn_implementation))                    # adapter joins
                module.config = copy.copy(module.config)
                module.config._attn_implementation = ATTENTION_NAME
        self.attention_sites = {n for n, m in self.backbone.named_modules() if hasattr(m, "peftbench_mixed")}
        self.linear_sites = {m.site for m in self.backbone.modules() if isinstance(m, MultiLinear)}
        self.norm_sites = {m.site for m in self.backbone.modules() if isinstance(m, MultiLayerNorm)}
        self.block_sites = {m.site for m in self.backbone.modules() if isinstance(m, MultiOutputBlock)}

    def _put(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.backbone.get_submodule(parent) if parent else self.backbone, child, module)

    # -- adapters ---------------------------------------------------------------------------------------------------

    def add(self, name: str, model: nn.Module) -> Slot:
        """Take the adapter of ``model`` (a loaded checkpoint of this base, in eval mode) apart into a slot; raises
        :class:`NotShareable` (``model`` untouched) when it changes the base beyond what a slot holds."""
        slot = extract(name, model, self)
        self.slots[name] = slot
        self.banks.clear()
        return slot

    def remove(self, name: str) -> None:
        del self.slots[name]
        self.banks.clear()

    def bank(self, table: str, site: str, activation: str | None) -> tuple[dict[str, int], tuple]:
        """Every slot's ``table[site]`` stacked (padded where sizes differ), and each slot's position in it; built
        on first use after a slot came or went, so that a batch gathers its rows with one index per tensor."""
        key = (table, site, activation)
        if key not in self.banks:
            have = {n: getattr(s, table)[site] for n, s in self.slots.items() if site in getattr(s, table)
                    and (activation is None or getattr(s, table)[site][0] == activation)}
            items = [v[1:] if activation is not None else v for v in have.values()]
            columns = zip(*items) if items and isinstance(items[0], tuple) else [items] if items else []
            self.banks[key] = ({n: i for i, n in enumerate(have)},
                               tuple(_stack_padded(c, PAD_DIMS[table][i]) for i, c in enumerate(columns)))
        return self.banks[key]

    # -- the forward pass -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, inputs: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        """Each row's float logits: ``inputs`` (``input_ids``, ``attention_mask``, ``token_type_ids``; padded on the
        right) run once through the backbone, row i with adapter ``names[i]``; token logits align with the
        input tokens."""
        position = {n: k for k, n in enumerate(dict.fromkeys(names))}
        slots = [self.slots[n] for n in position]
        device = inputs["input_ids"].device
        rows_ = Rows(self, slots, [position[n] for n in names], device)
        embeds, mask, types, offsets = self._with_prompts(inputs, slots, rows_)
        self.rows = rows_
        try:
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types).last_hidden_state
        finally:
            self.rows = None
        out: list[torch.Tensor | None] = [None] * len(names)
        length = inputs["input_ids"].shape[1]
        first = hidden[:, 0]
        for k, slot in enumerate(slots):
            host_rows = [i for i, at in enumerate(rows_.order) if at == k]
            rows = torch.tensor(host_rows, device=device)
            if slot.linear_head and slot.linear_head[0] == "pooled":  # the common head, without its model's forward
                _, pool_w, pool_b, out_w, out_b = slot.linear_head
                logits = F.linear(torch.tanh(F.linear(first.index_select(0, rows), pool_w, pool_b)), out_w, out_b)
            elif slot.linear_head:
                logits = F.linear(hidden.index_select(0, rows), *slot.linear_head[1:])
            else:
                logits = slot.head(hidden.index_select(0, rows))
            logits = logits.float()
            if logits.dim() == 3:  # per token: each row's own tokens, after its virtual tokens (its padding, cut
                at = offsets.index_select(0, rows)[:, None] + torch.arange(length, device=device)  # off the pass,
                at = at.clamp(max=logits.shape[1] - 1)                                            # reads anything)
                logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
            for r, row_logits in zip(host_rows, logits):
                out[r] = row_logits
        return out

    def _with_prompts(self, inputs, slots, rows: Rows):
        """Input embeddings, mask and token types with each row's virtual tokens (prompt tuning) first and the
        rows padded on the right to one length; ``offsets``: where each row's own tokens start."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        types = inputs.get("token_type_ids", torch.zeros_like(ids))
        embeds = self.backbone.get_input_embeddings()(ids)
        lengths = [0 if s.prompt is None else s.prompt.shape[0] for s in slots]
        offsets = torch.tensor(lengths, device=ids.device)[rows.index]
        longest = max(lengths)
        if longest == 0:
            return embeds, mask, types, offsets
        batch, length, width = embeds.shape
        at = offsets[:, None] + torch.arange(length, device=ids.device)
        new_embeds = embeds.new_zeros(batch, length + longest, width).scatter(
            1, at[..., None].expand(-1, -1, width), embeds)
        new_mask = mask.new_zeros(batch, length + longest).scatter(1, at, mask)
        new_types = types.new_zeros(batch, length + longest).scatter(1, at, types)
        for k, slot in enumerate(slots):
            if slot.prompt is not None:
                own = torch.tensor([i for i, at in enumerate(rows.order) if at == k], device=ids.device)
                n = slot.prompt.shape[0]
                new_embeds[own, :n] = slot.prompt.to(embeds.dtype)
                new_mask[own, :n] = 1
        width = int(new_mask.sum(1).max())  # right-padded: past the longest row, padding only
        return new_embeds[:, :width], new_mask[:, :width], new_types[:, :width], offsets


