"""IA3 (Liu et al. 2022, arXiv:2205.05638) through PEFT.

Learned vectors rescale activations elementwise: keys and values in attention
(k' = l_k * k, v' = l_v * v) and the input of the feed-forward output projection
(l_ff * h). Vectors start at ones, so training starts from the base model.
Trainable parameters: per layer d_k + d_v + d_ff (BERT-base: 768 + 768 + 3072),
plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.methods import MethodConfig, PeftMethod, register_method


@dataclass
class IA3Config(MethodConfig):
    name: str = "ia3"
    target_modules: list[str] | None = None  # None = PEFT's default (BERT: key, value, output.dense)
    feedforward_modules: list[str] | None = None  # scaled on their input; None = PEFT's default (BERT: output.dense)


@register_method
class IA3(PeftMethod):
    name = "ia3"
    lr_range = (1e-3, 1e-1)  # a learning-rate search's default (log-spaced) range
    default_lr = 3e-3  # train.lr when unset: (IA)3 (Liu et al. 2022, T-Few: 3e-3)
    Config = IA3Config
    plain_model = True
    trainable_markers = ("ia3_",)

    def peft_config(self, ctx):
        from peft import IA3Config as PeftIA3Config

        return PeftIA3Config(task_type=ctx.peft_task_type, target_modules=self.cfg.target_modules,
                             feedforward_modules=self.cfg.feedforward_modules)
