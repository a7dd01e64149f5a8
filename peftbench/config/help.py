"""Every config key with its type, default and meaning, read from the dataclasses (``peftbench run --help``)."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from peftbench.config.reading import type_name


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
            rows.append((prefix + f.name, type_name(hints[f.name]), _shown(default), comments.get(f.name, "")))
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
