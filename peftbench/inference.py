"""Reload a trained checkpoint for inference: ``model, tokenizer, meta = peftbench.load(dir)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftbench.config import resolve
from peftbench.errors import PeftbenchError
from peftbench.methods import get_method
from peftbench.train import META_FILE


def load(ckpt_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the trained model from a peftbench checkpoint directory, in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise PeftbenchError(f"{ckpt_dir}: not a peftbench checkpoint ({META_FILE} missing)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cfg = resolve(meta["config"])
    method = get_method(meta["method"])(cfg.method)
    base = None
    if meta["base_model"] is not None:
        source = ckpt_dir / "base" if meta["base_model"] == "base" else meta["base_model"]
        labels = meta["labels"]
        base = AutoModelForSequenceClassification.from_pretrained(
            str(source), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = method.load(base, ckpt_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
    return model, tokenizer, meta
