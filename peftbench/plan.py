"""Before a run: will it fit, and how fast will it go (``peftbench plan``; formulas in docs/planning.md).

Memory of a training step = base weights + trained weights + gradients + optimizer state + activations.
The weights, gradients and AdamW state come from the model itself, built on the meta device (shapes, no
memory) with the method applied and the dtypes the run would settle on, so they are exact. Activations
(what autograd keeps for the backward pass) come from a formula per architecture family, walked layer by
layer: which tensors each operation saves depends on whether its inputs and weights need gradients, so the
same layer costs more under full fine-tuning than under LoRA, and the first layer above frozen embeddings
costs least. Step time is the FLOP formula of docs/performance.md over the task's real length distribution
(padded the way peftbench batches), divided by the device's dense matmul rate: a lower bound.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from peftbench.errors import PeftbenchError
from peftbench.models import without_peft

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    dense_flops: dict  # precision ("no" = fp32, "bf16", "fp16") -> published dense matmul FLOP/s


# Published dense (not sparse) tensor-core peaks; fp32 without TF32 (PyTorch's default for matmuls).
DEVICES = {
    "h200": Device("NVIDIA H200 SXM", 141 * 10**9, {"no": 67e12, "bf16": 989e12, "fp16": 989e12}),
    "h100": Device("NVIDIA H100 SXM", 80 * GIB, {"no": 67e12, "bf16": 989e12, "fp16": 989e12}),
    "a100": Device("NVIDIA A100 80GB", 80 * GIB, {"no": 19.5e12, "bf16": 312e12, "fp16": 312e12}),
    "a100-40gb": Device("NVIDIA A100 40GB", 40 * GIB, {"no": 19.5e12, "bf16": 312e12, "fp16": 312e12}),
    "l4": Device("NVIDIA L4", 24 * GIB, {"no": 30.3e12, "bf16": 121e12, "fp16": 121e12}),
    "a10": Device("NVIDIA A10", 24 * GIB, {"no": 31.2e12, "bf16": 125e12, "fp16": 125e12}),
    "rtx4090": Device("NVIDIA RTX 4090", 24 * GIB, {"no": 82.6e12, "bf16": 165e12, "fp16": 165e12}),
    "v100": Device("NVIDIA V100 32GB", 32 * GIB, {"no": 15.7e12, "fp16": 125e12}),
    "t4": Device("NVIDIA T4", 16 * GIB, {"no": 8.1e12, "fp16": 65e12}),
}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``24GB``, ``512MiB`` or a plain number of bytes."""
    units = {"gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "kib": 2**10, "kb": 10**3, "b": 1, "": 1}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    if unit not in units or not number:
        raise PeftbenchError(f"--memory: {text!r} is not a size (examples: 80GiB, 24GB, 512MiB)")
    return int(float(number) * units[unit])


# ---------------------------------------------------------------------------------------------------------
# Weights, gradients, optimizer state: exact, from the model built on the meta device


STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")  # what each process holds: docs/planning.md


def static_bytes(model: nn.Module, processes: int = 1, strategy: str = "ddp", whole_trained: bool = False) -> dict:
    """Bytes of the frozen (base) weights, the trained weights, their gradients (the trained dtype) and the
    optimizer state (AdamW: two moments in the trained dtype, plus a step count per tensor), held by one
    process of ``processes`` under ``strategy``: ``ddp`` keeps everything whole on each; ``zero2`` splits the
    gradients and optimizer state; ``fsdp`` (FSDP2) and ``zero3`` split the weights too, each tensor by rows
    (the first process holds the rounded-up share). ``whole_trained``: the trained tensors stay whole under
    ``fsdp`` (a method that reads whole gradients, e.g. AdaLoRA)."""
    from peftbench.measure import stored_bytes, unique_parameters

    def share(p: torch.Tensor, size: int, split: bool) -> int:
        if not split or processes == 1 or p.dim() == 0:
            return size
        return size // p.shape[0] * math.ceil(p.shape[0] / processes)

    weights_split = strategy in ("fsdp", "zero3")
    state_split = strategy != "ddp"
    base = trained = grads = state = 0
    for p in unique_parameters(model):
        if p.requires_grad:
            size = p.numel() * p.element_size()
            whole = whole_trained and strategy == "fsdp"
            trained += share(p, size, weights_split and not whole)
            grads += share(p, size, state_split and not whole)
            state += 2 * share(p, size, state_split and not whole) + 4  # exp_avg, exp_avg_sq, a float32 step
        else:
            base += share(p, stored_bytes(p), weights_split)
    return {"base_weights": base, "trained_weights": trained, "gradients": grads, "optimizer_state": state}


# ---------------------------------------------------------------------------------------------------------
# Activations: what autograd saves in one training forward pass; the operations' rules, then BERT-style encoders


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
    tape.keep(tape.cast(dropped))  # the input of A (trained)
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


# Pre-norm decoders (Llama, Qwen2, Mistral: RMSNorm, rotary positions, gated MLP, grouped KV heads)


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


def activations(model: nn.Module, batch: int, seq_len: int, kind: str, precision: str,
                checkpointing: bool = False, padded: bool = True) -> dict:
    """The activation formula of the model's family (BERT-style encoders, Llama-style decoders)."""
    if is_bert_family(model):
        return bert_activations(model, batch, seq_len, kind, precision, checkpointing, padded)
    if is_decoder_family(model):
        return decoder_activations(model, batch, seq_len, kind, precision, checkpointing, padded)
    base = without_peft(model)
    raise PeftbenchError(f"peftbench plan: no activation formula for model type {base.config.model_type!r} (it "
                         "covers BERT-style encoders with a pooler and Llama-style decoders)")


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


def count_saved(model: nn.Module, inputs: dict, autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors autograd actually saves in one forward pass of ``model`` on ``inputs``
    (``saved_tensors_hooks``), each storage once, parameters left out: the check of the formula."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        # kept alive (no address reused while counting), without its grad_fn: a saved output returned as it is
        # would hold its own node, a cycle that keeps the graph, the model included, alive after the pass
        return t.detach()

    device = next(model.parameters()).device
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(**inputs)
    del out
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------
# A plan for a recipe


def quantized_bytes(model: nn.Module, quantization: str) -> int:
    """Base-weight bytes once bitsandbytes quantises the encoder's linear weights (not embeddings, norms, the
    head): LLM.int8 one byte per weight plus an fp32 scale per row; NF4 half a byte plus, per 64-weight block,
    an 8-bit scale (double quantisation) and per 256 blocks an fp32 constant. Biases stay 16/32-bit."""
    from peftbench.methods import is_head

    total = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                continue
            linear = isinstance(module, nn.Linear) and pname == "weight" and not is_head(name)
            if not linear:
                total += p.numel() * p.element_size()
            elif quantization == "8bit":
                total += p.numel() + 4 * p.shape[0]
            else:
                blocks = math.ceil(p.numel() / 64)
                total += math.ceil(p.numel() / 2) + blocks + 4 * math.ceil(blocks / 256)
    return total


def meta_model(cfg, vocab_size: int, num_labels: int, total_steps: int):
    """The recipe's model with its method applied, on the meta device, dtypes settled as the run would."""
    from transformers import AutoConfig

    from peftbench import models
    from peftbench.methods import RunContext, get_method, set_trainable, settle_dtypes
    from peftbench.tasks import get_spec

    name = cfg.model.name_or_path
    if models.is_random_init(name):
        config = models.random_init_config(name, vocab_size)
    else:
        config = AutoConfig.from_pretrained(name)
    config.num_labels = num_labels
    kind = get_spec(cfg.task).kind
    method = get_method(cfg.method.name)(cfg.method)
    with torch.device("meta"):
        model = kind.auto_class.from_config(config)
        model = method.apply(model, RunContext(total_steps, num_labels, kind.peft_task_type, kind.labels_per_token))
    set_trainable(model, method)
    settle_dtypes(model, cfg.train.mixed_precision)
    activations(model, 1, 8, "cpu", cfg.train.mixed_precision)  # a family without a formula fails here, early
    return model


def is_bert_family(model: nn.Module) -> bool:
    """A post-LN encoder with BERT's layer names and BERT's pooler + linear classifier head."""
    base = without_peft(model)
    backbone = getattr(base, base.base_model_prefix, None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    return (layers is not None and hasattr(getattr(layers[0], "attention", None), "self")
            and getattr(backbone, "pooler", None) is not None
            and hasattr(getattr(base, "classifier", None), "out_features"))  # a linear (PEFT may wrap it)


@dataclass
class Setting:
    """What the recommendation may change: the micro-batch, accumulation, checkpointing, the base's bits."""

    batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    quantization: str

    def overrides(self) -> str:
        return (f"train.batch_size={self.batch_size} train.grad_accum_steps={self.grad_accum_steps} "
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()} "
                f"model.quantization={self.quantization}")


@dataclass(frozen=True)
class Sharding:
    """How the run's processes hold the model (``static_bytes``)."""

    processes: int = 1
    strategy: str = "ddp"
    whole_trained: bool = False  # the method's trained tensors stay whole under fsdp (AdaLoRA)


def estimate(model: nn.Module, setting: Setting, seq_len: int, kind: str, precision: str,
             sharding: Sharding = Sharding()) -> dict:
    """Bytes one process holds in a training step at ``setting`` with micro-batches padded to ``seq_len``
    (``train.batch_size`` is per process: so are the activations)."""
    parts = static_bytes(model, sharding.processes, sharding.strategy, sharding.whole_trained)
    if setting.quantization != "none":
        split = sharding.processes if sharding.strategy in ("fsdp", "zero3") else 1
        parts["base_weights"] = math.ceil(quantized_bytes(model, setting.quantization) / split)
    acts = activations(model, setting.batch_size, seq_len, kind, precision, setting.gradient_checkpointing)
    parts["activations"] = acts["saved"] + acts["recompute"]
    parts["total"] = sum(parts.values())
    return parts


def step_seconds(model: nn.Module, method: str, batches: list[list[int]], flops_per_s: float) -> float:
    """Mean seconds per optimizer step at ``flops_per_s``: the FLOP formula of docs/performance.md over each
    batch padded to its longest sequence (padding costs compute too)."""
    from peftbench.measure import model_shape, train_flops
    from peftbench.methods import get_method

    shape = model_shape(model, get_method(method).virtual_token_modules)
    per_batch = [train_flops(shape, [max(b)] * len(b)) for b in batches]
    return sum(per_batch) / len(per_batch) / flops_per_s


def candidates(setting: Setting, can_quantize: bool):
    """The configured setting, then ever cheaper ones with the same effective batch."""
    yield setting
    bits = ["none"] + (["8bit", "4bit"] if can_quantize and setting.quantization == "none" else [])
    for quantization in bits:
        batch, accum = setting.batch_size, setting.grad_accum_steps
        while True:
            for ckpt in (False, True):
                yield Setting(batch, accum, ckpt or setting.gradient_checkpointing, quantization)
            if batch == 1:
                break
            batch, accum = math.ceil(batch / 2), accum * 2


def plan_method(cfg, lengths: list[int], num_labels: int, vocab_size: int, kind: str, flops_per_s: float,
                budget: int | None, processes: int = 1, strategy: str = "ddp") -> dict:
    """One method's plan: the memory breakdown at the recipe's setting, the step time, and (with a budget) the
    first setting that fits."""
    from peftbench.data import LengthGroupedBatchSampler
    from peftbench.methods import get_method

    t = cfg.train
    steps_per_epoch = math.ceil(len(lengths) / t.batch_size / t.grad_accum_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    model = meta_model(cfg, vocab_size, num_labels, total_steps)
    multiple = 8 if kind == "cuda" else 1
    longest = math.ceil(max(lengths) / multiple) * multiple
    setting = Setting(t.batch_size, t.grad_accum_steps, t.gradient_checkpointing, cfg.model.quantization)
    sharding = Sharding(processes, strategy, get_method(cfg.method.name).reads_gradients)
    parts = estimate(model, setting, longest, kind, t.mixed_precision, sharding)
    order = LengthGroupedBatchSampler(lengths, t.batch_size, t.seed, t.group_by_length)
    batches = [[math.ceil(lengths[i] / multiple) * multiple for i in b] for b in order]
    seconds = step_seconds(model, cfg.method.name, batches, flops_per_s) * t.grad_accum_steps
    out = {"method": cfg.method.name, "memory": parts, "longest": longest,
           "ms_per_step": 1000 * seconds, "samples_per_s": t.batch_size * t.grad_accum_steps / seconds}
    if budget is not None:
        out["fits"] = parts["total"] <= budget
        can_quantize = not get_method(cfg.method.name).trains_base_weights
        for option in candidates(setting, can_quantize):
            option_parts = parts if option == setting else estimate(model, option, longest, kind, t.mixed_precision,
                                                                    sharding)
            if option_parts["total"] <= budget:
                out["recommend"] = None if option == setting else option.overrides()
                out["recommend_total"] = option_parts["total"]
                break
        else:
            out["recommend"] = "nothing fits: a smaller backbone or shorter task.max_length"
    return out


def plan(cfg, methods: list[str], device: str | None = None, memory: int | None = None, processes: int = 1,
         strategy: str = "ddp") -> dict:
    """Plans for ``methods`` under the recipe ``cfg`` on ``device`` (a name of :data:`DEVICES`, ``cpu``, or
    None: this machine's device, its matmul rate measured now), per process of ``processes`` under ``strategy``
    (one of :data:`STRATEGIES`)."""
    if strategy not in STRATEGIES or processes < 1:
        raise PeftbenchError(f"--strategy {strategy} --processes {processes}: a strategy of {', '.join(STRATEGIES)} "
                             "and at least one process")
    from peftbench import config as config_module
    from peftbench.measure import peak_matmul_flops
    from peftbench.train import encode_task

    precision = cfg.train.mixed_precision
    if device in DEVICES:
        spec = DEVICES[device]
        if precision not in spec.dense_flops:
            raise PeftbenchError(f"--device {device}: {spec.name} has no {precision} tensor cores "
                                 f"(train.mixed_precision: {', '.join(spec.dense_flops)})")
        kind, rate, where = "cuda", spec.dense_flops[precision], f"{spec.name} (published dense peak)"
        memory = memory if memory is not None else spec.memory_bytes
    elif device in (None, "cpu", "here"):
        here = "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        kind, rate, where = here, peak_matmul_flops(dtype), f"this machine's {here} (matmul rate measured now)"
    else:
        raise PeftbenchError(f"--device {device!r}: one of cpu, {', '.join(DEVICES)}")
    task, tokenizer, _, encoded = encode_task(cfg, ("train",))
    lengths = list(encoded["train"]["length"])
    labels = len(task.spec.model_labels())
    base = cfg.to_dict()
    rows = []
    for name in methods:
        method_cfg = cfg if name == cfg.method.name else config_module.resolve({**base, "method": {"name": name}})
        rows.append(plan_method(method_cfg, lengths, labels, len(tokenizer), kind, rate, memory, processes, strategy))
    return {"device": where, "kind": kind, "flops_per_s": rate, "memory_budget": memory, "precision": precision,
            "task": cfg.task.name, "examples": len(lengths), "base_weights": base_words(cfg), "rows": rows,
            "processes": processes, "strategy": strategy}


def base_words(cfg) -> str:
    """How the frozen base weights are stored, in words."""
    if cfg.model.quantization != "none":
        return {"8bit": "8-bit (LLM.int8)", "4bit": "4-bit NF4"}[cfg.model.quantization]
    return {"bf16": "bf16", "fp16": "fp16"}.get(cfg.train.mixed_precision, "fp32")


def format_plan(result: dict) -> str:
    mib = 2**20
    budget = result["memory_budget"]
    head = (f"{result['task']}: {result['examples']} training examples; {result['device']}, "
            f"{result['flops_per_s'] / 1e12:.2f} TFLOP/s; precision {result['precision']}, base weights "
            f"{result['base_weights']}"
            + (f"; budget {budget / GIB:.1f} GiB" if budget and budget >= GIB else
               f"; budget {budget / mib:.0f} MiB" if budget else "")
            + (f"; per process of {result['processes']} ({result['strategy']})" if result.get("processes", 1) > 1
               else ""))
    lines = [head, "", "| method | base MiB | trained MiB | gradients MiB | optimizer MiB | activations MiB | "
             "total MiB | ms/step ≥ | samples/s ≤ |" + (" fits | recommendation |" if budget else ""),
             "|---" * (11 if budget else 9) + "|"]
    for row in result["rows"]:
        m = row["memory"]
        cells = [row["method"], *(f"{m[k] / mib:.1f}" for k in ("base_weights", "trained_weights", "gradients",
                                                                  "optimizer_state", "activations", "total")),
                 f"{row['ms_per_step']:.1f}", f"{row['samples_per_s']:.0f}"]
        if budget:
            cells += ["yes" if row["fits"] else "no", row["recommend"] or "as is"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Activations at the longest batch ({result['rows'][0]['longest']} tokens); step time at the "
                 "dense matmul rate, a lower bound (docs/planning.md).")
    return "\n".join(lines)
