"""A quantised decoder backbone (every method on decoders: tests/test_zoo.py)."""

import pytest
import torch
from conftest import logits_here, logits_in_new_process

from peftbench import config
from peftbench.train import run


def test_lora_on_an_8bit_decoder(zoo, tmp_path):
    """The head (``score``) stays in float: an int8 head cannot be made trainable."""
    pytest.importorskip("bitsandbytes")
    cfg = config.load(None, [f"model.name_or_path={zoo['qwen2-bf16']}", "method.name=lora", "model.quantization=8bit",
                             "train.max_steps=6", "task.max_length=48", "train.lr=1e-3",
                             "train.measure_inference=false", "train.evaluate_test=false", f"output_dir={tmp_path}"])
    result = run(cfg)
    dtypes = {n: p.dtype for n, p in result.model.named_parameters()}
    assert dtypes[next(n for n in dtypes if n.endswith("mlp.up_proj.weight"))] == torch.int8
    assert all(dtypes[n] == torch.float32 for n in dtypes if ".score." in n)
    texts = ["股钱债涨跌", "星影歌剧综艺的"]
    reloaded = logits_in_new_process({"lora": result.record["checkpoint"]}, texts, tmp_path)
    torch.testing.assert_close(reloaded["lora"], logits_here(result, texts), atol=1e-5, rtol=0)
