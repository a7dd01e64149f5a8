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

from peftbench.plan.activations import activations, is_bert_family, is_decoder_family
from peftbench.plan.devices import DEVICES, GIB, Device, parse_bytes
from peftbench.plan.memory import STRATEGIES, count_saved, meta_model, quantized_bytes, static_bytes
from peftbench.plan.report import format_plan
from peftbench.plan.settings import Setting, Sharding, estimate, plan, plan_method, step_seconds

__all__ = ["DEVICES", "Device", "GIB", "STRATEGIES", "Setting", "Sharding", "activations", "count_saved", "estimate",
           "format_plan", "is_bert_family", "is_decoder_family", "meta_model", "parse_bytes", "plan", "plan_method",
           "quantized_bytes", "static_bytes", "step_seconds"]
