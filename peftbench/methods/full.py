"""Full fine-tuning: every weight of the backbone and the head is trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftbench.methods import Method, MethodConfig, register_method
from peftbench.noise import quiet_loading


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"


@register_method
class Full(Method):
    name = "full"
    lr_range = (1e-5, 1e-3)  # a learning-rate search's default (log-spaced) range
    default_lr = 2e-5  # train.lr when unset: BERT fine-tuning (Devlin et al. 2019: 2e-5..5e-5; CLUE baselines: 2e-5)
    Config = FullConfig
    plain_model = True
    saves_full_model = True
    trains_base_weights = True

    def is_trainable(self, name: str) -> bool:
        return True

    def save(self, model, out_dir: Path, state: dict | None = None) -> None:
        model.save_pretrained(str(out_dir), state_dict=state)

    def load(self, base_model, ckpt_dir: Path, ctx):
        import torch
        import transformers

        # e.g. BertForTokenClassification; in fp32, as trained
        architecture = transformers.AutoConfig.from_pretrained(str(ckpt_dir)).architectures[0]
        with quiet_loading():
            return getattr(transformers, architecture).from_pretrained(str(ckpt_dir), dtype=torch.float32)
