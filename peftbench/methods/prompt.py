"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) through PEFT.

``num_virtual_tokens`` learned embeddings are prepended to the input embeddings
(and the attention mask); the backbone is frozen. Only the input layer is
touched, unlike prefix tuning, which reaches every layer. Trainable parameters:
num_virtual_tokens * d_model, plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PromptTuningConfig, TaskType

from peftbench.methods import MethodConfig, PeftMethod, register_method


@dataclass
class PromptConfig(MethodConfig):
    name: str = "prompt"
    num_virtual_tokens: int = 20


@register_method
class Prompt(PeftMethod):
    name = "prompt"
    Config = PromptConfig
    trainable_markers = ("prompt_encoder.",)

    def peft_config(self, ctx):
        return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.cfg.num_virtual_tokens)
