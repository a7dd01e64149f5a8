"""A local checkpoint zoo: small models saved the way hub releases are, built from configs at test time.

- ``bert``: a BERT saved from its pretraining model (MLM + NSP heads, pooler), a ``vocab.txt``
  WordPiece tokenizer and nothing else, like bert-base-chinese.
- ``bert-no-pooler``: a BERT saved from its masked-LM model (no pooler), like chinese-roberta-wwm-ext
  and peftbench's own pretraining: transformers initialises the pooler at random on every load.
- ``qwen2-bf16``: a Qwen2 decoder with grouped-query attention and tied embeddings, stored in bf16
  (safetensors only), whose config has no ``pad_token_id`` while its byte-level BPE tokenizer pads with
  ``<|endoftext|>``, like Qwen2.5.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as token_models
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from peftbench.models import build_char_vocab
from peftbench.tasks.synthetic import generate_splits

BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "max_position_embeddings": 128}


def _texts() -> list[str]:
    return [r["sentence"] for r in generate_splits()["train"]]


def _vocab_txt(path: Path) -> int:
    vocab = build_char_vocab(_texts())
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return len(vocab)


def bert(path: Path, pooler: bool) -> Path:
    torch.manual_seed(1)
    config = BertConfig(vocab_size=_vocab_txt(path), **BERT)
    (BertForPreTraining if pooler else BertForMaskedLM)(config).save_pretrained(str(path))
    return path


def qwen2_bf16(path: Path) -> Path:
    bpe = Tokenizer(token_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_texts(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(str(path))
    end = tokenizer.eos_token_id
    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                         bos_token_id=end, eos_token_id=end)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(str(path))
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("pad_token_id", None)
    config_file.write_text(json.dumps(saved, indent=2))
    return path


def build_zoo(root: Path) -> dict[str, Path]:
    return {"bert": bert(root / "bert", pooler=True), "bert-no-pooler": bert(root / "bert-no-pooler", pooler=False),
            "qwen2-bf16": qwen2_bf16(root / "qwen2-bf16")}
