"""One registry shape for metrics, healing methods and architecture families: a name registered twice
is a programming error (ValueError at import), an unknown name is a user error that lists the known ones."""

from __future__ import annotations

from typing import Generic, TypeVar

from layerprune.errors import LayerpruneError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> entry. `what` names the kind in messages ("metric", "healing method", "model_type")."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry of `name`, or one LayerpruneError listing what is registered."""
        if name not in self:
            raise LayerpruneError(f"unknown {self.what} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]
