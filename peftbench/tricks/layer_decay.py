"""Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA; Sun et al. 2019): lower layers, which hold more
general features, move more slowly. With ``n`` layers in the backbone's stack and decay ``d``, layer ``i``
(0 at the bottom) trains at ``lr * d ** (n - i)``, the embeddings at ``lr * d ** (n + 1)``, and everything above the
stack (pooler, head) at ``lr``. A PEFT method's parameters inside a layer (LoRA's A and B, an adapter) take that
layer's rate."""

from __future__ import annotations

import re
from typing import Callable

import torch

from peftbench.errors import PeftbenchError


def layer_scales(model: torch.nn.Module, decay: float) -> Callable[[str], float]:
    """A parameter name's rate factor in ``model`` (names as ``model.named_parameters()`` gives them)."""
    stack, n = _layer_stack(model)
    embedding = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
    parent = embedding.rpartition(".")[0]
    if parent and not stack.startswith(parent + "."):  # an embeddings block beside the stack (BERT's)
        embedding = parent
    layer = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")

    def scale(name: str) -> float:
        if found := layer.match(name):
            return decay ** (n - int(found[1]))
        return decay ** (n + 1) if name.startswith(embedding + ".") else 1.0

    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    if all(scale(name) == 1.0 for name in trained):
        raise PeftbenchError(f"config key 'train.layer_decay': none of the trained parameters lies in a layer of "
                             f"'{stack}' or in the embeddings (they are {', '.join(sorted(trained)[:3])}, ...), so "
                             "every one would keep the base rate; leave train.layer_decay at 1")
    return scale


def _layer_stack(model: torch.nn.Module) -> tuple[str, int]:
    """The name and length of the model's stack of transformer layers: its longest ``ModuleList`` of one class."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and len({type(x) for x in m}) == 1 and any(p.numel() for p in m.parameters())]
    if not lists:
        raise PeftbenchError("config key 'train.layer_decay': the model has no stack of layers to decay over")
    n, name = max(lists)
    return name, n
