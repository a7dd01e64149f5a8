"""Method interface and registry.

A method is one file with a ``Config`` dataclass and a :class:`Method` subclass.
It changes the model (``apply``), declares what it trains (``is_trainable``),
may hook into the loop (``on_optimizer_step``) and saves /
reloads what it trained. The loop never asks which method it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from peftbench.errors import PeftbenchError

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
    """What a method may need to know about the run it is applied in."""

    total_steps: int  # optimizer steps this process will take
    num_labels: int
    task_kind: str = "classification"  # or "token_classification"

    @property
    def peft_task_type(self):
        from peft import TaskType

        return TaskType.TOKEN_CLS if self.task_kind == "token_classification" else TaskType.SEQ_CLS


class Method:
    name: ClassVar[str]
    Config: ClassVar[type]
    saves_full_model: ClassVar[bool] = False  # True: the checkpoint needs no base model to reload
    trains_base_weights: ClassVar[bool] = False  # True: cannot run on a quantised (frozen integer) base
    reads_gradients: ClassVar[bool] = False  # True: on_optimizer_step reads whole gradients (not under ZeRO/FSDP)

    def __init__(self, cfg):
        self.cfg = cfg

    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Add the method's modules to ``model``; return the model to train."""
        return model

    def is_trainable(self, name: str) -> bool:
        """Whether the parameter called ``name`` (in the applied model) is trained."""
        raise NotImplementedError

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called once after every optimizer step (not per micro-batch)."""

    def summary(self, model: nn.Module) -> dict:
        """Method-specific facts for the result record."""
        return {}

    def trained_bytes(self, model: nn.Module) -> int:
        """Bytes of the tensors ``save`` writes (its file size, less the format's small overhead)."""
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def save(self, model: nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, base_model: nn.Module | None, ckpt_dir: Path) -> nn.Module:
        raise NotImplementedError


class PeftMethod(Method):
    """A method implemented by PEFT: saved in the standard PEFT format."""

    trainable_markers: ClassVar[tuple[str, ...]]  # substrings of the names PEFT trains

    def peft_config(self, ctx: RunContext):
        raise NotImplementedError

    def apply(self, model, ctx):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(ctx))

    def is_trainable(self, name: str) -> bool:
        return ".modules_to_save." in name or any(marker in name for marker in self.trainable_markers)

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))

    def load(self, base_model, ckpt_dir: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(ckpt_dir))


class InPlaceMethod(Method):
    """A method written here that edits the model in place; saves only its trained tensors."""

    def trained_tensors(self, model) -> dict[str, torch.Tensor]:
        """What to save: by default every trainable parameter."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def trained_bytes(self, model) -> int:
        return sum(t.numel() * t.element_size() for t in self.trained_tensors(model).values())

    def save(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous().cpu() for n, t in self.trained_tensors(model).items()}, str(out_dir / TRAINABLE_FILE))

    def load(self, base_model, ckpt_dir: Path):
        from safetensors.torch import load_file

        model = self.apply(base_model, RunContext(total_steps=0, num_labels=base_model.config.num_labels,
                                                  task_kind=task_kind(base_model)))
        state = load_file(str(ckpt_dir / TRAINABLE_FILE))
        unknown = sorted(set(state) - set(model.state_dict()))
        if unknown:
            raise PeftbenchError(f"{ckpt_dir / TRAINABLE_FILE}: tensor '{unknown[0]}' has no place in the model")
        model.load_state_dict(state, strict=False)
        return model


def task_kind(model: nn.Module) -> str:
    """``token_classification`` for a ``*ForTokenClassification`` model, else ``classification``."""
    return "token_classification" if type(model).__name__.endswith("ForTokenClassification") else "classification"


def find_modules(model: nn.Module, patterns: list[str], key: str) -> list[tuple[str, nn.Module]]:
    """Modules whose names end with one of the regular expressions ``patterns`` (config key ``key``)."""
    regex = re.compile("(?:" + "|".join(patterns) + ")$")
    found = [(name, module) for name, module in model.named_modules() if regex.search(name)]
    if not found:
        raise PeftbenchError(f"no module name of this model ends with {patterns}; set config key '{key}'")
    return found


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise PeftbenchError(f"config key 'method.name': unknown method '{name}' (known: {', '.join(method_names())})")
    return _METHODS[name]


def set_trainable(model: nn.Module, method: Method) -> dict:
    """Freeze every parameter the method does not declare; count both kinds."""
    trainable = total = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(method.is_trainable(name))
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise PeftbenchError(f"method '{method.name}' declares no trainable parameter in this model")
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total}


from peftbench.methods import adalora, adapter, bitfit, full, ia3, lora, prefix, prompt  # noqa: E402,F401  (registration)
