"""peftbench's bottleneck adapters against AdapterHub's own tensors (benchmarks/adapterhub_reference.py made
tests/data/adapterhub_reference.safetensors with adapters 1.3.0 on transformers 4.57.6): the same base and
adapter weights give the same hidden states and logits."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from peftbench.errors import PeftbenchError
from peftbench.methods import RunContext, get_method

REFERENCE = Path(__file__).parent / "data" / "adapterhub_reference.safetensors"
CONFIG = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              num_labels=3, initializer_range=0.1)
NAMES = {"adapter_down.0": "down", "adapter_up": "up"}  # AdapterHub's module names -> peftbench's


@pytest.fixture(scope="module")
def reference():
    return load_file(REFERENCE)


def ours(variant: str, tensors: dict) -> torch.nn.Module:
    model = BertForSequenceClassification(BertConfig(**CONFIG, attn_implementation="eager"))
    model.load_state_dict({k.removeprefix("base."): v for k, v in tensors.items() if k.startswith("base.")})
    method = get_method("adapter")(get_method("adapter").Config(variant=variant, reduction_factor=8,
                                                                 activation="relu"))
    model = method.apply(model, RunContext(total_steps=1, num_labels=3))
    where = ".adapter." if variant == "pfeiffer" else ".dense.adapter."  # the whole block, or an adapted projection
    weights = {}
    for key, value in tensors.items():
        found = re.fullmatch(rf"{variant}\.adapter\.(.+)\.adapters\.a\.(adapter_down\.0|adapter_up)\.(weight|bias)",
                             key)
        if found:
            block, module, kind = found.groups()
            weights[f"{block}{where}{NAMES[module]}.{kind}"] = value
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and len(weights) == 4 * CONFIG["num_hidden_layers"] * (2 if variant == "houlsby" else 1)
    return model.eval()


@pytest.mark.parametrize("variant", ["pfeiffer", "houlsby"])
def test_adapters_match_adapterhub(reference, variant):
    model = ours(variant, reference)
    batch = {k.removeprefix("input."): v for k, v in reference.items() if k.startswith("input.")}
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    for i, hidden in enumerate(out.hidden_states):
        torch.testing.assert_close(hidden, reference[f"{variant}.hidden.{i}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, reference[f"{variant}.logits"], atol=1e-5, rtol=0)


def test_the_other_variant_does_not_match(reference):
    """The reference tells the placements apart: Houlsby's FFN placement with Pfeiffer's weights (variant ffn)
    is off by far more than the tolerance."""
    model = ours("pfeiffer", reference)
    ffn = ours("ffn", {k.replace("pfeiffer.adapter.", "ffn.adapter."): v for k, v in reference.items()})
    batch = {k.removeprefix("input."): v for k, v in reference.items() if k.startswith("input.")}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference["pfeiffer.logits"], atol=1e-5)
        assert (ffn(**batch).logits - reference["pfeiffer.logits"]).abs().max() > 1e-3


def test_pfeiffer_refuses_a_pre_ln_decoder():
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    model = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=4, num_key_value_heads=2,
                                                       intermediate_size=64, num_labels=3, pad_token_id=0))
    method = get_method("adapter")(get_method("adapter").Config(variant="pfeiffer"))
    with pytest.raises(PeftbenchError, match="needs a post-LN output block .* use variant=ffn"):
        method.apply(model, RunContext(total_steps=1, num_labels=3))
