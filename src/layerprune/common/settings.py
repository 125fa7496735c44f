"""Digests of settings and the keys two settings differ in: what run stages, heal checkpoints and caches
are keyed by, so work made under other settings is never taken for the current one."""

from __future__ import annotations

import hashlib
import json


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """'key.path: old -> new' for each setting that differs (dotted paths, as --set writes them; a list of
    stages such as heal is followed item by item, a list of values is one setting)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and all(isinstance(item, dict) for item in old + new)):
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in changed_keys(a, b, f"{prefix}{i}.")]
    if old == new:
        return []
    return [f"{prefix.rstrip('.')}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"]
