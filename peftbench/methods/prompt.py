"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) through PEFT.

``num_virtual_tokens`` learned embeddings are prepended to the input embeddings
(and the attention mask); the backbone is frozen. Only the input layer is
touched, unlike prefix tuning, which reaches every layer. Trainable parameters:
num_virtual_tokens * d_model, plus the head.

Token classification: the backbone's outputs then start with one position per
virtual token. Their labels are set to -100 (no loss), and the loop reads the
last positions, which belong to the input.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.config import require
from peftbench.methods import MethodConfig, PeftMethod, register_method


@dataclass
class PromptConfig(MethodConfig):
    name: str = "prompt"
    num_virtual_tokens: int = 20  # soft-prompt length n

    def __post_init__(self):
        require(self.num_virtual_tokens >= 1, "method.num_virtual_tokens", ">= 1", self.num_virtual_tokens)


@register_method
class Prompt(PeftMethod):
    name = "prompt"
    lr_range = (1e-3, 3e-1)  # a learning-rate search's default (log-spaced) range
    default_lr = 3e-2  # train.lr when unset: soft prompts with AdamW (Lester et al. 2021: 0.3 with Adafactor)
    Config = PromptConfig
    trainable_markers = ("prompt_encoder.",)
    virtual_token_modules = ("prompt_encoder",)

    def peft_config(self, ctx):
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=ctx.peft_task_type, num_virtual_tokens=self.cfg.num_virtual_tokens)
