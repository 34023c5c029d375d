"""On-disk cache of generated kernels and launch configurations.

Layout under $ATTNC_CACHE_DIR (default ~/.cache/attnc):
    kernels/<key>.py          generated Triton source; key = hash(kernel IR, codegen and tool
                              versions)
    kernels/<key>.names.json  how that source spelled the spec's names (a hit rebuilds the
                              kernels' contracts from the IR and these, generating no code)
    configs/<key>.json        launch configuration; key = hash(kernel key, dtype, device
                              capability)
Files are written to a temporary name and renamed (atomic on POSIX), so concurrent writers never
leave a torn file; the last rename wins with identical content. The names are written before
the source, so a source on disk always has its names. Generated modules are imported
with importlib from the cache path so Triton (and tracebacks) can read their source.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("ATTNC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "attnc"


def versions() -> dict[str, str]:
    import torch
    import triton

    from attnc import __version__
    return {"attnc": __version__, "codegen": codegen_fingerprint(), "triton": triton.__version__,
            "torch": torch.__version__}


@functools.lru_cache(maxsize=1)
def codegen_fingerprint() -> str:
    """Hash of the code generator's own source (the Triton backend and the op table's
    spellings): a generator change invalidates old kernels."""
    import attnc.backends.triton as backend
    from attnc.expr import functions
    files = sorted(Path(backend.__file__).parent.rglob("*.py")) + [Path(functions.__file__)]
    return digest(*(f.read_text() for f in files))[:16]


def digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def kernel_path(key: str) -> Path:
    return cache_dir() / "kernels" / f"{key}.py"


def _names_path(key: str) -> Path:
    return cache_dir() / "kernels" / f"{key}.names.json"


def read_kernel(key: str) -> tuple[str, dict[str, str]] | None:
    """The cached source and its names, or None."""
    path, names = kernel_path(key), _names_path(key)
    if not (path.is_file() and names.is_file()):
        return None
    return path.read_text(), json.loads(names.read_text())


def write_kernel(key: str, text: str, names: dict[str, str]) -> Path:
    _write_atomic(_names_path(key), json.dumps(names, sort_keys=True))
    path = kernel_path(key)
    _write_atomic(path, text)
    return path


def read_config(key: str) -> dict | None:
    path = cache_dir() / "configs" / f"{key}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_config(key: str, config: dict) -> None:
    _write_atomic(cache_dir() / "configs" / f"{key}.json", json.dumps(config, sort_keys=True))


def import_kernel(key: str):
    """Import kernels/<key>.py as module attnc_generated_<key>, once per process."""
    name = f"attnc_generated_{key[:24]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, kernel_path(key))
    assert spec is not None and spec.loader is not None, kernel_path(key)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def info() -> dict:
    root = cache_dir()
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return {"path": str(root), "kernels": sum(p.suffix == ".py" for p in files),
            "configs": sum(p.parent.name == "configs" for p in files),
            "bytes": sum(p.stat().st_size for p in files)}


def clear() -> int:
    """Remove cached kernels (with their names) and configs; returns how many files were
    removed."""
    removed = 0
    for sub in ("kernels", "configs"):
        d = cache_dir() / sub
        if d.exists():
            for p in d.iterdir():
                if p.is_file():
                    p.unlink()
                    removed += 1
    return removed
