"""LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT, and the variants that change how it starts or learns.

Each targeted linear layer W gets a low-rank update: h = W x + (alpha / r) * B A x,
with A (r x d_in, Kaiming-uniform) and B (d_out x r, zeros) trained and W frozen,
so training starts from the base model. ``use_rslora`` scales by alpha / sqrt(r)
(Kalajdzievski 2023); ``use_dora`` adds a trained magnitude vector per output
(Liu et al. 2024). The classification head is trained in full (PEFT's
``modules_to_save``). Trainable parameters: sum over targeted layers of
r * (d_in + d_out), plus the head.

Variants, each also a method name of its own with its defaults (docs/methods/<name>.md):
``b_lr_ratio`` (LoRA+, Hayou et al. 2024, arXiv:2402.12354: B learns ``b_lr_ratio`` times faster than A);
``train_a=false`` (LoRA-FA, Zhang et al. 2023, arXiv:2308.03303: A stays at its random init, only B
trains: r * d_out per layer); ``init=pissa`` (Meng et al. 2024, arXiv:2404.02948: A, B from the top r
singular vectors of W, which keeps the rest) and ``init=olora`` (Büyükakyüz 2024, arXiv:2406.01775: from
W's QR decomposition). PiSSA and OLoRA rewrite the frozen W to W - B0 A0; the checkpoint is rewritten
as a plain LoRA of rank 2r on the unmodified base (B A - B0 A0), so it reloads on, and is
served with, the same base as every other adapter. ``init=loftq`` (Li et al. 2023, arXiv:2310.08659), on a
4-bit base only: B A starts as the best rank-r approximation of the quantisation error W - Q(W), so the adapted
model starts closer to the float one; the base stays the plain 4-bit one, and the adapter is a plain LoRA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from peftbench.config import require
from peftbench.errors import PeftbenchError
from peftbench.methods import MethodConfig, PeftMethod, register_method

INITS = ("default", "pissa", "olora", "loftq")  # how A and B start: PEFT's init_lora_weights
REWRITES_BASE = ("pissa", "olora")


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8  # rank
    alpha: int = 16  # scale numerator (update scaled by alpha / r)
    dropout: float = 0.1  # dropout on the LoRA branch input
    target_modules: list[str] | None = None  # None = PEFT's default for the architecture (BERT: query, value)
    use_rslora: bool = False  # scale by alpha / sqrt(r) (rsLoRA)
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output (DoRA)
    b_lr_ratio: float = 1.0  # B's learning rate over A's (LoRA+: 16)
    train_a: bool = True  # false: A stays at its random init and only B trains (LoRA-FA)
    init: str = "default"  # how A and B start: default (B = 0), pissa, olora (from W), loftq (4-bit error)

    def __post_init__(self):
        require(self.r >= 1, "method.r", ">= 1", self.r)
        require(self.alpha > 0, "method.alpha", "> 0", self.alpha)
        require(0 <= self.dropout < 1, "method.dropout", "in [0, 1)", self.dropout)
        require(self.b_lr_ratio > 0, "method.b_lr_ratio", "> 0", self.b_lr_ratio)
        require(self.init in INITS, "method.init", f"one of {', '.join(INITS)}", self.init)
        require(self.train_a or self.init == "default", "method.train_a", "true with init other than default "
                "(a frozen A must be random)", self.train_a)
        require(not self.use_dora or self.init == "default", "method.use_dora", "false with init other than "
                "default (a magnitude vector of the rewritten base does not carry to the original)", self.use_dora)


@register_method
class Lora(PeftMethod):
    name = "lora"
    lr_range = (1e-4, 3e-2)  # a learning-rate search's default (log-spaced) range
    default_lr = 5e-4  # train.lr when unset: LoRA on RoBERTa-base GLUE (Hu et al. 2021: 4e-4..5e-4)
    Config = LoraConfig
    plain_model = True
    trainable_markers = ("lora_",)
    initial = None  # PiSSA/OLoRA: lora_A/B as initialised, which turn the trained adapter into a plain LoRA

    def peft_config(self, ctx):
        cfg = self.cfg
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(task_type=ctx.peft_task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                              init_lora_weights={"default": True, "loftq": True}.get(cfg.init, cfg.init))

    def apply(self, model, ctx):
        from peft.utils import get_peft_model_state_dict

        model = super().apply(model, ctx)
        if self.cfg.init == "loftq" and not next(model.parameters()).is_meta:  # a plan's meta model holds no error
            loftq_init(model, ctx.float_weight)
        if self.cfg.init in REWRITES_BASE:
            self.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()
                            if ".lora_A." in k or ".lora_B." in k}
        return model

    def is_trainable(self, name: str) -> bool:
        return super().is_trainable(name) and (self.cfg.train_a or "lora_A" not in name)

    def lr_scale(self, name: str) -> float:
        return self.cfg.b_lr_ratio if "lora_B" in name else 1.0

    def save(self, model, out_dir, state=None):
        super().save(model, out_dir, state)
        if self.initial is not None:
            to_plain_lora(Path(out_dir), self.initial)

    def saved_bytes(self, model, state=None):
        start = sum(t.numel() * t.element_size() for t in (self.initial or {}).values())  # the rank-2r half
        return super().saved_bytes(model, state) + start

    def summary(self, model):
        return {"saved_as": "plain LoRA of rank 2r (B A - B0 A0)"} if self.initial is not None else {}


@torch.no_grad()
def loftq_init(model, float_weight) -> None:
    """LoftQ's start (one alternation, on the base's own 4-bit weights Q(W), as PEFT's
    ``replace_lora_weights_loftq``, which needs CUDA): for each adapted 4-bit layer, with U S Vᵀ the SVD of the
    quantisation error W - Q(W) and s the LoRA scale, A = √(S_r/s) V_rᵀ and B = U_r √(S_r/s), so that s B A is
    the error's best rank-r approximation (PEFT's own leaves s out). ``float_weight``: W by parameter name. A
    layer narrower than r keeps its extra ranks at LoRA's start (B's columns zero); a targeted layer the base
    keeps in float (the pooler) keeps LoRA's start."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Params4bit

    if float_weight is None:
        raise PeftbenchError("config key 'method.init': loftq needs the base's float weights, which only a "
                             "model.quantization=4bit load keeps at hand")
    adapted = [(name, module) for name, module in model.named_modules() if hasattr(module, "lora_A")
               and isinstance(getattr(module.get_base_layer(), "weight", None), Params4bit)]
    if not adapted:
        raise PeftbenchError("config key 'method.target_modules': loftq found no 4-bit layer among them to adapt")
    for name, module in adapted:
        quantized = module.get_base_layer().weight
        weight = float_weight(f"{name.removeprefix('base_model.model.')}.weight").to(quantized.device, torch.float32)
        if weight.shape != quantized.quant_state.shape and weight.T.shape == quantized.quant_state.shape:
            weight = weight.T  # a Conv1D (GPT-2) stores (in, out); transformers quantises it transposed
        error = weight - bnb_functional.dequantize_4bit(quantized.data, quantized.quant_state).to(torch.float32)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        k = min(module.r["default"], len(s))
        root = (s[:k] / module.scaling["default"]).sqrt()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        a[:k] = (root[:, None] * vh[:k]).to(a.dtype)
        b[:, :k] = (u[:, :k] * root).to(b.dtype)


def to_plain_lora(adapter_dir: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a PiSSA/OLoRA adapter saved in ``adapter_dir`` as a plain LoRA on the unmodified base: with
    W = W_res + B0 A0, the trained W_res + B A is W + [B, -B0] [A; A0], a LoRA of rank 2r at the same scale
    (alpha doubled; with rsLoRA times sqrt 2). As PEFT's ``path_initial_model_for_weight_conversion``,
    which drops the head a classifier trains beside the adapter."""
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    tensors = load_file(str(weights))
    for name, start in initial.items():
        trained = tensors[name]
        tensors[name] = torch.cat([trained, start], 0) if ".lora_A." in name else torch.cat([trained, -start], 1)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_file = adapter_dir / CONFIG_NAME
    config = json.loads(config_file.read_text())
    config.update(r=2 * config["r"], init_lora_weights=True,
                  lora_alpha=config["lora_alpha"] * (2 ** 0.5 if config["use_rslora"] else 2))
    config_file.write_text(json.dumps(config, indent=2))


@dataclass
class LoraPlusConfig(LoraConfig):
    name: str = "loraplus"
    b_lr_ratio: float = 16.0  # B's learning rate over A's (Hayou et al. 2024: 2^4)


@register_method
class LoraPlus(Lora):
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): LoRA whose B learns 16 times faster than A."""

    name = "loraplus"
    preset_of = "lora"
    Config = LoraPlusConfig
    lr_range = (1e-5, 3e-3)  # A's rate: B's is 16 times larger
    default_lr = 1e-4  # train.lr when unset: A's rate, below LoRA's (B's is 16 times larger)


@dataclass
class LoraFAConfig(LoraConfig):
    name: str = "lorafa"
    train_a: bool = False  # A frozen at its random init


@register_method
class LoraFA(Lora):
    """LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): LoRA with A frozen at its random init, only B trained."""

    name = "lorafa"
    preset_of = "lora"
    Config = LoraFAConfig
    lr_range = (1e-4, 3e-2)  # as LoRA's
    default_lr = 5e-4  # train.lr when unset: as LoRA's


@dataclass
class PissaConfig(LoraConfig):
    name: str = "pissa"
    init: str = "pissa"  # A, B from the top r singular vectors of W


@register_method
class Pissa(Lora):
    """PiSSA (Meng et al. 2024, arXiv:2404.02948): LoRA started from W's principal singular vectors."""

    name = "pissa"
    preset_of = "lora"
    Config = PissaConfig
    lr_range = (1e-5, 1e-2)  # a learning-rate search's default range: PiSSA trains W's largest directions
    default_lr = 2e-5  # train.lr when unset: Meng et al. 2024 (2e-5, as full fine-tuning)


@dataclass
class OloraConfig(LoraConfig):
    name: str = "olora"
    init: str = "olora"  # A, B from W's QR decomposition


@register_method
class Olora(Lora):
    """OLoRA (Büyükakyüz 2024, arXiv:2406.01775): LoRA started from an orthonormal basis of W (QR)."""

    name = "olora"
    preset_of = "lora"
    Config = OloraConfig
    lr_range = (1e-5, 1e-2)  # a learning-rate search's default range
    default_lr = 1e-4  # train.lr when unset: below LoRA's (the adapter starts on W's own directions)


@dataclass
class LoftqConfig(LoraConfig):
    name: str = "loftq"
    init: str = "loftq"  # B A from the 4-bit base's quantisation error (needs model.quantization=4bit)


@register_method
class Loftq(Lora):
    """LoftQ (Li et al. 2023, arXiv:2310.08659): LoRA on a 4-bit base, started from its quantisation error."""

    name = "loftq"
    preset_of = "lora"
    Config = LoftqConfig
    lr_range = (1e-4, 3e-2)  # as LoRA's
    default_lr = 5e-4  # train.lr when unset: as LoRA's (it trains as LoRA on a 4-bit base)
