"""Reading a recipe: YAML with safeguards, ``key=value`` overrides, and typed sections built from them."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from peftbench.errors import PeftbenchError, clip


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


def yaml_float(value: Any, hint: Any) -> Any:
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


def type_name(hint: Any) -> str:
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
        value = _one_as_list(yaml_float(value, hint), hint)
        if dataclasses.is_dataclass(hint):
            value = build(hint, value, full)
        elif not _type_ok(value, hint):
            raise PeftbenchError(f"config key '{full}' must be {type_name(hint)}, got {clip(repr(value))}")
        if isinstance(value, int) and not isinstance(value, bool) and float in (typing.get_args(hint) or (hint,)):
            value = float(value)  # train.lr=1 is 1.0: one value, one run id
        kwargs[key] = value
    return cls(**kwargs)


def nested(key: str, value: Any) -> dict:
    """Dotted ``key`` set to ``value`` as a nested tree: ``nested("train.lr", 1e-3) == {"train": {"lr": 1e-3}}``."""
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


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


KEY_IN_MESSAGE = re.compile(r"config keys? '([\w.]+)")  # the first key a config error names


def named_key(exc: Exception) -> str | None:
    """The config key an error names first (``config key 'train.lr' must be ...``), or None."""
    found = KEY_IN_MESSAGE.search(str(exc))
    return found.group(1) if found else None


def sets(tree: dict, key: str) -> bool:
    """Whether the nested ``tree`` gives dotted ``key`` a value."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def key_lines(path: str | Path) -> dict[str, int]:
    """The line of each key of a YAML file that reads without error, by dotted path (list items by index): where
    an error about a value of the file points."""
    lines: dict[str, int] = {}
    seen: set[int] = set()  # an alias is walked once (one may refer to itself)

    def walk(node, prefix: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            pairs = [(key.value, key, value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            pairs = [(str(i), item, item) for i, item in enumerate(node.value)]
        else:
            return
        for name, marked, child in pairs:
            lines.setdefault(f"{prefix}{name}", marked.start_mark.line + 1)
            walk(child, f"{prefix}{name}.")

    root = yaml.compose(Path(path).read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)
    if root is not None:
        walk(root, "")
    return lines


def at_line(exc: PeftbenchError, path: str | Path, line: int | None) -> PeftbenchError:
    """``exc`` prefixed with ``path:line`` (unchanged without a line)."""
    return exc if line is None else PeftbenchError(f"{path}:{line}: {exc}")
