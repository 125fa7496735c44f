"""One registry shape for metrics, healing methods and architecture families: a name registered twice
is a programming error (ValueError at import), an unknown name is a user error that lists the known ones.
Built-in entries that live in other modules are registered by importing those modules before the first lookup
(lm-evaluation-harness's lazy registry), so no package has to import them all when it is imported."""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from layerprune.errors import LayerpruneError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> entry. `what` names the kind in messages ("metric", "healing method", "model_type")."""

    def __init__(self, what: str, builtins: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.what = what
        self._builtins = builtins  # modules that register built-in entries when imported

    def load_builtins(self) -> None:
        while self._builtins:
            module, *rest = self._builtins
            self._builtins = tuple(rest)
            importlib.import_module(module)

    def names(self) -> list[str]:
        self.load_builtins()
        return sorted(self)

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry of `name`, or one LayerpruneError listing what is registered."""
        self.load_builtins()
        if name not in self:
            raise LayerpruneError(f"unknown {self.what} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]
