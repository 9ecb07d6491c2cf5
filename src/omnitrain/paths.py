"""Resolve `builtin:<name>` references to folders shipped in omnitrain/assets."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
_ALIASES = {"demo": "demo_data"}


def resolve(ref: str, key: str = "path") -> Path:
    """`builtin:<name>` -> the shipped folder; anything else -> an expanded path.

    `key` names the config key in the error message.
    """
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        path = ASSETS / _ALIASES.get(name, name)
        if not path.exists():
            shipped = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
            raise FileNotFoundError(f"{key}={ref!r}: no shipped asset {name!r}; shipped: {', '.join(shipped)}")
        return path
    return Path(ref).expanduser()
