"""Weights, gradients and optimizer state from the model built on the meta device, quantised base bytes, and
activation bytes measured with autograd's saved-tensor hooks (what the formulas are checked against)."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftbench.plan.activations import activations

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
    ctx = RunContext(total_steps, num_labels, kind.peft_task_type, kind.labels_per_token)
    try:
        with torch.device("meta"):
            model = method.apply(kind.auto_class.from_config(config), ctx)
    except (RuntimeError, NotImplementedError):  # a tuner whose set-up computes with the weights (PiSSA's SVD)
        model = method.apply(kind.auto_class.from_config(config), ctx)
    set_trainable(model, method)
    settle_dtypes(model, cfg.train.mixed_precision)
    activations(model, 1, 8, "cpu", cfg.train.mixed_precision)  # a family without a formula fails here, early
    return model
