"""Typed run configuration: built-in defaults -> YAML recipe -> ``key=value`` overrides.

A recipe has the sections ``task``, ``model``, ``method``, ``train`` and the key
``output_dir``. The ``method`` section is checked against the Config dataclass of
the method it names, so every method owns its keys. Unknown keys and values of
the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftbench.errors import PeftbenchError, clip
from peftbench.registry import METHODS, TASKS

MIXED_PRECISION = ("no", "fp16", "bf16")
QUANTIZATION = ("none", "8bit", "4bit")
LATER_KEYS = (  # dotted keys added after leaderboards/ records were written (any depth); append every new key
    "model.quantization", "model.quant_4bit_type", "model.quant_4bit_compute_dtype", "model.quant_4bit_double",
    "train.evaluate_test", "method.init", "train.sharding", "method.b_lr_ratio", "method.train_a", "train.scheduler",
    "train.scheduler_cycles", "train.scheduler_power", "train.layer_decay", "train.label_smoothing",
    "train.rdrop_alpha", "train.adversarial", "train.adversarial_epsilon", "train.adversarial_steps",
    "train.adversarial_alpha", "train.ema_decay", "train.swa_last", "train.early_stopping_patience",
    "train.distill.teacher", "train.distill.temperature", "train.distill.alpha")
ADVERSARIAL = ("none", "fgm", "pgd")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "inverse_sqrt")
QUANT_COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
SHARDING = ("auto", "ddp", "fsdp2")  # auto: as the launch asks (an Accelerate FSDP config: fsdp2)
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio",  # Accelerate's
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


@dataclass
class TaskConfig:
    name: str = "synthetic"  # a registered task (peftbench tasks)
    data_dir: str | None = None  # local CLUE/FewCLUE folder; None = the hub (or generated, for synthetic)
    max_length: int = 128  # tokens per example (pairs truncated longest-first)
    max_train_samples: int | None = None  # keep the first N training records (quick runs)
    tag_scheme: str = "bio"  # token classification: bio | bioes
    # Only for task.name=custom and custom_ner (labels: the entity types):
    text_fields: list[str] | None = None  # one field, or two for sentence pairs
    label_field: str | None = None  # custom tasks: the label's field
    labels: list[str] | None = None  # custom tasks: the label list (NER: entity types)


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # hub name, local directory, or the built-in "tiny"
    tokenizer: str | None = None  # defaults to name_or_path
    attn_implementation: str | None = None  # None = transformers' default (sdpa where supported)
    quantization: str = "none"  # none | 8bit (bitsandbytes LLM.int8) | 4bit (NF4/FP4): frozen base weights
    quant_4bit_type: str = "nf4"  # 4bit: nf4 | fp4
    quant_4bit_compute_dtype: str = "bf16"  # 4bit: dtype of the de-quantised matmuls (bf16 | fp16 | fp32)
    quant_4bit_double: bool = False  # 4bit: quantise the quantisation constants too (QLoRA's double quantisation)


@dataclass
class LoopConfig:
    """Optimizer and loop settings shared by fine-tuning and pretraining (each sets its own defaults)."""

    max_steps: int = -1  # > 0: exactly this many optimizer steps, over as many epochs as they take (epochs ignored)
    batch_size: int = 32  # per process, per micro-batch
    eval_batch_size: int = 128  # evaluation batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5  # peak learning rate (linear warm-up, then the scheduler's decay)
    weight_decay: float = 0.01  # AdamW decay on matrices (not on biases and norms)
    warmup_ratio: float = 0.1  # share of steps spent warming up the learning rate
    scheduler: str = "linear"  # after warm-up: linear, cosine, cosine_with_restarts, polynomial, constant, inverse_sqrt
    scheduler_cycles: int = 1  # cosine_with_restarts: hard restarts over the run
    scheduler_power: float = 1.0  # polynomial: the decay's power (to 1e-7 at the end)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    seed: int = 42  # model init, dropout and data order
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast; frozen weights stored in that dtype)
    log_every: int = 50  # optimizer steps between loss reads (each read syncs the device)
    timing_warmup_steps: int = 5  # optimizer steps left out of throughput
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, mlflow, wandb, trackio, ...
    dist_timeout: int = 300  # seconds a process waits in a collective for the others before the run fails


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015) from a fine-tuned teacher checkpoint."""

    teacher: str | None = None  # a checkpoint/ directory of the same task and tokenizer; null = no distillation
    temperature: float = 2.0  # both distributions are softened by it; the KL term is scaled by its square
    alpha: float = 0.5  # the KL term's share of the loss; the labels' cross-entropy takes 1 - alpha


@dataclass
class TrainConfig(LoopConfig):
    lr: float | None = None  # peak learning rate; null = the method's own default (docs/methods/<name>.md)
    epochs: int = 3  # passes over the training split (when max_steps is -1)
    group_by_length: bool = True  # length-grouped shuffled batches (less padding)
    save_checkpoint: bool = True  # write checkpoint/ beside record.json
    compile: bool = False  # torch.compile the model (inductor)
    gradient_checkpointing: bool = False  # recompute layer activations in the backward pass (less memory)
    measure_inference: bool = True  # after training: one-sequence latency and batch throughput, as trained and merged
    evaluate_test: bool = True  # score the labeled test split too (a learning-rate search scores dev only)
    sharding: str = "auto"  # auto (the launch config decides) | ddp (whole copies) | fsdp2 (shard every weight)
    save_state_every: int = 0  # optimizer steps between resumable training states (0: none)
    resume: bool = False  # continue from the training state a killed run of this configuration left
    # training tricks (peftbench/tricks, docs/tricks.md); each is off at its default
    layer_decay: float = 1.0  # layer-wise rate decay: layer i of n trains at lr * layer_decay ** (n - i)
    label_smoothing: float = 0.0  # share of each target spread evenly over the classes
    rdrop_alpha: float = 0.0  # R-Drop: two dropout passes, this weight on their symmetric KL
    adversarial: str = "none"  # none | fgm | pgd: perturb the input embeddings' output along the loss gradient
    adversarial_epsilon: float = 0.1  # fgm: the perturbation's L2 norm per example; pgd: the ball it stays in
    adversarial_steps: int = 3  # pgd: ascent steps
    adversarial_alpha: float = 0.04  # pgd: each step's L2 norm per example
    ema_decay: float = 0.0  # > 0: evaluate and save the exponential moving average of the trained weights
    swa_last: int = 0  # >= 2: evaluate and save the mean of the trained weights at the last k evaluations
    early_stopping_patience: int = 0  # > 0: stop after this many evaluations without a better dev score
    distill: DistillConfig = field(default_factory=DistillConfig)  # train.distill.teacher=CKPT: learn its soft labels


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the Config dataclass of the chosen method
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str | None = None  # None = runs/<task>-<method>-<run id>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changed_settings(self) -> dict:
        """Method and model settings away from their defaults (the backbone aside), and the training settings
        added since records were first written (tricks, schedules) away from theirs: what tells a leaderboard row
        apart, written into the record so that tables read records only."""
        method_defaults = dataclasses.asdict(type(self.method)())
        model_defaults = dataclasses.asdict(ModelConfig())
        train, train_defaults = dataclasses.asdict(self.train), dataclasses.asdict(TrainConfig())
        later = [key.split(".", 1)[1] for key in LATER_KEYS if key.startswith("train.")]
        return {"method": {k: v for k, v in dataclasses.asdict(self.method).items() if method_defaults[k] != v},
                "model": {k: v for k, v in dataclasses.asdict(self.model).items()
                          if k not in ("name_or_path", "tokenizer") and model_defaults[k] != v},
                "train": {k: dotted(train, k) for k in later if dotted(train, k) != dotted(train_defaults, k)}}

    @property
    def run_id(self) -> str:
        """Stable hash of everything that changes the result (not where it is written or watched). Keys in
        ``LATER_KEYS`` count only when set away from their default, so that records written before
        they existed keep their ids (and sweeps resume over them)."""
        body = self.to_dict()
        body.pop("output_dir")
        from peftbench.records import NOT_IDENTITY  # (records import torch: not at start-up)

        for key in NOT_IDENTITY:  # how a run is watched, measured after, saved on the way or resumed
            body["train"].pop(key)
        drop_defaults(body, RunConfig(method=type(self.method)()).to_dict(), LATER_KEYS)
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def dotted(tree: dict, key: str) -> Any:
    """``tree``'s value at dotted ``key`` (``distill.teacher``), or None where a part is missing."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def drop_defaults(body: dict, defaults: dict, keys: tuple[str, ...]) -> None:
    """Remove each dotted key of ``keys`` from ``body`` where it holds its value in ``defaults``, and the
    sections that this leaves empty (a section added whole holds only such keys)."""
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        trail, node, default = [], body, defaults
        for part in parents:
            if not isinstance(node.get(part), dict):
                break
            trail.append((node, part))
            node, default = node[part], default.get(part) or {}
        else:
            if leaf in node and leaf in default and node[leaf] == default[leaf]:
                del node[leaf]
                for parent, part in reversed(trail):
                    if parent[part]:
                        break
                    del parent[part]


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _yaml_float(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads ``2e-5`` (no dot) as a string; read it as the float it means."""
    if isinstance(value, str) and float in (typing.get_args(hint) or (hint,)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _one_as_list(value: Any, hint: Any) -> Any:
    """A single string where a list of strings is expected (``report_to: tensorboard``) is a list of one."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    lists = [h for h in (typing.get_args(hint) if union else (hint,)) if typing.get_origin(h) is list]
    if isinstance(value, str) and any(typing.get_args(h) == (str,) for h in lists):
        return [value]
    return value


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


def build(cls: type, values: dict, prefix: str) -> Any:
    """Make dataclass ``cls`` from ``values``; unknown keys and bad types name the key."""
    if not isinstance(values, dict):
        raise PeftbenchError(f"config key '{prefix}' must be a mapping, got {clip(repr(values))}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise PeftbenchError(f"unknown config key '{clip(full)}' (known: {', '.join(sorted(names))})")
        hint = hints[key]
        value = _one_as_list(_yaml_float(value, hint), hint)
        if dataclasses.is_dataclass(hint):
            value = build(hint, value, full)
        elif not _type_ok(value, hint):
            raise PeftbenchError(f"config key '{full}' must be {_type_name(hint)}, got {clip(repr(value))}")
        if isinstance(value, int) and not isinstance(value, bool) and float in (typing.get_args(hint) or (hint,)):
            value = float(value)  # train.lr=1 is 1.0: one value, one run id
        kwargs[key] = value
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["train.lr=1e-4", "method.name=lora"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PeftbenchError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml_value(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError) as exc:
            raise PeftbenchError(f"override '{clip(item)}': invalid YAML value "
                                 f"({clip(getattr(exc, 'problem', None) or exc)})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PeftbenchError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return tree


MAX_YAML_VALUES = 100_000  # values a recipe may hold with every alias expanded (a recipe has a few hundred)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently), and a document
    whose aliases expand to more than ``MAX_YAML_VALUES`` values (an alias bomb: a few hundred bytes that
    expand to gigabytes once something copies or prints the result)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{clip(key)}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node, sizes: dict) -> int:
    """Values under a composed YAML node, counting an aliased node at each place it is used (each node's size
    is computed once, so a bomb is measured without being expanded)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that refers to itself counts once
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def yaml_value(text: str):
    """One YAML value (a ``key=value`` override's value), read with the recipe's safeguards."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PeftbenchError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PeftbenchError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") \
            from None
    try:
        data = yaml_value(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PeftbenchError(f"{path}{line}: invalid YAML ({clip(getattr(exc, 'problem', None) or exc)})") from None
    except RecursionError:
        raise PeftbenchError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise PeftbenchError(f"{path}: a recipe must be a mapping of sections")
    return data


def resolve(tree: dict) -> RunConfig:
    """Build a RunConfig from a raw nested dict (defaults fill what is missing)."""
    tree = dict(tree)
    method_tree = tree.pop("method", None) or {}
    if not isinstance(method_tree, dict):
        raise PeftbenchError(f"config key 'method' must be a mapping, got {clip(repr(method_tree))}")
    method_tree = {"name": "lora", **method_tree}
    if not isinstance(method_tree["name"], str):
        raise PeftbenchError(f"config key 'method.name' must be str, got {clip(repr(method_tree['name']))}")
    cfg = build(RunConfig, tree, "")
    method = METHODS.get(method_tree["name"], "method.name")
    cfg.method = build(method.Config, method_tree, "method")
    if cfg.train.lr is None:
        cfg.train.lr = method.default_lr
    _check_values(cfg)
    return cfg


def load(recipe: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """defaults -> ``base`` -> recipe file -> overrides."""
    tree = base or {}
    if recipe is not None:
        tree = merge(tree, read_recipe(recipe))
    tree = merge(tree, parse_overrides(overrides or []))
    return resolve(tree)


def key_help(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every field of dataclass ``cls``, nested sections expanded; the
    description is the field's trailing comment in the source (what ``--help`` and the tests read)."""
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            rows += key_help(type(default), f"{prefix}{f.name}.")
        elif hints[f.name] is not Any:  # RunConfig.method: its keys depend on the method
            rows.append((prefix + f.name, _type_name(hints[f.name]), _shown(default), comments.get(f.name, "")))
    return rows


def _shown(value: Any) -> str:
    """A default as one would write it in a recipe."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return value if isinstance(value, str) else json.dumps(value)


def _field_comments(cls: type) -> dict[str, str]:
    import inspect
    import re

    found = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment replaces its base's
        if dataclasses.is_dataclass(klass):
            try:
                source = inspect.getsource(klass)
            except OSError:  # made at run time (make_dataclass): its fields are its bases'
                continue
            for text, name in re.findall(r"^ +# *(.+)\n +(\w+) *:", source, re.M):  # a comment line above
                found[name] = text.strip()
            for name, text in re.findall(r"^ +(\w+) *:[^\n=]*=[^\n#]*# *(.+)$", source, re.M):  # or at the end
                found[name] = text.strip()
    return found


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise the one-line error for config key ``key`` unless ``ok``: ``must be <rule>, got <value>``."""
    if not ok:
        raise PeftbenchError(f"config key '{key}' must be {rule}, got {clip(repr(value))}")


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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


def _check_values(cfg: RunConfig) -> None:
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
    if m.quantization != "none" and getattr(cfg.method, "init", None) in ("pissa", "olora"):
        raise PeftbenchError(f"config keys 'method.init={cfg.method.init}' and 'model.quantization={m.quantization}' "
                             f"conflict: {cfg.method.init} rewrites the base weights, which {m.quantization} storage "
                             "holds only approximately, so the saved LoRA would not reload to the trained model; use "
                             "model.quantization=none")
