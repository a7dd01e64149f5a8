"""Bottleneck adapters: Houlsby et al. 2019 (arXiv:1902.00751) and Pfeiffer et al. 2021 (arXiv:2005.00247).

An adapter is a small MLP, A(h) = W_up f(W_down h + b_down) + b_up (W_down: m x d, W_up: d x m,
m = ``bottleneck`` or d / ``reduction_factor``). W_up and b_up start at zero, so at init the adapted model
computes exactly what the base model does. Placement, with h the sub-layer's output after its dropout
and x the block's input (as AdapterHub computes them, checked against its tensors):

- ``houlsby``: LN(h + A(h) + x) after the attention and after the feed-forward block of every layer
  (2 adapters per layer; Houlsby et al.'s code: dense, dropout, adapter, LayerNorm).
- ``pfeiffer``: LN(h + x + A(LN(h + x))) after the feed-forward block only (1 per layer): the adapter
  reads the output of the block's Add & Norm, whose LayerNorm is applied again after it. Needs a
  post-LN output block (BERT-style ``dense``, ``dropout``, ``LayerNorm``).
- ``ffn``: LN(h + A(h) + x) after the feed-forward block only (1 per layer): Houlsby's placement with
  Pfeiffer's count, which also runs on pre-LN decoders (Llama/Qwen: h + A(h) + x).

Projections are found by name (regular expressions matched at the end of the
module name), with defaults for BERT/RoBERTa encoders and Llama/Qwen decoders.
Trainable parameters: per adapter 2 d m + d + m, plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftbench.config import require
from peftbench.errors import PeftbenchError
from peftbench.methods import InPlaceMethod, MethodConfig, find_modules, is_head, register_method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
VARIANTS = ("houlsby", "pfeiffer", "ffn")


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))), with ``up`` zero-initialised (identity at init)."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h):
        return self.up(self.act(self.down(h)))

    def forward(self, h):
        return h + self.delta(h)


class AdaptedLinear(nn.Module):
    """A (frozen) projection, the sub-layer's dropout when it has one, then an adapter on the output."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter, dropout: nn.Module | None = None):
        super().__init__()
        self.base = base
        self.dropout = dropout or nn.Identity()
        self.adapter = adapter

    def forward(self, x):
        return self.adapter(self.dropout(self.base(x)))


class PfeifferOutput(nn.Module):
    """A BERT-style output block (``dense`` → ``dropout`` → ``LayerNorm(h + x)``) with Pfeiffer's adapter:
    LN(h + x + A(LN(h + x))), the block's own LayerNorm applied before and after the adapter (AdapterHub's
    ``SeqBnConfig``: original_ln_before, original_ln_after, residual_before_ln). Keeps the block's names."""

    def __init__(self, block: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm
        self.adapter = adapter

    def forward(self, hidden_states, input_tensor):
        h = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(h + input_tensor + self.adapter.delta(self.LayerNorm(h + input_tensor)))


def is_post_ln_block(parent: nn.Module) -> bool:
    """Whether ``parent`` is a BERT-style output block: ``dense`` → ``dropout`` → ``LayerNorm(h + input)``."""
    return ({name for name, _ in parent.named_children()} == {"dense", "dropout", "LayerNorm"}
            and isinstance(parent.dropout, nn.Dropout))


def take_dropout(parent: nn.Module) -> nn.Module | None:
    """A BERT-style output block hands its dropout to the adapter, which runs after it, as in Houlsby et al.'s
    code and AdapterHub; the block keeps an identity."""
    if not is_post_ln_block(parent):
        return None
    dropout, parent.dropout = parent.dropout, nn.Identity()
    return dropout


def output_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype a projection returns: its weight's, or fp32 for a quantised weight (integer codes, or 4-bit codes
    packed in a float dtype for FSDP)."""
    quantized = not linear.weight.is_floating_point() or hasattr(linear.weight, "quant_state")  # bnb's Params4bit
    return torch.float32 if quantized else linear.weight.dtype


@dataclass
class AdapterConfig(MethodConfig):
    name: str = "adapter"
    variant: str = "houlsby"  # houlsby | pfeiffer | ffn (docs/methods/adapter.md)
    bottleneck: int | None = None  # hidden units m; None = d / reduction_factor
    reduction_factor: int = 16  # d / m when bottleneck is unset
    activation: str = "gelu"  # gelu | relu | tanh | silu
    # regexes (end of module names) of attention output projections
    attn_modules: list[str] = field(default_factory=lambda: [r"attention\.output\.dense", r"self_attn\.o_proj"])
    # regexes of feed-forward output projections
    ffn_modules: list[str] = field(default_factory=lambda: [r"layer\.\d+\.output\.dense", r"mlp\.down_proj"])

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise PeftbenchError(f"config key 'method.variant' must be one of {', '.join(VARIANTS)}, "
                                 f"got {self.variant!r}")
        if self.activation not in ACTIVATIONS:
            raise PeftbenchError(f"config key 'method.activation' must be one of {sorted(ACTIVATIONS)}")
        require(self.bottleneck is None or self.bottleneck >= 1, "method.bottleneck", "null or >= 1", self.bottleneck)
        require(self.reduction_factor >= 1, "method.reduction_factor", ">= 1", self.reduction_factor)


@register_method
class Adapter(InPlaceMethod):
    name = "adapter"
    lr_range = (1e-4, 1e-2)  # a learning-rate search's default (log-spaced) range
    default_lr = 1e-3  # train.lr when unset: bottleneck adapters (Houlsby et al. 2019 search 3e-5..3e-3)
    Config = AdapterConfig

    def apply(self, model, ctx):
        cfg = self.cfg
        targets = find_modules(model, cfg.ffn_modules, "method.ffn_modules")
        if cfg.variant == "houlsby":
            targets += find_modules(model, cfg.attn_modules, "method.attn_modules")
        targets = [(name, module) for name, module in targets if isinstance(module, nn.Linear)]
        for name, linear in targets:
            dim = linear.out_features
            bottleneck = cfg.bottleneck or max(1, dim // cfg.reduction_factor)
            adapter = BottleneckAdapter(dim, bottleneck, cfg.activation).to(linear.weight.device, output_dtype(linear))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if cfg.variant == "pfeiffer":
                if not is_post_ln_block(parent) or child != "dense":
                    raise PeftbenchError(f"method.variant=pfeiffer needs a post-LN output block (dense, dropout, "
                                         f"LayerNorm), and '{parent_name}' is not one (a pre-LN decoder?): use "
                                         "variant=ffn (one adapter per layer) or houlsby")
                grand_name, _, block = parent_name.rpartition(".")
                setattr(model.get_submodule(grand_name), block, PfeifferOutput(parent, adapter))
            else:
                setattr(parent, child, AdaptedLinear(linear, adapter, take_dropout(parent)))
        return model

    def is_trainable(self, name: str) -> bool:
        return ".adapter." in name or is_head(name)
