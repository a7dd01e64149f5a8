"""The tokenizer and masked-LM model a pretraining run trains."""

from __future__ import annotations

from pathlib import Path

import torch

from peftbench import checkpoint
from peftbench.errors import PeftbenchError
from peftbench.methods import RunContext, get_method, set_trainable
from peftbench.models import build_char_vocab
from peftbench.noise import quiet_loading
from peftbench.pretrain.config import PretrainConfig
from peftbench.records import write_text_atomic


def load_tokenizer(cfg: PretrainConfig, out_dir: Path, docs: list[str], fresh: bool):
    """From scratch: a char vocabulary of the corpus (built on a fresh start, re-read on resume)."""
    from transformers import AutoTokenizer, BertTokenizer

    m = cfg.model
    if not m.from_scratch:
        try:
            tokenizer = AutoTokenizer.from_pretrained(m.name_or_path)
        except OSError as exc:
            raise PeftbenchError(f"config key 'model.name_or_path': cannot load '{m.name_or_path}' ({exc})") from None
        if tokenizer.mask_token_id is None:
            raise PeftbenchError(f"config key 'model.name_or_path': tokenizer of '{m.name_or_path}' has no mask token")
        return tokenizer
    if fresh:
        write_text_atomic(out_dir / VOCAB_FILE, "\n".join(build_char_vocab(docs, m.vocab_min_freq)) + "\n")
    return BertTokenizer(vocab=str(run_vocab(out_dir)), do_lower_case=True)


VOCAB_FILE = "pretrain_vocab.txt"  # a from-scratch run's vocabulary, beside its state until model/ holds it


def run_vocab(out_dir: Path) -> Path:
    """The vocabulary of the from-scratch run in ``out_dir`` (one interrupted before it was kept beside the state:
    in model/, which it had rewritten at its start)."""
    for path in (out_dir / VOCAB_FILE, out_dir / checkpoint.MODEL_DIR / "vocab.txt"):
        if path.is_file():
            return path
    raise PeftbenchError(f"{out_dir / VOCAB_FILE}: the vocabulary of the run to resume is missing; delete "
                         f"{out_dir / checkpoint.CHECKPOINT_DIR} to start over")


def load_model(cfg: PretrainConfig, tokenizer):
    """The masked-LM model with its method applied: ``full`` (from scratch or continued), or ``lora``
    (continued pretraining of adapters, merged into the saved model). Returns (model, parameter counts)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    m = cfg.model
    if m.from_scratch:
        arch = {"max_position_embeddings": max(512, cfg.mask.block_size), **m.architecture}
        try:
            model_config = AutoConfig.for_model(m.model_type, vocab_size=len(tokenizer),
                                                pad_token_id=tokenizer.pad_token_id, **arch)
        except (ValueError, TypeError) as exc:
            raise PeftbenchError(f"config key 'model.architecture': {exc}") from None
        model = AutoModelForMaskedLM.from_config(model_config)
    else:
        try:
            with quiet_loading():  # fp32 master weights, whatever the files store
                model = AutoModelForMaskedLM.from_pretrained(m.name_or_path, dtype=torch.float32)
        except OSError as exc:
            raise PeftbenchError(f"config key 'model.name_or_path': cannot load '{m.name_or_path}' ({exc})") from None
    method_cls = get_method("lora" if m.lora_r else "full")
    method_cfg = (method_cls.Config(r=m.lora_r, alpha=2 * m.lora_r, dropout=0.0, target_modules=m.lora_target_modules)
                  if m.lora_r else method_cls.Config())
    method = method_cls(method_cfg)
    model = method.apply(model, RunContext(total_steps=cfg.train.max_steps, num_labels=0, peft_task_type=None))
    return model, set_trainable(model, method)
