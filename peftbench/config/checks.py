"""Ranges and conflicts of a resolved configuration: one-line errors that name the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

from peftbench.config.sections import (
    ADVERSARIAL,
    MIXED_PRECISION,
    QUANT_COMPUTE_DTYPES,
    QUANTIZATION,
    SCHEDULERS,
    SHARDING,
    TRACKERS,
    LoopConfig,
    RunConfig,
    TrainConfig,
    dotted,
)
from peftbench.errors import PeftbenchError, clip
from peftbench.registry import METHODS, TASKS


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise the one-line error for config key ``key`` unless ``ok``: ``must be <rule>, got <value>``."""
    if not ok:
        raise PeftbenchError(f"config key '{key}' must be {rule}, got {clip(repr(value))}")


def finite(x) -> bool:
    """A finite int or float (not a bool): a usable number of a config or a record."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_loop(t: LoopConfig, section: str = "train") -> None:
    """Ranges of the optimizer and loop settings (fine-tuning and pretraining)."""
    require(t.mixed_precision in MIXED_PRECISION, f"{section}.mixed_precision", f"one of {MIXED_PRECISION}",
            t.mixed_precision)
    for key in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every"):
        require(getattr(t, key) >= 1, f"{section}.{key}", ">= 1", getattr(t, key))
    require(t.max_steps == -1 or t.max_steps >= 1, f"{section}.max_steps", "-1 (no limit) or >= 1", t.max_steps)
    for name in t.report_to:
        require(name in TRACKERS, f"{section}.report_to", f"a list of {', '.join(TRACKERS)}", t.report_to)
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise PeftbenchError(f"config key '{section}.report_to': {name} is not installed (pip install "
                                 f"{TRACKERS[name]}; tensorboard and mlflow: pip install 'peftbench[trackers]')")
    require(finite(t.lr) and t.lr > 0, f"{section}.lr", "a finite number > 0", t.lr)
    require(finite(t.warmup_ratio) and 0 <= t.warmup_ratio < 1, f"{section}.warmup_ratio", "in [0, 1)",
            t.warmup_ratio)
    require(t.scheduler in SCHEDULERS, f"{section}.scheduler", f"one of {', '.join(SCHEDULERS)}", t.scheduler)
    require(t.scheduler_cycles >= 1, f"{section}.scheduler_cycles", ">= 1", t.scheduler_cycles)
    require(finite(t.scheduler_power) and t.scheduler_power > 0, f"{section}.scheduler_power", "a finite number > 0",
            t.scheduler_power)
    for key in ("weight_decay", "max_grad_norm"):
        require(finite(getattr(t, key)) and getattr(t, key) >= 0, f"{section}.{key}", "a finite number >= 0",
                getattr(t, key))
    require(t.seed >= 0, f"{section}.seed", ">= 0", t.seed)
    require(t.timing_warmup_steps >= 0, f"{section}.timing_warmup_steps", ">= 0", t.timing_warmup_steps)
    require(t.dist_timeout >= 1, f"{section}.dist_timeout", ">= 1 (seconds)", t.dist_timeout)


def check_values(cfg: RunConfig) -> None:
    t = cfg.train
    TASKS.get(cfg.task.name, "task.name")  # a registered task (its name also names the default output folder)
    check_loop(t)
    require(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    require(t.sharding in SHARDING, "train.sharding", f"one of {SHARDING}", t.sharding)
    require(t.save_state_every >= 0, "train.save_state_every", ">= 0 (0: never)", t.save_state_every)
    _check_tricks(t)
    if (t.ema_decay or t.swa_last) and METHODS.get(cfg.method.name, "method.name").masks_trained_weights:
        raise PeftbenchError(f"config keys 'train.{'ema_decay' if t.ema_decay else 'swa_last'}' and 'method.name="
                             f"{cfg.method.name}' conflict: {cfg.method.name} masks its trained tensors as it trains "
                             "(its rank budget), and an average would bring masked entries back that its checkpoint "
                             "then drops; train without weight averaging")
    _check_quantization(cfg)
    require(cfg.task.max_length >= 8, "task.max_length", ">= 8", cfg.task.max_length)
    require(cfg.task.max_train_samples is None or cfg.task.max_train_samples >= 1, "task.max_train_samples",
            "null (all) or >= 1", cfg.task.max_train_samples)
    if cfg.task.name not in ("custom", "custom_ner"):
        for key in ("text_fields", "label_field", "labels"):
            if getattr(cfg.task, key) is not None:
                raise PeftbenchError(f"config key 'task.{key}' applies only to task.name=custom or custom_ner")


def _check_tricks(t: TrainConfig) -> None:
    require(finite(t.layer_decay) and 0 < t.layer_decay <= 1, "train.layer_decay", "in (0, 1] (1: off)",
            t.layer_decay)
    require(finite(t.label_smoothing) and 0 <= t.label_smoothing < 1, "train.label_smoothing", "in [0, 1)",
            t.label_smoothing)
    require(finite(t.rdrop_alpha) and t.rdrop_alpha >= 0, "train.rdrop_alpha", "a finite number >= 0",
            t.rdrop_alpha)
    require(t.adversarial in ADVERSARIAL, "train.adversarial", f"one of {', '.join(ADVERSARIAL)}", t.adversarial)
    for key in ("adversarial_epsilon", "adversarial_alpha"):
        require(finite(getattr(t, key)) and getattr(t, key) > 0, f"train.{key}", "a finite number > 0",
                getattr(t, key))
    require(t.adversarial_steps >= 1, "train.adversarial_steps", ">= 1", t.adversarial_steps)
    require(finite(t.ema_decay) and 0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1) (0: off)", t.ema_decay)
    require(t.swa_last == 0 or t.swa_last >= 2, "train.swa_last", "0 (off) or >= 2", t.swa_last)
    if t.ema_decay and t.swa_last:
        raise PeftbenchError("config keys 'train.ema_decay' and 'train.swa_last' conflict: each chooses the weights "
                             "that are evaluated and saved; set one")
    idle = []  # (key, what it needs): a key that changes nothing would still make a row and a run id of its own
    if t.distill.teacher is None:
        idle += [(key, "train.distill.teacher") for key in ("distill.temperature", "distill.alpha")]
    if t.adversarial == "none":
        idle += [(key, "train.adversarial=fgm or pgd") for key in ("adversarial_epsilon", "adversarial_steps",
                                                                    "adversarial_alpha")]
    elif t.adversarial == "fgm":
        idle += [(key, "train.adversarial=pgd") for key in ("adversarial_steps", "adversarial_alpha")]
    ours, defaults = dataclasses.asdict(t), dataclasses.asdict(TrainConfig())
    for key, needs in idle:
        if dotted(ours, key) != dotted(defaults, key):
            raise PeftbenchError(f"config key 'train.{key}' is set ({dotted(ours, key)!r}) but does nothing without "
                                 f"{needs}; leave it at its default")
    require(t.early_stopping_patience >= 0, "train.early_stopping_patience", ">= 0 (0: off)",
            t.early_stopping_patience)
    d = t.distill
    require(finite(d.temperature) and d.temperature > 0, "train.distill.temperature", "a finite number > 0",
            d.temperature)
    require(finite(d.alpha) and 0 <= d.alpha <= 1, "train.distill.alpha", "in [0, 1]", d.alpha)
    require(d.teacher is None or d.teacher.strip() != "", "train.distill.teacher", "a checkpoint directory or null",
            d.teacher)


REWRITE_BASE_INITS = ("pissa", "olora")  # LoRA starts that rewrite the frozen weights


def takes_quantized_base(cfg: RunConfig) -> bool:
    """Whether the run's method can train on quantised base weights: it trains none and rewrites none of them."""
    return not (METHODS.get(cfg.method.name, "method.name").trains_base_weights
                or getattr(cfg.method, "init", None) in REWRITE_BASE_INITS)


def _check_quantization(cfg: RunConfig) -> None:
    m = cfg.model
    if m.quantization not in QUANTIZATION:
        raise PeftbenchError(f"config key 'model.quantization' must be one of {QUANTIZATION}, "
                             f"got {clip(repr(m.quantization))}")
    if m.quant_4bit_type not in ("nf4", "fp4"):
        raise PeftbenchError(f"config key 'model.quant_4bit_type' must be nf4 or fp4, "
                             f"got {clip(repr(m.quant_4bit_type))}")
    if m.quant_4bit_compute_dtype not in QUANT_COMPUTE_DTYPES:
        raise PeftbenchError(f"config key 'model.quant_4bit_compute_dtype' must be one of {QUANT_COMPUTE_DTYPES}, "
                             f"got {clip(repr(m.quant_4bit_compute_dtype))}")
    if m.quantization != "none" and METHODS.get(cfg.method.name, "method.name").trains_base_weights:
        raise PeftbenchError(f"config keys 'method.name={cfg.method.name}' and 'model.quantization={m.quantization}' "
                             f"conflict: {cfg.method.name} trains the base weights, and {m.quantization} base weights "
                             "are frozen integer storage without gradients; use a PEFT method or "
                             "model.quantization=none")
    if getattr(cfg.method, "init", None) == "loftq" and m.quantization != "4bit":
        raise PeftbenchError(f"config keys 'method.init=loftq' and 'model.quantization={m.quantization}' conflict: "
                             "LoftQ starts A and B from the error of 4-bit base weights; use model.quantization=4bit")
    if m.quantization != "none" and getattr(cfg.method, "init", None) in REWRITE_BASE_INITS:
        raise PeftbenchError(f"config keys 'method.init={cfg.method.init}' and 'model.quantization={m.quantization}' "
                             f"conflict: {cfg.method.init} rewrites the base weights, which {m.quantization} storage "
                             "holds only approximately, so the saved LoRA would not reload to the trained model; use "
                             "model.quantization=none")
