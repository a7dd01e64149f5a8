"""LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT.

Each targeted linear layer W gets a low-rank update: h = W x + (alpha / r) * B A x,
with A (r x d_in, Kaiming-uniform) and B (d_out x r, zeros) trained and W frozen,
so training starts from the base model. ``use_rslora`` scales by alpha / sqrt(r)
(Kalajdzievski 2023); ``use_dora`` adds a trained magnitude vector per output
(Liu et al. 2024). The classification head is trained in full (PEFT's
``modules_to_save``). Trainable parameters: sum over targeted layers of
r * (d_in + d_out), plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.config import require
from peftbench.methods import MethodConfig, PeftMethod, register_method


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8  # rank
    alpha: int = 16  # scale numerator (update scaled by alpha / r)
    dropout: float = 0.1  # dropout on the LoRA branch input
    target_modules: list[str] | None = None  # None = PEFT's default for the architecture (BERT: query, value)
    use_rslora: bool = False  # scale by alpha / sqrt(r) (rsLoRA)
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output (DoRA)

    def __post_init__(self):
        require(self.r >= 1, "method.r", ">= 1", self.r)
        require(self.alpha > 0, "method.alpha", "> 0", self.alpha)
        require(0 <= self.dropout < 1, "method.dropout", "in [0, 1)", self.dropout)


@register_method
class Lora(PeftMethod):
    name = "lora"
    lr_range = (1e-4, 3e-2)  # a learning-rate search's default (log-spaced) range
    default_lr = 5e-4  # train.lr when unset: LoRA on RoBERTa-base GLUE (Hu et al. 2021: 4e-4..5e-4)
    Config = LoraConfig
    plain_model = True
    trainable_markers = ("lora_",)

    def peft_config(self, ctx):
        cfg = self.cfg
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(task_type=ctx.peft_task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
