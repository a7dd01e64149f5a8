"""Every PEFT tuner through one bridge: ``method.name=peft method.peft_type=VERA method.options={r: 64}``.

The bridge builds PEFT's config of that type from ``options`` (the keyword arguments of that config; the
task type is set here), applies it with ``get_peft_model`` and trains what PEFT leaves trainable: the
tuner's tensors and the head. A type that needs target modules and has no PEFT default for the
architecture gets LoRA's (BERT: query, value), LN tuning every normalisation layer. Checkpoints are
standard PEFT adapters, so ``PeftModel.from_pretrained`` reloads them without peftbench; a tuner that
merges exports to a plain transformers model and to ONNX. The first-class names (``method.name=vera``
...) are this bridge with a fixed type, their own defaults and learning rates (``tuner_names.py``).

``TUNERS`` says how each type of the installed PEFT fares here, per task kind: ``tested``
(``tests/test_tuners.py`` trains it on the tiny BERT, checks that its own tensors moved the loss, reloads
it to identical logits and, where it merges, merges it to the same logits) or refused, with the reason.
A type the table lacks (a newer PEFT) runs as ``untested``. ``peftbench methods --all`` prints the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from peftbench.config import require
from peftbench.errors import PeftbenchError, clip
from peftbench.methods import MethodConfig, PeftMethod, register_method

log = logging.getLogger(__name__)
KINDS = ("classification", "token classification")
TESTED, UNTESTED = "tested", "untested"


@dataclass(frozen=True)
class Tuner:
    """How one PEFT type fares here; an empty reason means tested."""

    refused: str = ""  # why no task kind can train it
    refused_tokens: str = ""  # why token classification cannot (with the type's default target modules)
    merges: bool = True  # merge_and_unload folds it into the base weights (export --format hf works)
    tiny_options: dict = field(default_factory=dict)  # what the tests give: no default, or one for 768 wide


PREFIX_PATH = ("PEFT's prefix tuning reaches BERT's layers through past key values, which transformers 5 "
               "encoders do not take; use method.name=prefix")
TASK_IDS = "needs a task id per example (multi-task training); a peftbench task has none"
TUNERS: dict[str, Tuner] = {  # PEFT 0.21's 45 types
    "LORA": Tuner(),
    "ADALORA": Tuner(refused="use method.name=adalora: its rank budget is reallocated by the loop after every step"),
    "ADAMSS": Tuner(),
    "ADAPTION_PROMPT": Tuner(refused="adapts the attention of Llama-family decoders only"),
    "BEFT": Tuner(),
    "BOFT": Tuner(),
    "C3A": Tuner(tiny_options={"block_size": 64}),  # its default 256 divides 768, not 128
    "CARTRIDGE": Tuner(refused=PREFIX_PATH.removesuffix("; use method.name=prefix")),
    "CPT": Tuner(refused="context-aware prompt tuning is for causal language models"),
    "DEFT": Tuner(),
    "DELORA": Tuner(),
    "FOURIERFT": Tuner(),
    "FROD": Tuner(),
    "GLORA": Tuner(),
    "GRALORA": Tuner(),
    "HIRA": Tuner(),
    "HRA": Tuner(),
    "IA3": Tuner(),
    "LILY": Tuner(merges=False),
    "LN_TUNING": Tuner(),
    "LOHA": Tuner(),
    "LOKR": Tuner(),
    "MISS": Tuner(),
    "MULTITASK_PROMPT_TUNING": Tuner(refused=TASK_IDS),
    "OFT": Tuner(),
    "OSF": Tuner(refused_tokens="its default targets (every linear) take the token classifier too, which PEFT 0.21 "
                                "then cannot keep trainable; name target_modules (e.g. [query, value])"),
    "P_TUNING": Tuner(merges=False, tiny_options={"num_virtual_tokens": 8}),
    "PEANUT": Tuner(),
    "POLY": Tuner(refused=TASK_IDS),
    "PREFIX_TUNING": Tuner(refused=PREFIX_PATH),
    "PROMPT_TUNING": Tuner(merges=False, tiny_options={"num_virtual_tokens": 8}),  # no default length
    "PSOFT": Tuner(),
    "PVERA": Tuner(),
    "RANDLORA": Tuner(),
    "ROAD": Tuner(),
    "SHADOW": Tuner(refused="PEFT 0.21's SHADOW fails on BERT ('ShadowCarrier' object has no attribute 'view')"),
    "SHIRA": Tuner(),
    "SUPERTUNING": Tuner(),
    "TINYLORA": Tuner(),
    "TRAINABLE_TOKENS": Tuner(refused="trains the embeddings of listed tokens only: a classifier's head would stay "
                                      "random"),
    "UNILORA": Tuner(),
    "VBLORA": Tuner(tiny_options={"vector_length": 64}),  # its default 256 divides 768, not 128
    "VERA": Tuner(),
    "WAVEFT": Tuner(),
    "XLORA": Tuner(refused="mixes LoRA adapters trained before; train them first, then serve them together"),
}


def peft_types() -> list[str]:
    """Every tuner type the installed PEFT defines."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)


def status(peft_type: str, kind: str, options: dict | None = None) -> str:
    """``tested``, ``untested`` (a type this table lacks) or ``refused: why`` for a task kind (``KINDS``); a
    token-classification refusal holds only for the type's default target modules."""
    tuner = TUNERS.get(peft_type)
    if tuner is None:
        return UNTESTED
    targets = "target_modules" in (options or {})
    reason = tuner.refused or (tuner.refused_tokens if kind == KINDS[1] and not targets else "")
    return f"refused: {reason}" if reason else TESTED


REWRITING_INITS = ("pissa", "olora", "corda", "loftq")  # PEFT LoRA inits that change the frozen weights


@dataclass
class PeftTunerConfig(MethodConfig):
    name: str = "peft"
    peft_type: str = "LORA"  # a PEFT tuner type (peftbench methods --all lists them): VERA, LOHA, OFT, ...
    options: dict = field(default_factory=dict)  # keyword arguments of that type's PEFT config, e.g. {r: 16}

    def __post_init__(self):
        self.peft_type = str(self.peft_type).upper()
        require(self.peft_type in peft_types(), "method.peft_type", "a tuner type of the installed PEFT "
                "(peftbench methods --all)", self.peft_type)
        require("task_type" not in self.options, "method.options", "without task_type (set from the task)",
                self.options)
        init = str(self.options.get("init_lora_weights", "")).lower()  # as PEFT reads it
        require(not init.startswith(REWRITING_INITS), "method.options", "without an init_lora_weights that "
                "rewrites the base weights (its adapter would not fit the unmodified base): use method.name=pissa, "
                "olora or loftq, saved as plain LoRA", self.options)


@register_method
class PeftTuner(PeftMethod):
    """Any PEFT tuner, by its PEFT type and config options."""

    name = "peft"
    lr_range = (1e-4, 1e-1)  # a learning-rate search's default (log-spaced) range: tuners differ widely
    default_lr = 1e-3  # train.lr when unset: a middle rate; the first-class names set their own
    Config = PeftTunerConfig
    virtual_token_modules = ("prompt_encoder",)  # prompt and P-tuning: the encoder runs once per step
    preset_options: ClassVar[dict] = {}  # a first-class name's defaults, under the run's method.options
    tuned: set[str] = set()  # parameter names PEFT left trainable (apply decides)
    fallback_targets: list[str] | None = None  # target modules where PEFT has no default (apply decides)
    kind: str = KINDS[0]  # the task kind of the run (apply decides)

    def options(self) -> dict:
        """The keyword arguments given to PEFT: the name's defaults, the run's options, the fallback targets."""
        options = {**self.preset_options, **self.cfg.options}
        if self.fallback_targets is not None:
            options["target_modules"] = self.fallback_targets
        return options

    def peft_config(self, ctx):
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        config_class = PEFT_TYPE_TO_CONFIG_MAPPING[self.cfg.peft_type]
        try:
            config = config_class(task_type=ctx.peft_task_type, **self.options())
        except (TypeError, ValueError) as err:
            raise PeftbenchError(f"config key 'method.options': {clip(str(err).strip().splitlines()[0])} "
                                 f"({config_class.__name__})") from None
        if config.is_prompt_learning and not config.num_virtual_tokens:
            raise PeftbenchError(f"config key 'method.options': {self.cfg.peft_type} needs num_virtual_tokens "
                                 "(PEFT has no default)")
        return config

    def apply(self, model, ctx):
        self.kind = KINDS[ctx.labels_per_token]
        verdict = status(self.cfg.peft_type, self.kind, self.options())
        if verdict.startswith("refused"):
            raise PeftbenchError(f"config key 'method.peft_type': {self.cfg.peft_type} for {self.kind} is {verdict}")
        if verdict == UNTESTED:
            log.warning("PEFT type %s is not in peftbench's table of tested tuners", self.cfg.peft_type)
        try:
            try:
                model = super().apply(model, ctx)
            except PeftbenchError:
                raise
            except ValueError as err:  # no default target modules for this architecture
                if "target_modules" not in str(err) or "target_modules" in self.options():
                    raise
                self.fallback_targets = _default_targets(self.cfg.peft_type, model)
                model = super().apply(model, ctx)
        except PeftbenchError as err:
            if "names no module" not in str(err):
                raise
            raise PeftbenchError(f"config key 'method.options.target_modules': {self.options().get('target_modules')}"
                                 " names no module of this model") from None
        except ValueError as err:  # PEFT's check of a config against the model's shapes
            raise PeftbenchError(f"config key 'method.options': {self.cfg.peft_type} on this model: "
                                 f"{clip(str(err).strip().splitlines()[0])}") from None
        self.tuned = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}  # shared too
        return model

    def is_trainable(self, name: str) -> bool:
        if ".modules_to_save." in name and any(f"{m}.modules_to_save." in name for m in self.frozen_saved):
            return False
        return name in self.tuned

    def makes_plain_model(self) -> bool:
        tuner = TUNERS.get(self.cfg.peft_type)
        return tuner is not None and tuner.merges and not status(self.cfg.peft_type, KINDS[0]).startswith("refused")

    def summary(self, model):
        return {"peft_type": self.cfg.peft_type, "status": status(self.cfg.peft_type, self.kind, self.options()),
                "options": self.options()}


def _default_targets(peft_type: str, model) -> list[str]:
    """Modules to adapt where PEFT has no default for the architecture: every normalisation layer for LN
    tuning, else LoRA's targets."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if peft_type == "LN_TUNING":
        return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                       if name and "norm" in type(module).__name__.lower()})
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    if targets is None:
        raise PeftbenchError(f"config key 'method.options': name target_modules for a {model.config.model_type} "
                             "model (PEFT has no default for it)")
    return list(targets)
