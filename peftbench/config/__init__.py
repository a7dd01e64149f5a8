"""Typed run configuration: built-in defaults -> YAML recipe -> ``key=value`` overrides.

A recipe has the sections ``task``, ``model``, ``method``, ``train`` and the key
``output_dir``. The ``method`` section is checked against the Config dataclass of
the method it names, so every method owns its keys. Unknown keys and values of
the wrong type are errors that name the key.

``sections`` holds the dataclasses and the run id, ``reading`` the YAML and overrides,
``checks`` the ranges and conflicts, ``help`` the key reference.
"""

from __future__ import annotations

from pathlib import Path

from peftbench.config.checks import check_loop, check_values, finite, require
from peftbench.config.help import key_help
from peftbench.config.reading import build, merge, parse_overrides, read_recipe, yaml_float, yaml_value
from peftbench.config.sections import (
    ADVERSARIAL,
    LATER_KEYS,
    MIXED_PRECISION,
    QUANT_COMPUTE_DTYPES,
    QUANTIZATION,
    SCHEDULERS,
    SHARDING,
    TRACKERS,
    DistillConfig,
    LoopConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    dotted,
    drop_defaults,
)
from peftbench.errors import PeftbenchError, clip
from peftbench.registry import METHODS

__all__ = ["ADVERSARIAL", "LATER_KEYS", "MIXED_PRECISION", "QUANT_COMPUTE_DTYPES", "QUANTIZATION", "SCHEDULERS",
           "SHARDING", "TRACKERS", "DistillConfig", "LoopConfig", "ModelConfig", "RunConfig", "TaskConfig",
           "TrainConfig", "build", "check_loop", "dotted", "drop_defaults", "finite", "key_help", "load", "merge",
           "parse_overrides", "read_recipe", "require", "resolve", "yaml_float", "yaml_value"]


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
    check_values(cfg)
    return cfg


def load(recipe: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """defaults -> ``base`` -> recipe file -> overrides."""
    tree = base or {}
    if recipe is not None:
        tree = merge(tree, read_recipe(recipe))
    tree = merge(tree, parse_overrides(overrides or []))
    return resolve(tree)
