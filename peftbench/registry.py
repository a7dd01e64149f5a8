"""Named plug-ins: methods and tasks register here; configs look them up by name.

A registry knows the package whose import registers its built-in entries and
imports it on the first look-up, so the ground floor (``config``) can resolve a
name without importing the floors above it. A name registered twice is an error.
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from peftbench.errors import PeftbenchError, clip

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind  # "method", "task": used in error messages
        self.package = package  # importing it registers the built-in entries
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        importlib.import_module(self.package)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str, key: str) -> T:
        """The entry called ``name``; an unknown name is an error naming config key ``key``."""
        self._load()
        if name not in self._entries:
            raise PeftbenchError(f"config key '{key}': unknown {self.kind} '{clip(name)}' "
                                 f"(known: {', '.join(self.names())})")
        return self._entries[name]


METHODS: Registry = Registry("method", "peftbench.methods")
TASKS: Registry = Registry("task", "peftbench.tasks")
