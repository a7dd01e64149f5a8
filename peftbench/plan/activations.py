"""Activation bytes from a per-layer formula (BERT and decoder families), walked layer by layer: which
tensors each operation saves depends on whether its inputs and weights need gradients."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from peftbench.errors import PeftbenchError
from peftbench.models import without_peft


@dataclass
class T:
    """A symbolic activation: ``elems`` elements of ``size`` bytes; ``grad``: it needs a gradient."""

    elems: int
    size: int
    grad: bool
    key: int = field(default_factory=itertools.count().__next__)  # identity: a tensor kept twice is stored once


class Tape:
    """The tensors autograd keeps, each once, and the rules of the operations that keep them."""

    def __init__(self, kind: str, compute: int):
        self.kind, self.compute = kind, compute  # device kind; compute-dtype bytes (4 without autocast)
        self.saved: dict[int, int] = {}

    def keep(self, t: T) -> None:
        self.saved.setdefault(t.key, t.elems * t.size)

    def total(self) -> int:
        return sum(self.saved.values())

    def cast(self, x: T) -> T:
        """Autocast's input cast for a matmul: a new tensor unless already in the compute dtype."""
        return x if x.size == self.compute else T(x.elems, self.compute, x.grad)

    def linear(self, module: nn.Linear, x: T) -> T:
        """Keeps its input when its weight is trained (and an fp32 weight's copy under autocast)."""
        w_grad = module.weight.requires_grad
        b_grad = module.bias is not None and module.bias.requires_grad
        if w_grad:
            self.keep(self.cast(x))
        self.weight_copy(module.weight, x)
        return T(x.elems // module.in_features * module.out_features, self.compute, x.grad or w_grad or b_grad)

    def dropout(self, x: T, p: float) -> T:
        """Keeps its noise (CPU: scaled, in the input's dtype) or mask (CUDA: bool) when the input needs a
        gradient; the output is a new tensor."""
        if p == 0:
            return x
        if x.grad:
            self.keep(T(x.elems, x.size if self.kind == "cpu" else 1, False))
        return T(x.elems, x.size, x.grad)

    def layer_norm(self, x: T, tokens: int, module: nn.Module) -> T:
        """Keeps its input (autocast: on CUDA cast to fp32, on CPU to the compute dtype) and the per-token
        mean and 1/std; the output is fp32 (fp32 weights)."""
        trained = any(p.requires_grad for p in module.parameters())
        if x.grad or trained:
            self.keep(self.cast(x) if self.kind == "cpu" else x if x.size == 4 else T(x.elems, 4, x.grad))
            self.keep(T(2 * tokens, 4, False))
        return T(x.elems, 4, x.grad or trained)

    def weight_copy(self, weight: torch.Tensor, x: T) -> None:
        """Autocast's compute-dtype copy of an fp32 weight, kept for the gradient of the input ``x``."""
        if x.grad and self.compute != 4 and weight.dtype == torch.float32:
            self.keep(T(weight.numel(), self.compute, False))

    def pointwise(self, x: T) -> T:
        """GELU/ReLU/SiLU: the input is kept (tanh keeps its output: the same size)."""
        if x.grad:
            self.keep(x)
        return T(x.elems, x.size, x.grad)

    def scale(self, x: T, vector_grad: bool) -> T:
        """x * a learned fp32 vector (IA3): x is kept for the vector's gradient; the product is fp32."""
        if vector_grad:
            self.keep(x)
        return T(x.elems, 4, x.grad or vector_grad)


def _lora_like(tape: Tape, module, x: T) -> T:
    """PEFT LoRA / AdaLoRA on a linear: base(x) + B(A(dropout(x))) * scale."""
    base = tape.linear(module.base_layer, x)
    name = next(iter(module.lora_A))
    rank = module.r[name]
    dropout = module.lora_dropout[name]
    dropped = tape.dropout(x, dropout.p if isinstance(dropout, nn.Dropout) else 0.0)
    a, b = module.lora_A[name], module.lora_B[name]
    a_weight = a.weight if isinstance(a, nn.Module) else a  # AdaLoRA keeps A, E and B as bare parameters
    b_weight = b.weight if isinstance(b, nn.Module) else b
    if a_weight.requires_grad:  # the input of A, when A trains (LoRA-FA freezes it: the r-wide A x is all it keeps)
        tape.keep(tape.cast(dropped))
    tape.weight_copy(a_weight, dropped)
    low = T(x.elems // module.base_layer.in_features * rank, tape.compute, True)
    tape.keep(low)  # the input of B (trained)
    tape.weight_copy(b_weight, low)
    return T(base.elems, base.size, True)


def _ia3(tape: Tape, module, x: T) -> T:
    vector_grad = next(iter(module.ia3_l.values())).requires_grad
    if module.is_feedforward:  # PEFT scales the input in the vector's dtype (fp32)
        x32 = x if x.size == 4 else T(x.elems, 4, x.grad)
        return tape.linear(module.base_layer, tape.scale(x32, vector_grad))
    return tape.scale(tape.linear(module.base_layer, x), vector_grad)


def projection(tape: Tape, module: nn.Module, x: T) -> T:
    """Any linear a method may have wrapped: plain, LoRA/AdaLoRA, IA3, or an adapter after it."""
    from peftbench.methods.adapter import AdaptedLinear

    if isinstance(module, AdaptedLinear):
        return adapter(tape, module.adapter, tape.dropout(projection(tape, module.base, x), _p(module.dropout)))
    if hasattr(module, "lora_A"):
        return _lora_like(tape, module, x)
    if hasattr(module, "ia3_l"):
        return _ia3(tape, module, x)
    return tape.linear(module, x)


def adapter(tape: Tape, module, h: T) -> T:
    """h + up(act(down(h))): down keeps h, the activation keeps its input, up keeps the activation's output."""
    a = tape.pointwise(tape.linear(module.down, h))
    a = T(a.elems, a.size, a.grad)  # the activation's output is a new tensor, kept by up
    up = tape.linear(module.up, a)
    return T(h.elems, max(h.size, up.size), h.grad or up.grad)


def _p(module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def attention(tape: Tape, q: T, k: T, v: T, batch: int, heads: int, q_len: int, kv_len: int, padded: bool) -> T:
    """Scaled dot-product attention in training (dropout on the probabilities). CPU: the math kernel (the
    scaled q and k, the softmax output, the dropout noise, the dropped probabilities, v). CUDA: the
    memory-efficient kernel (q, k, v, the output, the log-sum-exp; the mask as a bias when there is padding)."""
    grad = q.grad or k.grad or v.grad
    scores = batch * heads * q_len * kv_len
    if tape.kind == "cpu":  # the math kernel runs in fp32 on CPU, under autocast too
        if k.grad:
            tape.keep(T(q.elems, 4, True))  # q * scale, for k's gradient
        if q.grad:
            tape.keep(T(k.elems, 4, True))  # k * scale, for q's gradient
        if q.grad or k.grad:
            tape.keep(T(scores, 4, True))  # softmax output
            tape.keep(T(scores, 4, False))  # dropout noise
            tape.keep(v if v.size == 4 else T(v.elems, 4, v.grad))
        if v.grad:
            tape.keep(T(scores, 4, True))  # dropped probabilities
        return T(q.elems, 4, grad)
    if grad:
        for t in (q, k, v):
            tape.keep(t)
        tape.keep(T(q.elems, tape.compute, True))  # the output
        tape.keep(T(batch * heads * q_len, 4, False))  # log-sum-exp
        if padded:
            tape.keep(T(batch * q_len * kv_len, tape.compute, False))  # the padding mask as a float bias
    return T(q.elems, tape.compute, grad)


def _walk_layers(tape: Tape, layers, x: T, mask_elems: int, checkpointing: bool, padded: bool, walk) -> tuple:
    """Walk ``walk(tape, layer, x)`` over the layers; returns the output and, with gradient checkpointing, the
    largest layer's recomputed activations (the layer's input and the shared boolean mask stay on the outer
    tape, the rest is rebuilt in backward)."""
    recompute = 0
    for layer in layers:
        if not checkpointing:
            x = walk(tape, layer, x)
            continue
        tape.keep(x)
        if padded:
            tape.keep(T(mask_elems, 1, False, key=-1))  # the boolean attention mask, one for all layers
        inner = Tape(tape.kind, tape.compute)
        inner.keep(x)
        x = walk(inner, layer, x)
        recompute = max(recompute, inner.total())
    return x, recompute


def bert_activations(model: nn.Module, batch: int, seq_len: int, kind: str, precision: str,
                     checkpointing: bool = False, padded: bool = True) -> dict:
    """What autograd keeps for one training forward pass of a post-LN BERT-family sequence classifier, with
    whatever method is applied, on ``batch`` sequences padded to ``seq_len``: ``saved`` (bytes kept through the
    forward pass) and ``recompute`` (with gradient checkpointing: one layer's activations, rebuilt in the
    backward pass, on top of ``saved``; 0 without)."""
    from peftbench.methods.prefix import ENCODER_NAME

    base = without_peft(model)
    config = base.config
    h, heads = config.hidden_size, config.num_attention_heads
    prompt = _prompt_tokens(model)
    s = seq_len + prompt
    tokens = batch * s
    tape = Tape(kind, {"bf16": 2, "fp16": 2}.get(precision, 4))
    encoder_model = getattr(base, base.base_model_prefix)
    emb = encoder_model.embeddings
    emb_trained = any(p.requires_grad for p in emb.parameters())
    if emb_trained:
        tape.keep(T(2 * batch * seq_len, 8, False))  # word and token-type ids
        tape.keep(T(config.max_position_embeddings, 8, False))  # the position-id buffer
    if prompt:
        tape.keep(T(batch * prompt, 8, False))  # the virtual tokens' ids
    # checkpointing makes the embeddings' output need a gradient (the checkpointed layers need one to flow)
    x = T(tokens * h, 4, emb_trained or prompt > 0 or checkpointing)
    x = tape.dropout(tape.layer_norm(x, tokens, emb.LayerNorm), _p(emb.dropout))
    prefix = getattr(model, ENCODER_NAME, None)  # prefix tuning's encoder, when the method is prefix
    if prefix is not None:
        _prefix_encoder(tape, prefix)
    x, recompute = _walk_layers(tape, encoder_model.encoder.layer, x, batch * s * s, checkpointing, padded,
                                lambda t, layer, x: bert_layer(t, layer, x, batch, s, h, heads, prefix, padded))
    _head(tape, base, x, batch, h)
    return {"saved": tape.total(), "recompute": recompute}


def bert_layer(tape: Tape, layer, x: T, batch: int, s: int, h: int, heads: int, prefix, padded: bool) -> T:
    att = layer.attention
    q = projection(tape, att.self.query, x)
    k = projection(tape, att.self.key, x)
    v = projection(tape, att.self.value, x)
    kv_len = s
    if prefix is not None:
        n = prefix.shape[3]
        kv_len = s + n
        k = T(batch * kv_len * h, k.size, True)  # torch.cat with the prefix: a new tensor
        v = T(batch * kv_len * h, v.size, True)
    ctx = attention(tape, q, k, v, batch, heads, s, kv_len, padded)
    tokens = batch * s
    a = _output_block(tape, att.output, ctx, x, tokens)
    inter = tape.pointwise(projection(tape, layer.intermediate.dense, a))
    inter = T(inter.elems, inter.size, inter.grad)  # GELU's output: a new tensor
    return _output_block(tape, layer.output, inter, a, tokens)


def _output_block(tape: Tape, block, hidden: T, residual: T, tokens: int) -> T:
    """dense → dropout → LayerNorm(h + residual); Pfeiffer's block: LN(h + x + A(LN(h + x)))."""
    from peftbench.methods.adapter import PfeifferOutput

    h = tape.dropout(projection(tape, block.dense, hidden), _p(block.dropout))
    total = T(h.elems, max(h.size, residual.size), h.grad or residual.grad)
    if isinstance(block, PfeifferOutput):
        normed = tape.layer_norm(total, tokens, block.LayerNorm)
        delta = adapter(tape, block.adapter, normed)
        total = T(total.elems, 4, total.grad or delta.grad)
    return tape.layer_norm(total, tokens, block.LayerNorm)


def _head(tape: Tape, base, x: T, batch: int, h: int) -> None:
    """BERT's head: pooler (dense and tanh on the first token), dropout, classifier, cross-entropy (the
    log-probabilities, the targets). The first token is a view of the last hidden state: kept uncast, it
    keeps that whole storage."""
    pooler = getattr(base, base.base_model_prefix).pooler
    first = x if x.size == tape.compute else T(batch * h, x.size, x.grad)
    dense = tape.linear(pooler.dense, first)
    pooled = tape.pointwise(T(batch * h, dense.size, dense.grad))  # tanh keeps its output (the same size)
    pooled = tape.dropout(T(pooled.elems, pooled.size, pooled.grad), _p(base.dropout))
    tape.linear(base.classifier, pooled)
    tape.keep(T(batch * base.config.num_labels, 4, False))  # log-softmax output
    tape.keep(T(batch, 8, False))  # targets


def rms_norm(tape: Tape, x: T, tokens: int, module: nn.Module) -> T:
    """x * rsqrt(mean(x²) + eps) in fp32, times the weight: keeps the fp32 input and the per-token 1/rms when
    the input needs a gradient, the normalised tensor when the weight is trained."""
    trained = module.weight.requires_grad
    x32 = x if x.size == 4 else T(x.elems, 4, x.grad)
    if x.grad:
        tape.keep(x32)
        tape.keep(T(tokens, 4, False))
    if trained:
        tape.keep(T(x.elems, x.size, x.grad))  # the normalised input, back in the input's dtype
    return T(x.elems, 4 if x.size == 4 or module.weight.dtype == torch.float32 else x.size, x.grad or trained)


def decoder_layer(tape: Tape, layer, x: T, batch: int, s: int, config, prefix, padded: bool) -> T:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokens = batch * s
    normed = rms_norm(tape, x, tokens, layer.input_layernorm)
    att = layer.self_attn
    q = projection(tape, att.q_proj, normed)
    k = projection(tape, att.k_proj, normed)
    v = projection(tape, att.v_proj, normed)
    if q.grad or k.grad:
        tape.keep(T(2 * s * head_dim, 4, False, key=-2))  # rotary cos and sin, one pair for every layer
    kv_len = s + (prefix.shape[3] if prefix is not None else 0)
    grad = q.grad or k.grad or v.grad or prefix is not None
    q = T(q.elems, q.size, q.grad)  # rotated: a new tensor
    # with a mask, keys and values are repeated to every query head; without one, SDPA shares the KV heads
    masked = padded or prefix is not None
    kv_heads = heads if masked else getattr(config, "num_key_value_heads", None) or heads
    keys = T(batch * kv_heads * kv_len * head_dim, k.size, k.grad or prefix is not None)  # rotated
    values = T(batch * kv_heads * kv_len * head_dim, v.size, v.grad or prefix is not None)
    out = T(q.elems, tape.compute, grad)
    if grad:  # CPU and CUDA flash-style kernels: q, k, v, the output, the log-sum-exp, the mask
        for t in (q, keys, values, out):
            tape.keep(t)
        tape.keep(T(batch * heads * s, 4, False))
        if padded:
            tape.keep(T(batch * s * kv_len, tape.compute, False))
    h = projection(tape, att.o_proj, out)
    x = T(x.elems, max(x.size, h.size), x.grad or h.grad)
    normed = rms_norm(tape, x, tokens, layer.post_attention_layernorm)
    mlp = layer.mlp
    gate = projection(tape, mlp.gate_proj, normed)
    up = projection(tape, mlp.up_proj, normed)
    act = tape.pointwise(gate)
    act = T(act.elems, act.size, act.grad)  # SiLU's output: a new tensor
    if up.grad:
        tape.keep(act)
    if act.grad:
        tape.keep(up)
    product = T(act.elems, act.size, act.grad or up.grad)
    down = projection(tape, mlp.down_proj, product)
    return T(x.elems, max(x.size, down.size), x.grad or down.grad)


def decoder_activations(model: nn.Module, batch: int, seq_len: int, kind: str, precision: str,
                        checkpointing: bool = False, padded: bool = True) -> dict:
    """What autograd keeps for one training forward pass of a pre-norm decoder sequence classifier (the head
    scores every position, the last real token's scores are picked), as :func:`bert_activations`."""
    from peftbench.methods.prefix import ENCODER_NAME

    base = without_peft(model)
    config = base.config
    h = config.hidden_size
    prompt = _prompt_tokens(model)
    s = seq_len + prompt
    tokens = batch * s
    tape = Tape(kind, {"bf16": 2, "fp16": 2}.get(precision, 4))
    backbone = getattr(base, base.base_model_prefix)
    emb_trained = backbone.embed_tokens.weight.requires_grad
    if emb_trained:
        tape.keep(T(batch * seq_len, 8, False))  # the token ids
    if prompt:
        tape.keep(T(batch * prompt, 8, False))
    x = T(tokens * h, 4, emb_trained or prompt > 0 or checkpointing)
    prefix = getattr(model, ENCODER_NAME, None)
    if prefix is not None:
        _prefix_encoder(tape, prefix)
    x, recompute = _walk_layers(tape, backbone.layers, x, batch * s * s, checkpointing, padded,
                                lambda t, layer, x: decoder_layer(t, layer, x, batch, s, config, prefix, padded))
    x = rms_norm(tape, x, tokens, backbone.norm)
    tape.linear(base.score, x)
    tape.keep(T(2 * batch, 8, False))  # the picked positions
    tape.keep(T(batch * config.num_labels, 4, False))  # log-softmax output
    tape.keep(T(batch, 8, False))  # targets
    return {"saved": tape.total(), "recompute": recompute}


def is_decoder_family(model: nn.Module) -> bool:
    """A pre-norm decoder with Llama's layer names (q/k/v/o_proj, gate/up/down_proj, RMSNorm) and a linear
    ``score`` head."""
    base = without_peft(model)
    layers = getattr(getattr(base, base.base_model_prefix, None), "layers", None)
    return (layers is not None and hasattr(getattr(layers[0], "mlp", None), "gate_proj")
            and hasattr(getattr(base, "score", None), "out_features"))


def is_bert_family(model: nn.Module) -> bool:
    """A post-LN encoder with BERT's layer names and BERT's pooler + linear classifier head."""
    base = without_peft(model)
    backbone = getattr(base, base.base_model_prefix, None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    return (layers is not None and hasattr(getattr(layers[0], "attention", None), "self")
            and getattr(backbone, "pooler", None) is not None
            and hasattr(getattr(base, "classifier", None), "out_features"))  # a linear (PEFT may wrap it)


def activations(model: nn.Module, batch: int, seq_len: int, kind: str, precision: str,
                checkpointing: bool = False, padded: bool = True) -> dict:
    """The activation formula of the model's family (BERT-style encoders, Llama-style decoders)."""
    _check_modelled(model)
    if is_bert_family(model):
        return bert_activations(model, batch, seq_len, kind, precision, checkpointing, padded)
    if is_decoder_family(model):
        return decoder_activations(model, batch, seq_len, kind, precision, checkpointing, padded)
    base = without_peft(model)
    raise PeftbenchError(f"peftbench plan: no activation formula for model type {base.config.model_type!r} (it "
                         "covers BERT-style encoders with a pooler and Llama-style decoders)")


def _check_modelled(model: nn.Module) -> None:
    """Refuse a PEFT tuner whose layers the formula does not know (a layer it took for a frozen linear would
    keep nothing, and the plan would be silently low): it covers LoRA, AdaLoRA, IA3 and prompt tuning."""
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.p_tuning.model import PromptEncoder
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        known = isinstance(module, (LoraLayer, AdaLoraLayer, IA3Layer)) or not isinstance(module, BaseTunerLayer)
        if not known or isinstance(module, PromptEncoder):
            raise PeftbenchError(f"peftbench plan: no activation formula for {type(module).__module__.split('.')[2]}"
                                 f" layers ({name}): it covers full, LoRA and its variants, AdaLoRA, IA3, adapters, "
                                 "prefix, prompt tuning and BitFit")


def _prompt_tokens(model) -> int:
    cfg = getattr(model, "peft_config", {}).get("default")
    return getattr(cfg, "num_virtual_tokens", 0) if cfg is not None and getattr(cfg, "is_prompt_learning", False) else 0


def _prefix_encoder(tape: Tape, encoder) -> None:
    """The prefixes, once per step. With the MLP (embedding → linear → tanh → linear): tanh's output, kept by
    the second linear; under autocast also the embedding's and the weights' compute-dtype copies."""
    if not hasattr(encoder, "mlp"):
        return
    tokens = encoder.shape[3]
    first, second = [m for m in encoder.mlp.modules() if isinstance(m, nn.Linear)]
    embedding = T(encoder.embedding.numel(), 4, True)
    tape.keep(tape.cast(embedding))
    tape.weight_copy(first.weight, embedding)
    hidden = T(tokens * first.out_features, tape.compute, True)
    tape.keep(hidden)
    tape.weight_copy(second.weight, hidden)
