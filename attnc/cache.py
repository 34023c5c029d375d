"""On-disk cache of generated kernels and launch configurations.

Layout under $ATTNC_CACHE_DIR (default ~/.cache/attnc):
    kernels/<key>.py          generated Triton source; key = hash(kernel IR, codegen and tool
                              versions, this file layout). Its first line is a comment naming the
                              key and the sha256 of the rest of the file.
    kernels/<key>.names.json  {"key": <key>, "names": how that source spelled the spec's names}
                              (a hit rebuilds the kernels' contracts from the IR and these,
                              generating no code)
    configs/<key>.json        launch configuration record, with the "key" it was written for;
                              key = hash(kernel key, dtype, device capability)
    */*.tmp                   a file being written (or left by a writer that died)

Every file is checked when read, once per kernel per process: a kernel whose header does not
name its key, whose content does not match its checksum, or whose names file is missing or
malformed is reported (CacheWarning) and treated as a miss, so the caller regenerates it and
the rewrite repairs the entry; a config that is not a JSON object written for its key is
ignored the same way (attnc.autotune also checks its contents). A file that cannot be read reads
as a miss.

Files are written to a temporary name and renamed (atomic on POSIX), so concurrent writers never
leave a torn file; the last rename wins, and every writer of a key writes an equivalent entry.
A writer whose temporary file a concurrent `clear` removed writes it again. The names are
written before the source. A cache directory that cannot be written is replaced, for the rest
of the process, by a private temporary directory (one CacheWarning). Generated modules are
imported from the source in memory, never re-read from the file: a concurrent `attnc cache
clear` or damage after the check cannot change what runs. Their code and linecache entries
carry the file's path, so Triton (which reads a jit function's source through inspect) and
tracebacks see that source.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.abc
import importlib.util
import json
import linecache
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import CodeType, ModuleType

# Part of every key (through `versions`): a change to the files' layout makes old entries misses
# instead of damaged entries.
FORMAT = "2"
TMP_SUFFIX = ".tmp"
SUBDIRS = ("kernels", "configs")
_WRITE_ATTEMPTS = 3  # a concurrent `clear` can delete a writer's temporary file; retry that
IGNORED = "ignored it (a tuning call retunes and rewrites it)"


class CacheWarning(RuntimeWarning):
    """A cache entry failed its checks and was rebuilt or ignored, or the cache directory
    could not be written."""


class DamagedEntry(Exception):
    """A cache file failed a check; the message says which."""


def cache_dir() -> Path:
    env = os.environ.get("ATTNC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "attnc"


def versions() -> dict[str, str]:
    import torch
    import triton

    from attnc import __version__
    return {"attnc": __version__, "codegen": codegen_fingerprint(), "triton": triton.__version__,
            "torch": torch.__version__, "cache format": FORMAT}


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


def report_damaged(what: str, why: str, action: str = "rebuilt it") -> None:
    warnings.warn(f"attnc cache: {what} in {cache_dir()} was damaged ({why}); {action}",
                  CacheWarning, stacklevel=3)


# --- where files live: the cache directory, or this process's fallback ------------------------

_LOCK = threading.Lock()
_UNWRITABLE: set[Path] = set()  # cache directories a write failed in, this process
_SCRATCH: list[Path] = []  # this process's fallback directory, once made


def _roots() -> list[Path]:
    """Where files are looked up, in order. The fallback comes first: it holds only what this
    process wrote, while the cache directory may hold a damaged file it could not replace."""
    return [*_SCRATCH, cache_dir()]


def _scratch() -> Path:
    """This process's fallback directory, made on first use and removed at exit."""
    with _LOCK:
        if not _SCRATCH:
            path = Path(tempfile.mkdtemp(prefix="attnc-cache-"))
            atexit.register(_remove_scratch, path, os.getpid())
            _SCRATCH.append(path)
        return _SCRATCH[0]


def _remove_scratch(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # a forked child inherits the exit hook, not the directory
        shutil.rmtree(path, ignore_errors=True)


def _give_up_on(root: Path, exc: OSError) -> None:
    """Stop writing to `root` in this process, saying once where entries go instead."""
    with _LOCK:
        if root in _UNWRITABLE:
            return
        _UNWRITABLE.add(root)
    try:
        instead = f"this process caches in {_scratch()} instead"
    except OSError as err:
        instead = f"nor a temporary directory ({err}); kernels stay in memory"
    warnings.warn(f"attnc cache: cannot write {root} ({exc}); {instead}", CacheWarning,
                  stacklevel=4)


def _read(rel: str) -> bytes | None:
    """A cache file's bytes from the first root that has it. None when none can be read: a
    missing file, one a concurrent `clear` removed and an unreadable one are all misses."""
    for root in _roots():
        try:
            return (root / rel).read_bytes()
        except OSError:
            continue
    return None


def _store(rel: str, data: bytes) -> Path | None:
    """Write a cache file under the cache directory or, once that has failed, under this
    process's fallback; None when neither can be written (the caller keeps what it needs in
    memory)."""
    root = cache_dir()
    if root not in _UNWRITABLE:
        try:
            return _write_atomic(root / rel, data)
        except OSError as exc:
            _give_up_on(root, exc)
    try:
        return _write_atomic(_scratch() / rel, data)
    except OSError:
        return None


def _write_atomic(path: Path, data: bytes) -> Path:
    for _ in range(_WRITE_ATTEMPTS - 1):
        try:
            _replace(path, data)
            return path
        except FileNotFoundError:  # a concurrent `clear` removed the temporary file
            continue
    _replace(path, data)
    return path


def _replace(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so no reader sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --- kernels ---------------------------------------------------------------------------------

_HEADER = re.compile(rb"# attnc cache entry: key ([0-9a-f]{64}) sha256 ([0-9a-f]{64})")


def _stamped(key: str, text: str) -> bytes:
    """A kernel file's content: a header line with its key and the body's checksum, then the
    source."""
    body = text.encode()
    header = f"# attnc cache entry: key {key} sha256 {hashlib.sha256(body).hexdigest()}\n"
    return header.encode() + body


def _unstamped(key: str, data: bytes) -> str:
    """The source in a kernel file's content; raises DamagedEntry unless its header names
    `key` and the checksum of the rest."""
    first, _, body = data.partition(b"\n")
    header = _HEADER.fullmatch(first)
    if header is None:
        raise DamagedEntry("it lacks its header line: empty, overwritten or cut")
    if header[1].decode() != key:
        raise DamagedEntry(f"it holds kernel {header[1][:16].decode()}, not this one")
    if hashlib.sha256(body).hexdigest() != header[2].decode():
        raise DamagedEntry("its content does not match its checksum: cut short or edited")
    return body.decode()


def _names(key: str, data: bytes | None) -> dict[str, str]:
    """The spellings in a names file; raises DamagedEntry unless it is one written for `key`."""
    if data is None:
        raise DamagedEntry("its names file is missing")
    names = _keyed_record(key, data, "its names file").get("names")
    if not (isinstance(names, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())):
        raise DamagedEntry("its names file does not map names to spellings")
    return names


def kernel_path(key: str) -> Path:
    """Where kernel `key`'s file is (this process's fallback first), else where it goes."""
    for root in _roots():
        path = root / "kernels" / f"{key}.py"
        if _is_file(path):
            return path
    return cache_dir() / "kernels" / f"{key}.py"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # an unreadable directory
        return False


def read_kernel(key: str) -> tuple[str, dict[str, str]] | None:
    """The cached source of kernel `key` and its names, or None: on a miss, and (with a
    CacheWarning) when the entry fails its checks; the caller regenerates and rewrites it."""
    data = _read(f"kernels/{key}.py")
    if data is None:
        return None
    try:
        return _unstamped(key, data), _names(key, _read(f"kernels/{key}.names.json"))
    except DamagedEntry as exc:
        report_damaged(f"kernel {key[:16]}", str(exc))
        return None


def write_kernel(key: str, text: str, names: dict[str, str]) -> Path | None:
    """Cache kernel `key`'s source and names; the source's path, None if nothing could be
    written."""
    _store(f"kernels/{key}.names.json",
           json.dumps({"key": key, "names": names}, sort_keys=True).encode())
    return _store(f"kernels/{key}.py", _stamped(key, text))


def kernel_file(key: str, text: str, names: dict[str, str]) -> Path:
    """A file holding exactly this entry, for tools that read the source from disk (Triton's
    AOT compiler): the cached one, rewritten from memory if it vanished or differs."""
    path = kernel_path(key)
    try:
        if path.read_bytes() == _stamped(key, text):
            return path
    except OSError:
        pass
    written = write_kernel(key, text, names)
    if written is None:
        raise OSError(f"attnc cache: cannot write kernel {key[:16]} anywhere")
    return written


class _SourceLoader(importlib.abc.InspectLoader):
    """Loads a module from source held in memory, compiled under the file's path."""

    def __init__(self, text: str, path: Path):
        self._text, self._path = text, path

    def get_source(self, fullname: str) -> str:
        return self._text

    def get_code(self, fullname: str) -> CodeType:
        return compile(self._text, str(self._path), "exec", dont_inherit=True)


_IMPORT_LOCK = threading.Lock()


def import_kernel(key: str, text: str, path: Path, entries: Iterable[str] = ()) -> ModuleType:
    """Import `text`, kernel `key`'s verified source, as module attnc_generated_<key>, once per
    process; ImportError if it lacks one of the functions `entries`, and a module that fails
    to import is not kept. `path` (where the file is, or was meant to be) names the code for
    tracebacks; the source is primed in linecache under it, because inspect (and so Triton)
    would otherwise read the file, which may have vanished or changed since."""
    name = f"attnc_generated_{key[:24]}"
    with _IMPORT_LOCK:
        if name in sys.modules:
            return sys.modules[name]
        loader = _SourceLoader(text, path)
        spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
        assert spec is not None, path
        module = importlib.util.module_from_spec(spec)
        # mtime None: linecache.checkcache leaves the entry alone instead of re-reading the file
        linecache.cache[str(path)] = (len(text), None, text.splitlines(True), str(path))
        sys.modules[name] = module
        try:
            loader.exec_module(module)
            missing = [entry for entry in entries if not hasattr(module, entry)]
            if missing:
                raise ImportError(f"the module defines no {', '.join(missing)}")
        except BaseException:
            del sys.modules[name]
            raise
        return module


# --- launch configurations -------------------------------------------------------------------

def read_config(key: str) -> dict | None:
    """The launch configuration record cached under `key` (without its "key"), or None: when
    there is none, and (with a CacheWarning) when the file is not a JSON object written for
    `key`. attnc.autotune checks the launch options in it."""
    data = _read(f"configs/{key}.json")
    if data is None:
        return None
    try:
        return _config_record(key, data)
    except DamagedEntry as exc:
        report_damaged(f"launch configuration {key[:16]}", str(exc), IGNORED)
        return None


def _config_record(key: str, data: bytes) -> dict:
    record = _keyed_record(key, data, "it")
    return {k: v for k, v in record.items() if k != "key"}


def _keyed_record(key: str, data: bytes, what: str) -> dict:
    """A JSON object written for `key` (names files and configs carry theirs); raises
    DamagedEntry naming `what` otherwise."""
    try:
        record = json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        raise DamagedEntry(f"{what} is not JSON: cut short or overwritten") from None
    if not isinstance(record, dict) or record.get("key") != key:
        raise DamagedEntry(f"{what} was not written for this key")
    return record


def write_config(key: str, config: dict) -> None:
    _store(f"configs/{key}.json", json.dumps({**config, "key": key}, sort_keys=True).encode())


# --- the `attnc cache` commands --------------------------------------------------------------

def _files(root: Path) -> list[Path]:
    """The files of the cache's subdirectories; a concurrent `clear` may remove any of them."""
    files: list[Path] = []
    for sub in SUBDIRS:
        try:
            files += [p for p in (root / sub).iterdir() if p.is_file()]
        except OSError:
            continue
    return files


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def info() -> dict:
    """What the cache directory holds: kernels and configs (temporary files, of a writer at
    work or one that died, are counted apart), and the bytes of all its files."""
    root = cache_dir()
    files = _files(root)
    return {"path": str(root),
            "kernels": sum(p.parent.name == "kernels" and p.suffix == ".py" for p in files),
            "configs": sum(p.parent.name == "configs" and p.suffix == ".json" for p in files),
            "temporary": sum(p.suffix == TMP_SUFFIX for p in files),
            "bytes": sum(_size(p) for p in files)}


def clear() -> int:
    """Remove cached kernels (with their names), configs and temporary files; returns how many
    files this call removed. Safe while other processes compile: they hold their kernels in
    memory and rewrite what they need."""
    removed = 0
    for path in _files(cache_dir()):
        try:
            path.unlink()
        except FileNotFoundError:  # removed by a concurrent clear or renamed by a writer
            continue
        removed += 1
    return removed
