"""Public names of a package that load their module on first use (PEP 562), so that importing the package, or a
light module inside it (a config), does not load torch: `layerprune --help` reads every config's fields."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(namespace: dict, public: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for the package whose globals are `namespace`: `public` maps each name to the module
    that defines it; a name is imported once, then kept as a plain attribute."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(public[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *public])

    return __getattr__, __dir__
