"""Reference tensors from AdapterHub for peftbench's bottleneck adapters (tests/test_adapter_parity.py).

Runs in its own virtual environment, since AdapterHub pins an older transformers:

    python3 -m venv /tmp/ahvenv
    /tmp/ahvenv/bin/pip install torch==2.13.0 && /tmp/ahvenv/bin/pip install adapters==1.3.0 transformers==4.57.6
    /tmp/ahvenv/bin/python benchmarks/adapterhub_reference.py tests/data/adapterhub_reference.safetensors

A 2-layer, 32-wide BERT with random weights (seed 0) gets AdapterHub's ``SeqBnConfig`` (Pfeiffer) and
``DoubleSeqBnConfig`` (Houlsby), reduction factor 8, ReLU; every adapter weight is drawn at random (seed 1;
AdapterHub starts W_up near zero, which would hide the placement). The file holds the base weights
(``base.*``), each variant's adapter weights under AdapterHub's names (``<variant>.adapter.*``), the input
batch, and the eval-mode hidden states and logits (``<variant>.hidden.<i>``, ``<variant>.logits``).
"""

from __future__ import annotations

import sys

import adapters
import torch
import transformers
from adapters import DoubleSeqBnConfig, SeqBnConfig
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

CONFIG = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              num_labels=3, initializer_range=0.1)
VARIANTS = {"pfeiffer": SeqBnConfig(reduction_factor=8, non_linearity="relu"),
            "houlsby": DoubleSeqBnConfig(reduction_factor=8, non_linearity="relu")}
BATCH = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 8, 13, 3]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])}


def main(out: str) -> None:
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**CONFIG, attn_implementation="eager")).eval()
    tensors = {f"base.{k}": v.clone() for k, v in base.state_dict().items()}
    tensors.update({f"input.{k}": v for k, v in BATCH.items()})
    for variant, adapter_config in VARIANTS.items():
        model = BertForSequenceClassification(BertConfig(**CONFIG, attn_implementation="eager"))
        model.load_state_dict(base.state_dict())
        adapters.init(model)
        model.add_adapter("a", config=adapter_config)
        model.set_active_adapters("a")
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if ".adapters.a." in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.1
                tensors[f"{variant}.adapter.{name}"] = param.data.clone()
        model.eval()
        with torch.no_grad():
            out_ = model(**BATCH, output_hidden_states=True)
        tensors[f"{variant}.logits"] = out_.logits
        for i, h in enumerate(out_.hidden_states):
            tensors[f"{variant}.hidden.{i}"] = h
    save_file({k: v.contiguous() for k, v in tensors.items()}, out,
              metadata={"adapters": adapters.__version__, "transformers": transformers.__version__,
                        "torch": torch.__version__})


if __name__ == "__main__":
    main(sys.argv[1])
