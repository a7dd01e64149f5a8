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
from peftbench.config.reading import (
    at_line,
    build,
    key_lines,
    merge,
    named_key,
    nested,
    parse_overrides,
    read_recipe,
    sets,
    yaml_float,
    yaml_value,
)
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

__all__ = ["ADVERSARIAL", "LATER_KEYS", "MIXED_PRECISION", "QUANTIZATION", "QUANT_COMPUTE_DTYPES", "SCHEDULERS",
           "SHARDING", "TRACKERS", "DistillConfig", "LoopConfig", "ModelConfig", "RunConfig", "TaskConfig",
           "TrainConfig", "at_line", "build", "check_loop", "dotted", "drop_defaults", "finite", "key_help",
           "key_lines", "load", "located", "merge", "named_key", "nested", "parse_overrides", "read_recipe", "require",
           "resolve", "sets", "yaml_float", "yaml_value"]


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
    """defaults -> ``base`` -> recipe file -> overrides. An error about a key the recipe file sets (and no override
    replaces) names the file and the key's line."""
    tree, given = base or {}, parse_overrides(overrides or [])
    if recipe is not None:
        tree = merge(tree, read_recipe(recipe))
    try:
        return resolve(merge(tree, given))
    except PeftbenchError as exc:
        raise located(exc, recipe, given) from None


def located(exc: PeftbenchError, recipe: str | Path | None, given: dict) -> PeftbenchError:
    """``exc`` named with the recipe file and the line of the key it names, where the file sets that key and no
    override (``given``) replaces it; else ``exc`` as it is."""
    key = named_key(exc)
    if recipe is None or key is None or sets(given, key):
        return exc
    return at_line(exc, recipe, key_lines(recipe).get(key))
