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

Parts: ``slots`` (an adapter taken apart into per-row tensors and a head), ``rows`` (a batch's rows and what
their adapters have at one place), ``layers`` (the backbone's modules wrapped to apply them), ``base`` (the shared
backbone and the forward pass).
"""

from peftbench.mixed.base import SharedBase
from peftbench.mixed.slots import NotShareable, Slot

__all__ = ["NotShareable", "SharedBase", "Slot"]
