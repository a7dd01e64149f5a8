"""The run configuration's sections as dataclasses, and a run's identity (its run id)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

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
