"""Every method also trains and reloads on a decoder backbone (a tiny Qwen2 with grouped-query attention)."""

import pytest
import torch
from conftest import logits_here, logits_in_new_process
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from peftbench import config, models
from peftbench.methods import method_names
from peftbench.tasks.synthetic import generate_splits
from peftbench.train import run


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A local model directory: random-init Qwen2 + a char tokenizer without token types."""
    path = tmp_path_factory.mktemp("qwen2")
    texts = [r["sentence"] for r in generate_splits()["train"]]
    tok = models.char_tokenizer(texts)
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, pad_token_id=tok.pad_token_id, num_labels=4)
    Qwen2ForSequenceClassification(cfg).save_pretrained(str(path))
    return path


def test_every_method_runs_and_reloads_on_a_decoder(qwen_dir, tmp_path):
    results = {}
    for method in method_names():
        cfg = config.load(None, [f"model.name_or_path={qwen_dir}", f"method.name={method}", "train.max_steps=6",
                                 "task.max_length=48", "train.lr=1e-3", f"output_dir={tmp_path / method}"])
        results[method] = run(cfg)
        assert results[method].record["status"] == "success"
    texts = ["股钱债涨跌", "星影歌剧综艺的"]
    reloaded = logits_in_new_process({m: r.record["checkpoint"] for m, r in results.items()}, texts, tmp_path)
    for method, result in results.items():
        torch.testing.assert_close(reloaded[method], logits_here(result, texts), atol=1e-5, rtol=0, msg=method)


def test_lora_on_an_8bit_decoder(qwen_dir, tmp_path):
    """The head (``score``) stays in float: an int8 head cannot be made trainable."""
    pytest.importorskip("bitsandbytes")
    cfg = config.load(None, [f"model.name_or_path={qwen_dir}", "method.name=lora", "model.quantization=8bit",
                             "train.max_steps=6", "task.max_length=48", "train.lr=1e-3", f"output_dir={tmp_path}"])
    result = run(cfg)
    dtypes = {n: p.dtype for n, p in result.model.named_parameters()}
    assert dtypes[next(n for n in dtypes if n.endswith("mlp.up_proj.weight"))] == torch.int8
    assert all(dtypes[n] == torch.float32 for n in dtypes if ".score." in n)
    texts = ["股钱债涨跌", "星影歌剧综艺的"]
    reloaded = logits_in_new_process({"lora": result.record["checkpoint"]}, texts, tmp_path)
    torch.testing.assert_close(reloaded["lora"], logits_here(result, texts), atol=1e-5, rtol=0)
