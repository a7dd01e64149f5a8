"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190) / P-tuning v2 (Liu et al. 2022, arXiv:2110.07602).

Every self-attention layer l gets ``num_virtual_tokens`` learned key and value
vectors P_k^l, P_v^l (per key/value head) prepended to its own keys and values:

    Attn(Q, [P_k; K], [P_v; V]),   mask extended so every query sees every prefix

The backbone is frozen; only the prefixes (and the head) train. With
``reparameterize`` the prefixes are produced by an MLP from a smaller
embedding (Li & Liang's stabilisation): P = MLP(E), E: n x d; the MLP is used in
training only: the saved adapter holds the folded prefixes P themselves.

``init``: ``random`` (normal, the backbone's initializer_range) or ``tokens``, Li & Liang's
initialisation from real words: n token ids drawn from the vocabulary (with the run's seed) are run
through the frozen backbone, and each layer's prefixes start as those tokens' own keys and values
(with the MLP: E starts as their word embeddings).

PEFT's prefix tuning passes prefixes as ``past_key_values``, which encoders
ignore and current transformers renamed; here the attention computation itself
is extended. The chosen attention modules dispatch to a registered attention
function that prepends the prefixes and then calls the model's own eager or
SDPA attention, so it works for encoders (BERT/RoBERTa) and decoders
(Llama/Qwen, grouped-query attention included). For a causal decoder with no
explicit mask the causal mask is built with the prefix columns visible.

Trainable parameters: n_layers * 2 * num_virtual_tokens * n_kv_heads * head_dim
(folded), plus the head; with the MLP in training, n * d + d * h + h +
h * (n_layers * 2 * n_kv_heads * head_dim) + n_layers * 2 * n_kv_heads * head_dim.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from peftbench.config import require
from peftbench.errors import PeftbenchError
from peftbench.methods import InPlaceMethod, MethodConfig, find_modules, is_head, register_method

ATTENTION_NAME = "peftbench_prefix"
ENCODER_NAME = "peftbench_prefix"  # attribute of the model holding the PrefixEncoder


class PrefixEncoder(nn.Module):
    """Key/value prefixes of every layer, shape (layers, 2, kv_heads, tokens, head_dim)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, tokens: int, d_model: int,
                 reparam_hidden: int | None, init_std: float):
        super().__init__()
        self.shape = (layers, 2, kv_heads, tokens, head_dim)
        if reparam_hidden:
            self.embedding = nn.Parameter(torch.randn(tokens, d_model) * init_std)
            self.mlp = nn.Sequential(nn.Linear(d_model, reparam_hidden), nn.Tanh(),
                                     nn.Linear(reparam_hidden, layers * 2 * kv_heads * head_dim))
        else:
            self.prefix = nn.Parameter(torch.randn(self.shape) * init_std)

        self.current: torch.Tensor | None = None  # the MLP's output for the model's latest forward pass
        self.captured: dict[int, torch.Tensor] | None = None  # layer -> (2, kv_heads, tokens, head_dim), init=tokens

    def forward(self) -> torch.Tensor:
        """The prefixes the attention layers read: in a forward pass with the MLP, its output for that pass."""
        if hasattr(self, "prefix"):
            return self.prefix
        return self.current if self.current is not None else self.fold()

    def fold(self, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The prefixes computed now (through the MLP when there is one), from this module's parameters or from
        ``state`` (its tensors by name, whole: a sharded model's, gathered)."""
        if hasattr(self, "prefix"):
            return self.prefix if state is None else state["prefix"]
        layers, two, kv_heads, tokens, head_dim = self.shape
        if state is None:
            out = self.mlp(self.embedding)
        else:
            hidden = torch.tanh(nn.functional.linear(state["embedding"], state["mlp.0.weight"], state["mlp.0.bias"]))
            out = nn.functional.linear(hidden, state["mlp.2.weight"], state["mlp.2.bias"])
        return out.view(tokens, layers, two, kv_heads, head_dim).permute(1, 2, 3, 0, 4)

    def hold(self, model: nn.Module) -> None:
        """Run the MLP once per forward pass of ``model``, not once per layer: every layer, and a checkpointed
        layer recomputed in the backward pass, reads that pass's output. (FSDP2 gathers the model's root weights
        in a hook that runs before this one.)"""
        def begin(module, args):
            self.current = None
            self.current = self.fold()

        model.register_forward_pre_hook(begin)


@dataclasses.dataclass
class _Link:
    """What one attention module needs: the shared encoder, its layer index, the attention it wraps."""

    encoder: PrefixEncoder
    layer: int
    base_attention: object


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Prepend this layer's prefixes to keys/values, extend the mask, run the wrapped attention."""
    link: _Link = module.peftbench_prefix
    if link.encoder.captured is not None:  # reading the backbone's own keys and values (init=tokens)
        link.encoder.captured[link.layer] = torch.stack([key[0], value[0]])
        return link.base_attention(module, query, key, value, attention_mask, **kwargs)
    prefix_k, prefix_v = link.encoder()[link.layer]  # (kv_heads, tokens, head_dim) each
    batch, tokens = key.shape[0], prefix_k.shape[1]
    key = torch.cat([prefix_k.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and getattr(module, "is_causal", False) and q_len > 1:
        # torch SDPA's is_causal aligns top-left, which would hide the prefix: build the mask explicitly.
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        if link.base_attention is _attention_functions().get("sdpa"):
            attention_mask = keep
        else:
            attention_mask = torch.zeros(q_len, kv_len, dtype=query.dtype, device=query.device)
            attention_mask = attention_mask.masked_fill(~keep, torch.finfo(query.dtype).min)
        attention_mask = attention_mask[None, None]
    elif attention_mask is not None:
        visible = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
        pad = visible(*attention_mask.shape[:-1], tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    return link.base_attention(module, query, key, value, attention_mask, **kwargs)


def _attention_functions():
    """transformers' attention registry, with the prefix attention in it (registered on first use: importing
    transformers costs seconds that ``peftbench methods`` does not need)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    return ALL_ATTENTION_FUNCTIONS


def base_attention(module, implementation: str):
    """The attention the prefix attention wraps; registers the prefix attention with transformers (for every
    implementation: the modules dispatch to it by name)."""
    functions = _attention_functions()
    if implementation == "sdpa":
        return functions["sdpa"]
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    raise PeftbenchError(f"method prefix supports eager and sdpa attention, not '{implementation}' "
                         f"(set model.attn_implementation)")


@dataclass
class PrefixConfig(MethodConfig):
    name: str = "prefix"
    num_virtual_tokens: int = 20  # prefix length n
    reparameterize: bool = True  # MLP reparameterisation during training (folded away when saved)
    reparam_hidden: int = 512  # MLP width h
    init: str = "random"  # random | tokens (the keys/values of real vocabulary tokens, Li & Liang)
    # regexes of the attention modules (BERT/RoBERTa, Llama/Qwen)
    attention_modules: list[str] = field(default_factory=lambda: [r"attention\.self", r"self_attn"])

    def __post_init__(self):
        require(self.num_virtual_tokens >= 1, "method.num_virtual_tokens", ">= 1", self.num_virtual_tokens)
        require(self.reparam_hidden >= 1, "method.reparam_hidden", ">= 1", self.reparam_hidden)
        require(self.init in ("random", "tokens"), "method.init", "random or tokens", self.init)


def start_from_tokens(model: nn.Module, encoder: PrefixEncoder, tokens: int) -> list[int]:
    """Li & Liang's initialisation: ``tokens`` vocabulary ids (drawn with torch's seed, the config's special
    ids left out) run through the frozen backbone; each layer's prefixes become their keys and values, or, with
    the MLP, the embedding E becomes their word embeddings. Returns the ids."""
    embeddings = model.get_input_embeddings()
    special = {getattr(model.config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    pool = torch.tensor([i for i in range(embeddings.num_embeddings) if i not in special])
    ids = pool[torch.randint(len(pool), (tokens,))].to(embeddings.weight.device)
    with torch.no_grad():
        if hasattr(encoder, "embedding"):
            encoder.embedding.copy_(embeddings(ids).to(encoder.embedding.dtype))
            return ids.tolist()
        encoder.captured = {}
        was_training = model.training
        model.eval()
        try:
            model(input_ids=ids[None])
            encoder.prefix.copy_(torch.stack([encoder.captured[layer] for layer in range(len(encoder.captured))]))
        finally:
            encoder.captured = None
            model.train(was_training)
    return ids.tolist()


@register_method
class Prefix(InPlaceMethod):
    name = "prefix"
    lr_range = (1e-3, 1e-1)  # a learning-rate search's default (log-spaced) range
    default_lr = 5e-3  # train.lr when unset: P-tuning v2 on NLU tasks (Liu et al. 2022: 5e-3..1e-2)
    Config = PrefixConfig
    virtual_token_modules = (ENCODER_NAME,)

    def apply(self, model, ctx):
        cfg, config = self.cfg, model.config
        targets = [module for _, module in find_modules(model, cfg.attention_modules, "method.attention_modules")]
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        encoder = PrefixEncoder(len(targets), kv_heads, head_dim, cfg.num_virtual_tokens, config.hidden_size,
                                cfg.reparam_hidden if cfg.reparameterize else None,
                                getattr(config, "initializer_range", 0.02))
        floating = next(p for p in model.parameters() if p.is_floating_point())  # the embeddings: the keys' dtype
        model.add_module(ENCODER_NAME, encoder.to(floating.device, floating.dtype))
        if cfg.reparameterize:
            encoder.hold(model)
        for layer, module in enumerate(targets):
            base = base_attention(module, module.config._attn_implementation)
            module.peftbench_prefix = _Link(encoder, layer, base)
            module.config = copy.copy(module.config)  # only the attention modules dispatch to the prefix attention
            module.config._attn_implementation = ATTENTION_NAME
        if cfg.init == "tokens":
            self.init_token_ids = start_from_tokens(model, encoder, cfg.num_virtual_tokens)
        return model

    def summary(self, model) -> dict:
        return {"prefix_init_token_ids": self.init_token_ids} if self.cfg.init == "tokens" else {}

    def is_trainable(self, name: str) -> bool:
        return name.startswith(ENCODER_NAME + ".") or is_head(name)

    def trained_tensors(self, model, state=None):
        """The folded prefixes (no MLP) and the head (from ``state`` when given: see ``Method.save``)."""
        values = state if state is not None else dict(model.named_parameters())
        tensors = {n: values[n].detach() for n, p in model.named_parameters() if p.requires_grad and is_head(n)}
        own = None if state is None else {k.removeprefix(ENCODER_NAME + "."): v for k, v in state.items()
                                          if k.startswith(ENCODER_NAME + ".")}
        with torch.no_grad():
            tensors[f"{ENCODER_NAME}.prefix"] = getattr(model, ENCODER_NAME).fold(own).detach()
        return tensors

    def load(self, base_model, ckpt_dir, ctx):
        folded = Prefix(dataclasses.replace(self.cfg, reparameterize=False, init="random"))  # its tensors are loaded
        return InPlaceMethod.load(folded, base_model, ckpt_dir, ctx)
