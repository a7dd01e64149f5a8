"""One forward pass for a batch whose rows use different adapters of one frozen base.

S-LoRA (arXiv:2311.03285) and LoRAX keep one base in memory and apply each row's adapter inside the
layers. Here every method that leaves the base's weights as they were is a per-row change to one shared
backbone (an encoder: BERT family):

- LoRA family (LoRA, rsLoRA, AdaLoRA's SVD form, PiSSA saved as LoRA): ``y += (x Aᵀ) Bᵀ`` with each row's
  A and B gathered (ranks padded with zeros) and run as batched matmuls, not a loop over adapters;
- IA3: a per-row vector scales a projection's output (keys, values) or its input (feed-forward);
- BitFit: per-row biases of the projections and layer norms;
- bottleneck adapters: per-row down/up weights as batched matmuls (Houlsby and ffn after the projection,
  Pfeiffer inside the output block);
- prefix tuning: per-row keys and values prepended in attention, padded to the longest prefix and masked;
- prompt tuning: per-row virtual tokens before each row's own tokens, padding after;
- heads: the backbone runs once; each adapter's own head (with its pooler) runs on its rows.

A row whose adapter has nothing at a place runs the base there untouched. An adapter is taken apart from
its loaded model (:meth:`SharedBase.add`): a model that differs from the base in any other tensor (full
fine-tuning, DoRA, other PEFT tuners, a quantised base) cannot join, and :class:`NotShareable` says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods.adapter import ACTIVATIONS, is_post_ln_block
from peftbench.methods.prefix import base_attention
from peftbench.models import without_peft

ATTENTION_NAME = "peftbench_mixed"
ATTENTION_MODULES = re.compile(r"(attention\.self|self_attn)$")
ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}


class NotShareable(Exception):
    """An adapter that cannot run on the shared base (the message says why); it keeps a model of its own."""


@dataclass
class Slot:
    """One adapter's per-row changes, by backbone module name, and its head."""

    name: str
    head: nn.Module  # its task model with the backbone replaced by :class:`Precomputed`
    lora: dict[str, tuple] = field(default_factory=dict)  # Linear -> (A: r x in, B: out x r, scaling folded in)
    ia3_in: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear -> (in,): scales its input
    ia3_out: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear -> (out,): scales its output
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear or LayerNorm -> its own bias
    adapter: dict[str, tuple] = field(default_factory=dict)  # Linear -> (activation, down W, down b, up W, up b)
    pfeiffer: dict[str, tuple] = field(default_factory=dict)  # output block -> the same
    prefix: dict[str, torch.Tensor] = field(default_factory=dict)  # attention -> (2, kv_heads, n, head_dim)
    prompt: torch.Tensor | None = None  # (n, d): virtual-token embeddings
    linear_head: tuple | None = None  # the head as plain tensors, when it is one (:func:`linear_head`)

    def nbytes(self) -> int:
        """Bytes of its tensors on the device (the head's included)."""
        tensors = [t for table in (self.lora, self.ia3_in, self.ia3_out, self.bias, self.adapter, self.pfeiffer,
                                   self.prefix) for v in table.values() for t in (v if isinstance(v, tuple) else (v,))
                   if isinstance(t, torch.Tensor)]
        tensors += [] if self.prompt is None else [self.prompt]
        tensors += list(self.head.parameters())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # a view once
        return sum(storages.values())


class Precomputed(nn.Module):
    """Stands in for a task model's backbone: returns what the shared backbone computed for the adapter's rows,
    with the adapter's own pooler applied (BERT's pooler is the head's first layer)."""

    def __init__(self, pooler: nn.Module | None):
        super().__init__()
        self.pooler = pooler
        self.hidden: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = self.pooler(self.hidden) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=self.hidden, pooler_output=pooled)


class Head(nn.Module):
    """An adapter's head: its task model's own forward, on the shared backbone's output for its rows."""

    def __init__(self, task_model: nn.Module):
        super().__init__()
        self.task_model = task_model
        self.stub: Precomputed = getattr(task_model, task_model.base_model_prefix)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.stub.hidden = hidden
        try:
            return self.task_model().logits
        finally:
            self.stub.hidden = None


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

    def __init__(self, owner: SharedBase, slots: list[Slot], index: torch.Tensor):
        self.owner, self.slots, self.index = owner, slots, index
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
        where = torch.tensor([positions.get(s.name, -1) for s in self.slots], device=self.index.device)
        local = where[self.index]
        if bool((local >= 0).all()):
            return Gathered(None, tuple(t[local] for t in stacked))
        rows = (local >= 0).nonzero().squeeze(1)
        if len(rows) == 0:
            return None
        return Gathered(rows, tuple(t[local[rows]] for t in stacked))


# per table, per item: the dimension padded with zeros when adapters' sizes differ (None: sizes agree)
PAD_DIMS = {"lora": (0, 1), "ia3_in": (None,), "ia3_out": (None,), "bias": (None,),
            "adapter": (0, 0, 1, None), "pfeiffer": (0, 0, 1, None), "prefix": (2,)}


def _stack_padded(parts: tuple[torch.Tensor, ...], dim: int | None) -> torch.Tensor:
    if dim is not None:
        size = max(t.shape[dim] for t in parts)
        parts = [F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]) for t in parts]
    return torch.stack(parts)


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


class SharedBase:
    """One frozen encoder backbone and the adapters (slots) that run on it, mixed in one forward pass."""

    def __init__(self, task_model: nn.Module):
        """``task_model``: a plain transformers task model of the base (its head is not used)."""
        import copy

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
        order = {n: k for k, n in enumerate(dict.fromkeys(names))}
        slots = [self.slots[n] for n in order]
        device = inputs["input_ids"].device
        index = torch.tensor([order[n] for n in names], device=device)
        embeds, mask, types, offsets = self._with_prompts(inputs, slots, index)
        self.rows = Rows(self, slots, index)
        try:
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types).last_hidden_state
        finally:
            self.rows = None
        out: list[torch.Tensor | None] = [None] * len(names)
        length = inputs["input_ids"].shape[1]
        first = hidden[:, 0]
        for k, slot in enumerate(slots):
            rows = (index == k).nonzero().squeeze(1)
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
            for r, row_logits in zip(rows.tolist(), logits):
                out[r] = row_logits
        return out

    def _with_prompts(self, inputs, slots, index):
        """Input embeddings, mask and token types with each row's virtual tokens (prompt tuning) first and the
        rows padded on the right to one length; ``offsets``: where each row's own tokens start."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        types = inputs.get("token_type_ids", torch.zeros_like(ids))
        embeds = self.backbone.get_input_embeddings()(ids)
        lengths = torch.tensor([0 if s.prompt is None else s.prompt.shape[0] for s in slots], device=ids.device)
        offsets = lengths[index]
        longest = int(lengths.max())
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
                rows = (index == k).nonzero().squeeze(1)
                n = slot.prompt.shape[0]
                new_embeds[rows, :n] = slot.prompt.to(embeds.dtype)
                new_mask[rows, :n] = 1
        width = int(new_mask.sum(1).max())  # right-padded: past the longest row, padding only
        return new_embeds[:, :width], new_mask[:, :width], new_types[:, :width], offsets


# -- taking a loaded adapter apart ----------------------------------------------------------------------------------

WRAPPER_PARTS = re.compile(r"\.(base_layer|base)(?=\.)")  # PEFT's tuner layers, peftbench's AdaptedLinear


def extract(name: str, model: nn.Module, shared: SharedBase) -> Slot:
    """The slot of a loaded adapter ``model``: its per-row tensors by site and its head; every other tensor of its
    backbone must equal the shared base's. Moves nothing out of ``model`` until every check passed."""
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftbench.methods.adapter import AdaptedLinear, PfeifferOutput
    from peftbench.methods.prefix import _Link

    task = without_peft(model)
    backbone = getattr(task, task.base_model_prefix)
    slot = Slot(name, head=None)
    taken: set[int] = set()  # parameters a slot table holds

    def take(*params):
        taken.update(id(p) for p in params)
        return tuple(p.detach() for p in params)

    for site, module in backbone.named_modules():
        if site == "pooler" or site.startswith("pooler."):
            continue  # the head's
        if isinstance(module, LoraLayer):
            active = module.active_adapters
            if len(active) != 1 or not isinstance(module.base_layer, nn.Linear):
                raise NotShareable(f"{site}: a LoRA layer on a {type(module.base_layer).__name__}")
            a_name = active[0]
            if module.use_dora.get(a_name):
                raise NotShareable(f"{site}: DoRA (its magnitude rescales the base's output per column)")
            variant = getattr(module, "lora_variant", {}).get(a_name)
            if variant is not None:
                raise NotShareable(f"{site}: PEFT's {type(variant).__name__} (no per-row form here)")
            if isinstance(module, SVDLinear):  # AdaLoRA: B (A * E) scaling / (ranknum + 1e-5)
                a, e, b = take(module.lora_A[a_name], module.lora_E[a_name], module.lora_B[a_name])
                taken.add(id(module.ranknum[a_name]))
                scale = module.scaling[a_name] / (float(module.ranknum[a_name]) + 1e-5)
                slot.lora[site] = (a * e, b * scale)
            else:
                a, b = take(module.lora_A[a_name].weight, module.lora_B[a_name].weight)
                slot.lora[site] = (a, b * module.scaling[a_name])
        elif isinstance(module, IA3Layer):
            if len(module.active_adapters) != 1 or not isinstance(module.base_layer, nn.Linear):
                raise NotShareable(f"{site}: an IA3 layer on a {type(module.base_layer).__name__}")
            (vector,) = take(module.ia3_l[module.active_adapters[0]])
            (slot.ia3_in if module.is_feedforward else slot.ia3_out)[site] = vector.flatten()
        elif isinstance(module, BaseTunerLayer):
            kind = type(module).__module__.split(".")[2]  # peft.tuners.<tuner>.layer
            raise NotShareable(f"{site}: a PEFT {kind} layer, which has no per-row form here")
        elif isinstance(module, AdaptedLinear):
            slot.adapter[site] = _bottleneck_tensors(module.adapter, take)
        elif isinstance(module, PfeifferOutput):
            slot.pfeiffer[site] = _bottleneck_tensors(module.adapter, take)
        link = getattr(module, "peftbench_prefix", None)
        if isinstance(link, _Link):
            slot.prefix[site] = link.encoder()[link.layer].detach()
    config = model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else None
    if config is not None and config.is_prompt_learning:
        if config.peft_type.value not in ("PROMPT_TUNING", "P_TUNING"):
            raise NotShareable(f"PEFT's {config.peft_type.value}")
        slot.prompt = model.get_prompt(batch_size=1)[0].detach()

    for param_name, param in backbone.named_parameters():
        if id(param) in taken or param_name.startswith("pooler."):
            continue
        key = WRAPPER_PARTS.sub("", param_name)
        base = shared.weights.get(key)
        if base is None or base.shape != param.shape:
            raise NotShareable(f"its tensor {param_name} has no place in the shared base")
        if torch.equal(base, param):
            continue
        module_name, _, kind = key.rpartition(".")
        if kind == "bias" and (module_name in shared.linear_sites or module_name in shared.norm_sites):
            slot.bias[module_name] = param.detach()
        else:
            raise NotShareable(f"it changes the base's {key}")
    missing = [t for t, sites in (("prefix", shared.attention_sites), ("pfeiffer", shared.block_sites),
                                  ("lora", shared.linear_sites), ("adapter", shared.linear_sites),
                                  ("ia3_in", shared.linear_sites), ("ia3_out", shared.linear_sites))
               if set(getattr(slot, t)) - sites]
    if missing:
        raise NotShareable(f"its {missing[0]} sits where the shared base has no shared place")

    pooler = getattr(backbone, "pooler", None)
    setattr(task, task.base_model_prefix, Precomputed(pooler))  # the adapter's own backbone is let go
    slot.head = Head(task)
    slot.linear_head = linear_head(slot.head)
    return slot


def _running(module: nn.Module | None) -> nn.Module | None:
    """The module that runs: a PEFT ``ModulesToSaveWrapper``'s active copy, else the module itself."""
    return module.modules_to_save[module.active_adapters[0]] if hasattr(module, "modules_to_save") else module


def linear_head(head: Head) -> tuple | None:
    """The head as tensors when it is BERT's: ``("pooled", pooler W, b, classifier W, b)`` (tanh of the first
    token's projection, then a linear classifier) or ``("token", classifier W, b)``; checked against the head's
    own forward on random input, so that another head keeps its model's forward (None)."""
    classifier = _running(getattr(head.task_model, "classifier", None))
    dense = _running(getattr(head.stub.pooler, "dense", None))
    if not isinstance(classifier, nn.Linear):
        return None
    width = classifier.in_features
    probe = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(classifier.weight)
    with torch.inference_mode():
        want = head(probe)
        candidates = [("token", classifier.weight, classifier.bias)]
        if isinstance(dense, nn.Linear):
            candidates.insert(0, ("pooled", dense.weight, dense.bias, classifier.weight, classifier.bias))
        for candidate in candidates:
            if candidate[0] == "pooled":
                got = F.linear(torch.tanh(F.linear(probe[:, 0], *candidate[1:3])), *candidate[3:])
            else:
                got = F.linear(probe, *candidate[1:])
            if got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-6):
                return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in candidate)
    return None


def _bottleneck_tensors(adapter: nn.Module, take) -> tuple:
    return (ACTIVATION_NAMES[type(adapter.act)], *take(adapter.down.weight, adapter.down.bias, adapter.up.weight,
                                                       adapter.up.bias))
