"""The variant library: `variants/*.attn`, shipped as package data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _root() -> Path:
    return Path(str(resources.files("attnc.variant_files")))


def variants() -> list[str]:
    """Names of the library's variants, sorted."""
    return sorted(p.stem for p in _root().glob("*.attn"))


def variant_path(name: str) -> Path | None:
    path = _root() / f"{name}.attn"
    return path if path.is_file() else None


def describe(name: str) -> str:
    """The first comment line of a variant file: what it is and where it comes from."""
    path = variant_path(name)
    if path is None:
        raise ValueError(f"no library variant {name!r}")
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
