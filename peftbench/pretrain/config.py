"""A pretraining recipe: corpus, model, masking and loop settings, read and checked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from peftbench import config as config_lib
from peftbench.errors import PeftbenchError, clip


@dataclass
class CorpusConfig:
    files: list[str] = field(default_factory=list)  # JSON lines (.json/.jsonl) or plain text (one document per line)
    # JSON: each of these fields present in a record is a document
    # JSON lines: every listed field a record has is one document
    text_fields: list[str] = field(default_factory=lambda: ["sentence", "content", "text"])
    eval_fraction: float = 0.01  # held-out blocks for the MLM loss
    allow_eval_text: bool = False  # permit files named like a task's dev/test file


@dataclass
class PretrainModelConfig:
    name_or_path: str | None = None  # continued pretraining from a hub name or local directory
    from_scratch: bool = False  # build from ``architecture`` with a char vocabulary made from the corpus
    model_type: str = "bert"  # from scratch: the architecture (a transformers model type)
    architecture: dict = field(default_factory=dict)  # config overrides, e.g. hidden_size, num_hidden_layers
    vocab_min_freq: int = 2  # from scratch: keep characters seen at least this often
    lora_r: int = 0  # > 0: continued pretraining trains LoRA adapters, merged into the saved model
    # modules LoRA adapts when lora_r > 0
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])


@dataclass
class MaskConfig:
    block_size: int = 128  # tokens per block
    probability: float = 0.15  # share of the (non-special) tokens, or words, masked
    whole_word: bool = False  # mask whole words (Chinese: segmented with jieba)


@dataclass
class PretrainTrainConfig(config_lib.LoopConfig):
    max_steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # > 0: also stop after this much training time; the LR schedule follows the budget
    batch_size: int = 64  # blocks per process and micro-batch
    lr: float = 5e-4  # peak learning rate
    warmup_ratio: float = 0.06  # share of steps spent warming up the learning rate
    log_every: int = 20  # optimizer steps between loss reads and time-budget checks
    eval_every: int = 200  # optimizer steps between held-out MLM losses
    save_every: int = 200  # optimizer steps between resumable checkpoints
    timing_warmup_steps: int = 3  # optimizer steps left out of throughput


@dataclass
class PretrainConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    output_dir: str = "runs/pretrain"  # model/ (the result), pretrain_record.json, checkpoint/ while running
    # a backbone folder this recipe rebuilds (the committed zh-mini): at the end, whether model/ matches it
    reference: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_id(self) -> str:
        body = self.to_dict()
        body.pop("output_dir")
        body.pop("reference")  # what the result is compared with, not what makes it
        for key in ("report_to", "dist_timeout"):  # how the run is watched or waits changes no result
            body["train"].pop(key)
        config_lib.drop_defaults(body, PretrainConfig().to_dict(), config_lib.LATER_KEYS)  # ids of older runs
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_config(recipe: str | None, overrides: list[str]) -> PretrainConfig:
    """The recipe with its overrides, checked; a bad value the recipe file sets is named with its line."""
    given = config_lib.parse_overrides(overrides)
    tree = config_lib.merge(config_lib.read_recipe(recipe) if recipe else {}, given)
    try:
        return _checked(config_lib.build(PretrainConfig, tree, ""))
    except PeftbenchError as exc:
        raise config_lib.located(exc, recipe, given) from None


def _checked(cfg: PretrainConfig) -> PretrainConfig:
    if not cfg.corpus.files:
        raise PeftbenchError("config key 'corpus.files': give at least one text file")
    if cfg.model.from_scratch == (cfg.model.name_or_path is not None):
        raise PeftbenchError("config keys 'model.name_or_path' / 'model.from_scratch': set exactly one")
    if cfg.model.from_scratch and cfg.model.lora_r:
        raise PeftbenchError("config key 'model.lora_r': LoRA needs pretrained weights (not model.from_scratch)")
    config_lib.check_loop(cfg.train)
    config_lib.require(cfg.train.max_steps >= 1, "train.max_steps", ">= 1", cfg.train.max_steps)
    for key in ("eval_every", "save_every"):
        config_lib.require(getattr(cfg.train, key) >= 1, f"train.{key}", ">= 1", getattr(cfg.train, key))
    config_lib.require(config_lib.finite(cfg.train.max_minutes) and cfg.train.max_minutes >= 0, "train.max_minutes",
                       "a finite number >= 0 (0: no time limit)", cfg.train.max_minutes)
    if not 0 < cfg.mask.probability < 1:
        raise PeftbenchError(f"config key 'mask.probability' must be in (0, 1), got {cfg.mask.probability}")
    if cfg.mask.block_size < 8:
        raise PeftbenchError(f"config key 'mask.block_size' must be >= 8, got {cfg.mask.block_size}")
    if not 0 < cfg.corpus.eval_fraction < 0.5:
        raise PeftbenchError(f"config key 'corpus.eval_fraction' must be in (0, 0.5), got {cfg.corpus.eval_fraction}")
    if cfg.reference is not None and not (Path(cfg.reference) / "config.json").is_file():
        raise PeftbenchError(f"config key 'reference': {clip(cfg.reference)} is not a model folder (no config.json)")
    return cfg
