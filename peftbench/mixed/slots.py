"""An adapter as a slot of a shared base: its per-row tensors by backbone module, and its head; taken apart
from a loaded checkpoint (:func:`extract`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods.adapter import ACTIVATIONS
from peftbench.models import without_peft

if TYPE_CHECKING:
    from peftbench.mixed.base import SharedBase

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
