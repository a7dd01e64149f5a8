"""Method interface and registry.

A method is one file with a ``Config`` dataclass and a :class:`Method` subclass.
It changes the model (``apply``), declares what it trains (``is_trainable``),
may hook into the loop (``on_optimizer_step``) and saves /
reloads what it trained. The loop never asks which method it runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from peftbench.errors import PeftbenchError
from peftbench.measure import stored_bytes, unique_parameters
from peftbench.registry import METHODS

HEAD_MODULES = ("classifier", "score")  # sequence/token classification heads (BERT family, decoders)
TRAINABLE_FILE = "trainable.safetensors"


def is_head(name: str) -> bool:
    """Whether a parameter of an un-wrapped model belongs to the classification head."""
    return name.split(".", 1)[0] in HEAD_MODULES


@dataclass
class MethodConfig:
    name: str


@dataclass
class RunContext:
    """What a method may need to know about the run it is applied in (the task kind decides the last two)."""

    total_steps: int  # optimizer steps this process will take
    num_labels: int
    peft_task_type: str | None = "SEQ_CLS"  # peft.TaskType; None for a bare model (masked-LM pretraining)
    labels_per_token: bool = False  # token classification: labels align with the input tokens
    lacked_modules: tuple[str, ...] = ()  # base modules the source had no weights for (a pooler), head aside
    float_weight: Callable[[str], torch.Tensor] | None = None  # a quantised base: its source's weight by name


def lacked_modules(new_weights) -> tuple[str, ...]:
    """The modules (head aside) of the weights a base's source lacked: ``bert.pooler.dense.weight`` ->
    ``bert.pooler.dense``."""
    return tuple(sorted({name.rsplit(".", 1)[0] for name in new_weights if not is_head(name)}))


class Method:
    name: ClassVar[str]
    Config: ClassVar[type]
    saves_full_model: ClassVar[bool] = False  # True: the checkpoint needs no base model to reload
    plain_model: ClassVar[bool] = False  # True: the trained model is a plain transformers model (once merged)
    trains_base_weights: ClassVar[bool] = False  # True: cannot run on a quantised (frozen integer) base
    reads_gradients: ClassVar[bool] = False  # True: on_optimizer_step reads whole gradients (not under ZeRO/FSDP)
    masks_trained_weights: ClassVar[bool] = False  # True: on_optimizer_step zeroes trained entries (no averaging)
    virtual_token_modules: ClassVar[tuple[str, ...]] = ()  # modules run once per step, not per token (FLOP counts)
    lr_range: ClassVar[tuple[float, float]]  # (low, high): the default range of a learning-rate search (docs/methods)
    default_lr: ClassVar[float]  # train.lr when a recipe leaves it unset; inside lr_range (docs/methods)
    preset_of: ClassVar[str | None] = None  # a first-class name for another method with other defaults

    def __init__(self, cfg):
        self.cfg = cfg

    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Add the method's modules to ``model``; return the model to train."""
        return model

    def is_trainable(self, name: str) -> bool:
        """Whether the parameter called ``name`` (in the applied model) is trained."""
        raise NotImplementedError

    def lr_scale(self, name: str) -> float:
        """The factor on the learning rate of the trained parameter called ``name`` (LoRA+: B's is larger)."""
        return 1.0

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called once after every optimizer step (not per micro-batch)."""

    def makes_plain_model(self) -> bool:
        """Whether the trained model is a plain transformers model once merged (``plain_model``; a bridge to
        several tuners answers per tuner)."""
        return self.plain_model

    def summary(self, model: nn.Module) -> dict:
        """Method-specific facts for the result record."""
        return {}

    def training_state(self, model: nn.Module) -> dict:
        """What the method changes while training outside the model's parameters, for a resumable state (tensors,
        numbers, strings, lists and dicts of them)."""
        return {}

    def load_training_state(self, model: nn.Module, state: dict) -> None:
        """Restore what :meth:`training_state` returned."""

    def saved_bytes(self, model: nn.Module, state: dict | None = None) -> int:
        """Bytes of the tensors ``save`` writes (its file size, less the format's small overhead), the record's
        ``adapter_bytes``; ``state``: the gathered tensors of a sharded model (see ``save``)."""
        if state is not None:
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            return sum(t.numel() * t.element_size() for n, t in state.items() if n in trained)
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def save(self, model: nn.Module, out_dir: Path, state: dict | None = None) -> None:
        """Write what the method trained. ``state`` (names as in ``model.state_dict()``, whole tensors on the
        CPU) replaces the model's own tensors when those are shards of a sharded model."""
        raise NotImplementedError

    def load(self, base_model: nn.Module | None, ckpt_dir: Path, ctx: RunContext) -> nn.Module:
        raise NotImplementedError


class PeftMethod(Method):
    """A method implemented by PEFT: saved in the standard PEFT format."""

    trainable_markers: ClassVar[tuple[str, ...]]  # substrings of the names PEFT trains

    def peft_config(self, ctx: RunContext):
        raise NotImplementedError

    def apply(self, model, ctx):
        from peft import get_peft_model
        from peft.utils.error import NoMatchingPeftModuleError

        config = self.peft_config(ctx)
        # Modules the base's source lacked are saved in the adapter, frozen as initialised: plain PEFT
        # (AutoPeftModel) then restores them instead of drawing new random weights.
        config.modules_to_save = [*(config.modules_to_save or []), *ctx.lacked_modules] or None
        self.frozen_saved = ctx.lacked_modules
        try:
            model = get_peft_model(model, config)
        except NoMatchingPeftModuleError:
            targets = getattr(self.cfg, "target_modules", None)
            raise PeftbenchError(f"config key 'method.target_modules': {targets} names no module of this model") \
                from None
        label_virtual_tokens(model, ctx)
        return model

    frozen_saved: tuple[str, ...] = ()

    def is_trainable(self, name: str) -> bool:
        if ".modules_to_save." in name:
            return not any(f"{module}.modules_to_save." in name for module in self.frozen_saved)
        return any(marker in name for marker in self.trainable_markers)

    def saved_bytes(self, model, state: dict | None = None) -> int:
        """What PEFT's ``save_pretrained`` writes: its state dict, which may hold frozen tensors (LoRA-FA's A,
        VeRA's projections) and, for an encoder-made prompt, the prompt it computes instead of the encoder; the
        base modules its source lacked aside (every method's checkpoint holds those)."""
        from peft.utils import get_peft_model_state_dict

        lacked = tuple(f".{module}." for module in self.frozen_saved)
        saved = get_peft_model_state_dict(model, state_dict=state)
        return sum(t.numel() * t.element_size() for n, t in saved.items() if not any(m in f".{n}" for m in lacked))

    def save(self, model, out_dir: Path, state: dict | None = None) -> None:
        model.save_pretrained(str(out_dir), state_dict=state)

    def load(self, base_model, ckpt_dir: Path, ctx: RunContext):
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, str(ckpt_dir))
        label_virtual_tokens(model, ctx)  # labels given to the loaded model line up as in training
        return model


def label_virtual_tokens(model, ctx: RunContext) -> None:
    """Token classification under a PEFT prompt's prepended virtual tokens: their labels are -100 (no loss)."""
    config = model.peft_config[model.active_adapter]
    if not (ctx.labels_per_token and config.is_prompt_learning):
        return
    n = config.num_virtual_tokens

    def pad_labels(module, args, kwargs):
        if kwargs.get("labels") is not None:
            kwargs["labels"] = torch.nn.functional.pad(kwargs["labels"], (n, 0), value=-100)
        return args, kwargs

    model.base_model.register_forward_pre_hook(pad_labels, with_kwargs=True)


class InPlaceMethod(Method):
    """A method written here that edits the model in place; saves only its trained tensors."""

    def trained_tensors(self, model, state: dict | None = None) -> dict[str, torch.Tensor]:
        """What to save: by default every trainable parameter (from ``state`` when given: see ``save``)."""
        values = state if state is not None else dict(model.named_parameters())
        return {n: values[n].detach() for n, p in model.named_parameters() if p.requires_grad}

    def saved_bytes(self, model, state: dict | None = None) -> int:
        return sum(t.numel() * t.element_size() for t in self.trained_tensors(model, state).values())

    def save(self, model, out_dir: Path, state: dict | None = None) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous().cpu() for n, t in self.trained_tensors(model, state).items()}
        save_file(tensors, str(out_dir / TRAINABLE_FILE))

    def load(self, base_model, ckpt_dir: Path, ctx: RunContext):
        from safetensors.torch import load_file

        model = self.apply(base_model, ctx)
        state = load_file(str(ckpt_dir / TRAINABLE_FILE))
        unknown = sorted(set(state) - set(model.state_dict()))
        if unknown:
            raise PeftbenchError(f"{ckpt_dir / TRAINABLE_FILE}: tensor '{unknown[0]}' has no place in the model")
        model.load_state_dict(state, strict=False)
        return model


def find_modules(model: nn.Module, patterns: list[str], key: str) -> list[tuple[str, nn.Module]]:
    """Modules whose names end with one of the regular expressions ``patterns`` (config key ``key``)."""
    regex = re.compile("(?:" + "|".join(patterns) + ")$")
    found = [(name, module) for name, module in model.named_modules() if regex.search(name)]
    if not found:
        raise PeftbenchError(f"no module name of this model ends with {patterns}; set config key '{key}'")
    return found


def register_method(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls.name, cls)


def method_names(presets: bool = True) -> list[str]:
    """Registered method names; ``presets=False``: one per implementation (no first-class name of a PEFT
    tuner or LoRA variant, which are their implementation with other defaults)."""
    return [n for n in METHODS.names() if presets or get_method(n).preset_of is None]


def get_method(name: str) -> type[Method]:
    return METHODS.get(name, "method.name")


def weight_count(param: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit one by its quantised shape (its storage packs two, or four in
    bf16 under FSDP, per element)."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()


def set_trainable(model: nn.Module, method: Method) -> dict:
    """Freeze every parameter the method does not declare; count both kinds."""
    trainable = total = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(method.is_trainable(name))
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += weight_count(param)
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise PeftbenchError(f"method '{method.name}' declares no trainable parameter in this model")
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total}


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def settle_dtypes(model: torch.nn.Module, mixed_precision: str) -> dict:
    """Trained parameters in fp32 (the optimizer's master copy, whatever dtype a module was created in);
    under mixed precision, frozen floating-point weights in the compute dtype.

    Autocast would cast frozen weights on every forward anyway; stored in bf16/fp16 they take half
    the memory and skip those casts. Trained parameters stay fp32 (the optimizer's master
    copy), and so do frozen ones that share a module with a trained one (BitFit's layer-norm
    weight beside its trained bias: ``layer_norm`` wants one dtype), and normalisation layers
    (a few KB; on CPU ``layer_norm`` refuses fp32 activations with bf16 weights, and
    bitsandbytes layers may return fp32). Returns the bytes of the frozen and the trained weights.
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    dtype = COMPUTE_DTYPES.get(mixed_precision)
    if dtype is not None:
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own) and "norm" not in type(module).__name__.lower():
                for p in own:
                    if p.is_floating_point():
                        p.data = p.data.to(dtype)
    frozen = trained = 0
    for p in unique_parameters(model):
        if p.requires_grad:
            trained += stored_bytes(p)
        else:
            frozen += stored_bytes(p)
    return {"frozen_weight_bytes": frozen, "trained_weight_bytes": trained}


from peftbench.methods import adalora, adapter, bitfit, full, ia3, lora, peft_tuner, prefix, prompt, tuner_names  # noqa: E402,E501,F401  (registration)
