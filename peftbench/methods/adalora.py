"""AdaLoRA (Zhang et al. 2023, arXiv:2303.10512) through PEFT.

LoRA in SVD form, W + P diag(E) Q, with singular values E pruned during training:
every optimizer step updates importance scores (smoothed |w * grad|), and the
total rank budget falls on a cubic schedule from ``init_r`` per module to
``target_r`` per module between step ``tinit`` and ``total_steps - tfinal``, then
stays fixed. An orthogonality regulariser ||P^T P - I||^2 + ||Q Q^T - I||^2 is
added to the loss (PEFT adds it in the forward, weighted by ``orth_reg_weight``).

``total_step`` comes from the actual run length; ``update_and_allocate`` runs in
``on_optimizer_step``, once per optimizer step (after the step, before the
gradients are cleared), never per micro-batch. Trainable parameters:
Σ_modules init_r * (d_in + d_out + 1) plus the head; the record's method summary
holds the final rank of each module.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.config import require
from peftbench.errors import PeftbenchError
from peftbench.methods import MethodConfig, PeftMethod, register_method

SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT's RankAllocator: importance, its two smoothed terms


@dataclass
class AdaLoraConfig(MethodConfig):
    name: str = "adalora"
    init_r: int = 12  # starting rank per module
    target_r: int = 8  # average final rank per module
    alpha: int = 32  # scaling numerator
    dropout: float = 0.1  # dropout on the update's input
    target_modules: list[str] | None = None  # None = PEFT's default (BERT: query, value)
    tinit_ratio: float = 0.1  # share of steps before pruning starts
    tfinal_ratio: float = 0.2  # share of steps at the final budget
    delta_t: int = 1  # steps between budget reallocations
    beta1: float = 0.85  # importance smoothing (sensitivity)
    beta2: float = 0.85  # importance smoothing (uncertainty)
    orth_reg_weight: float = 0.5  # weight of the orthogonality regulariser

    def __post_init__(self):
        require(self.init_r >= 1, "method.init_r", ">= 1", self.init_r)
        require(self.target_r >= 1, "method.target_r", ">= 1", self.target_r)
        require(0 <= self.dropout < 1, "method.dropout", "in [0, 1)", self.dropout)
        require(self.delta_t >= 1, "method.delta_t", ">= 1", self.delta_t)
        for key in ("tinit_ratio", "tfinal_ratio"):
            require(0 <= getattr(self, key) < 1, f"method.{key}", "in [0, 1)", getattr(self, key))
        if self.target_r > self.init_r:
            raise PeftbenchError(f"config key 'method.target_r' ({self.target_r}) must be <= "
                                 f"method.init_r ({self.init_r})")


@register_method
class AdaLora(PeftMethod):
    name = "adalora"
    lr_range = (1e-4, 3e-2)  # a learning-rate search's default (log-spaced) range
    default_lr = 1e-3  # train.lr when unset: AdaLoRA on DeBERTaV3-base GLUE (Zhang et al. 2023: 5e-4..1.2e-3)
    reads_gradients = True  # the rank allocation scores every LoRA weight by its gradient
    masks_trained_weights = True  # the budget masks the singular values of pruned ranks
    Config = AdaLoraConfig
    plain_model = True
    trainable_markers = ("lora_",)

    def peft_config(self, ctx):
        cfg = self.cfg
        total = max(ctx.total_steps, 1)
        tinit, tfinal = round(cfg.tinit_ratio * total), round(cfg.tfinal_ratio * total)
        if ctx.total_steps and total - tinit - tfinal < 1:
            raise PeftbenchError(f"method adalora: {total} steps leave no pruning phase after tinit={tinit} and "
                                 f"tfinal={tfinal}; train longer or lower method.tinit_ratio / method.tfinal_ratio")
        from peft import AdaLoraConfig as PeftAdaLoraConfig

        return PeftAdaLoraConfig(task_type=ctx.peft_task_type, init_r=cfg.init_r, target_r=cfg.target_r,
                                 lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                                 tinit=tinit, tfinal=tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
                                 orth_reg_weight=cfg.orth_reg_weight, total_step=total)

    def on_optimizer_step(self, model, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def training_state(self, model) -> dict:
        """The importance scores (smoothed sensitivity and uncertainty) and the rank pattern found so far."""
        allocator = model.base_model.rankallocator
        return {**{key: dict(getattr(allocator, key)) for key in SCORES},
                "rank_pattern": model.peft_config["default"].rank_pattern}

    def load_training_state(self, model, state: dict) -> None:
        allocator, device = model.base_model.rankallocator, next(model.parameters()).device
        for key in SCORES:
            setattr(allocator, key, {name: score.to(device) for name, score in state[key].items()})
        model.peft_config["default"].rank_pattern = state["rank_pattern"]

    def summary(self, model) -> dict:
        cfg = model.peft_config["default"]
        n_modules = sum(1 for n, _ in model.named_parameters() if ".lora_E." in n)
        # rank_pattern: {"<module path>.lora_E[.default]": [kept?] * init_r}, set once pruning has run
        ranks = {key.removeprefix("base_model.model.").split(".lora_E")[0]: int(sum(kept))
                 for key, kept in (cfg.rank_pattern or {}).items()}
        return {"init_total_rank": cfg.init_r * n_modules, "target_total_rank": cfg.target_r * n_modules,
                "final_total_rank": sum(ranks.values()) if ranks else None, "final_ranks": ranks}
