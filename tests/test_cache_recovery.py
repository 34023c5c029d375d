"""The cache under damage: a kernel file emptied, garbled, cut short or swapped for another
kernel's, a names file lost or mangled, a launch configuration mangled, a cache directory that
cannot be written, `attnc cache clear` under running compiles and files left by writers that
died. Each is detected and rebuilt (with a CacheWarning), in this process and in a new one, and
every call still matches an eager reference, forward and backward."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import attnc
from attnc import cache, cli

ROOT = Path(__file__).resolve().parents[1]
SPEC = "attention windowed {\n  option window = 4\n  mask = n <= m and m - n < window\n}\n"
N = D = 16
TOL = 1e-4
DONOR = 2  # the window of the kernel whose files are copied over other kernels'
TUNED = {"autotune": True, "block_m": 16, "block_n": 16}  # one candidate: tuning stays quick


# --- running kernels against an eager reference -------------------------------------------------

def reference(window: int):
    def attend(q, k, v):
        m, n = torch.arange(N)[:, None], torch.arange(N)[None, :]
        keep = (n <= m) & (m - n < window)
        scores = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v
    return attend


def _forward_backward(fn) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 1, N, D, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def error(kernel, window: int) -> float:
    """The largest difference between the kernel's output and gradients and the reference's."""
    got, want = _forward_backward(kernel), _forward_backward(reference(window))
    return max((a - b).abs().max().item() for a, b in zip(got, want))


def run_windows(windows, **options) -> list[dict]:
    """Compile SPEC at each window and run it: its error, the cache's warnings, and whether its
    cache entry reads back intact afterwards."""
    out = []
    for window in windows:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernel = attnc.compile(SPEC, window=window, **options)
            err = error(kernel, window)
        entry = cache.read_kernel(kernel.key)
        out.append({"window": window, "error": err,
                    "warnings": [str(w.message) for w in caught
                                 if issubclass(w.category, cache.CacheWarning)],
                    "intact": entry is not None and entry[0] == kernel.source})
    return out


# A new process running run_windows on the cache directory it is given
CHILD = textwrap.dedent("""
    import json, sys
    from tests.test_cache_recovery import run_windows
    options = json.loads(sys.argv[1])
    print(json.dumps(run_windows([int(w) for w in sys.argv[2:]], **options)))
""")


def _spawn(cache_dir: Path, windows, **options) -> subprocess.Popen:
    env = dict(os.environ, ATTNC_CACHE_DIR=str(cache_dir))
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(options),
                             *map(str, windows)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _results(proc: subprocess.Popen, timeout: float = 240) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def forget() -> None:
    """Drop what this process holds of compiled kernels, so the next compile reads the disk."""
    attnc._MEMO.clear()
    for name in [n for n in sys.modules if n.startswith("attnc_generated_")]:
        del sys.modules[name]


@pytest.fixture
def fresh(tmp_path, monkeypatch) -> Path:
    """A cache directory of the test's own, and no kernel of an earlier test in memory."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    forget()
    yield tmp_path
    forget()


# --- ways to damage a kernel's entry -------------------------------------------------------------

def _source(root: Path, key: str) -> Path:
    return root / "kernels" / f"{key}.py"


def _names(root: Path, key: str) -> Path:
    return root / "kernels" / f"{key}.names.json"


def _restamp(root: Path, key: str, body: str) -> None:
    """Write `body` as kernel `key`'s file under a header recomputed for it, as a careless tool
    (or a forger) would."""
    digest = hashlib.sha256(body.encode()).hexdigest()
    _source(root, key).write_text(f"# attnc cache entry: key {key} sha256 {digest}\n{body}")


def _body(root: Path, key: str) -> str:
    text = _source(root, key).read_text()
    return text.split("\n", 1)[1] if text.startswith("# attnc cache entry") else text


def _after_forward(text: str) -> str:
    """`text` up to the first kernel after the forward's: it imports, and the forward runs."""
    forward = re.search(r"\ndef \w+_fwd\(", text)
    assert forward is not None
    return text[:text.index("\n@triton.jit", forward.end())]


def _copy(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes())


DAMAGE = {
    "empty": lambda root, key, donor: _source(root, key).write_bytes(b""),
    "garbage": lambda root, key, donor: _source(root, key).write_bytes(bytes(range(256)) * 8),
    "syntax error": lambda root, key, donor: _source(root, key).write_text("def kernel(:\n"),
    "raises at import": lambda root, key, donor: _source(root, key).write_text(
        "raise RuntimeError('damaged')\n"),
    "cut in half": lambda root, key, donor: _source(root, key).write_bytes(
        _source(root, key).read_bytes()[:_source(root, key).stat().st_size // 2]),
    "cut after the forward": lambda root, key, donor: _source(root, key).write_text(
        _after_forward(_source(root, key).read_text())),
    "another kernel's source": lambda root, key, donor: _copy(_source(root, donor),
                                                              _source(root, key)),
    "another kernel's entry": lambda root, key, donor: (
        _copy(_source(root, donor), _source(root, key)),
        _copy(_names(root, donor), _names(root, key))),
    # a header recomputed for damaged content: what the checksum cannot see, the import check
    # (the module imports and defines every kernel) must
    "re-stamped, raises at import": lambda root, key, donor: _restamp(
        root, key, "raise RuntimeError('damaged')\n"),
    "re-stamped, cut after the forward": lambda root, key, donor: _restamp(
        root, key, _after_forward(_body(root, key))),
    "names missing": lambda root, key, donor: _names(root, key).unlink(),
    "names garbage": lambda root, key, donor: _names(root, key).write_bytes(b"\xff{\x00"),
    "names of the wrong shape": lambda root, key, donor: _names(root, key).write_text(
        json.dumps({"key": key, "names": ["windowed"]})),
    "another kernel's names": lambda root, key, donor: _copy(_names(root, donor),
                                                             _names(root, key)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_kernel_entry_is_rebuilt(fresh, damage):
    donor = attnc.compile(SPEC, window=DONOR).key
    key = attnc.compile(SPEC, window=5).key
    DAMAGE[damage](fresh, key, donor)
    forget()
    (result,) = run_windows([5])
    assert result["error"] < TOL, result
    assert len(result["warnings"]) == 1 and "damaged" in result["warnings"][0], result
    assert result["intact"], result  # rewritten: the next process hits


def test_damaged_kernel_entries_are_rebuilt_in_a_new_process(fresh):
    donor = attnc.compile(SPEC, window=DONOR).key
    windows = {damage: 3 + i for i, damage in enumerate(DAMAGE)}
    for damage, window in windows.items():
        DAMAGE[damage](fresh, attnc.compile(SPEC, window=window).key, donor)
    results = _results(_spawn(fresh, windows.values()))
    for damage, result in zip(windows, results):
        assert result["error"] < TOL and result["warnings"] and result["intact"], (damage, result)
    assert cache.info()["temporary"] == 0


# --- ways to damage a launch configuration ------------------------------------------------------

def _edit(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


CONFIG_DAMAGE = {
    "garbage": lambda path: path.write_bytes(b"\x00garbage\xff"),
    "cut short": lambda path: path.write_bytes(path.read_bytes()[:40]),
    "not an object": lambda path: path.write_text("[16, 16, 4, 1]"),
    "a tile that is a string": lambda path: _edit(path, lambda r: r.update(BLOCK_M="16")),
    "a tile that is no power of two": lambda path: _edit(path, lambda r: r.update(BLOCK_M=24)),
    "a launch option missing": lambda path: _edit(path, lambda r: r.pop("BLOCK_N")),
    "written for another key": lambda path: _edit(path, lambda r: r.update(key="0" * 64)),
}


def _damage_configs(root: Path, damage: str, spare: frozenset[Path] = frozenset()) -> int:
    """Damage every config file but those in `spare`; how many were damaged."""
    paths = set((root / "configs").glob("*.json")) - spare
    for path in paths:
        CONFIG_DAMAGE[damage](path)
    return len(paths)


def _tuned_records(root: Path) -> list[dict | None]:
    return [cache.read_config(p.stem) for p in sorted((root / "configs").glob("*.json"))]


@pytest.mark.parametrize("tune", [True, False])
@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_a_damaged_launch_configuration_is_ignored(fresh, damage, tune):
    run_windows([5], **TUNED)  # tunes and caches the forward's and the backward's
    assert _damage_configs(fresh, damage) == 2
    forget()
    (result,) = run_windows([5], **{**TUNED, "autotune": tune})
    assert result["error"] < TOL, result
    assert len(result["warnings"]) == 2 and all("damaged" in w for w in result["warnings"])
    if tune:  # retuned and rewritten
        assert all(r is not None and r["source"] == "tuned" for r in _tuned_records(fresh))


def test_damaged_launch_configurations_are_retuned_in_a_new_process(fresh):
    windows = {damage: 3 + i for i, damage in enumerate(CONFIG_DAMAGE)}
    for damage, window in windows.items():
        earlier = frozenset((fresh / "configs").glob("*.json"))
        run_windows([window], **TUNED)
        assert _damage_configs(fresh, damage, spare=earlier) == 2
    results = _results(_spawn(fresh, windows.values(), **TUNED))
    for damage, result in zip(windows, results):
        assert result["error"] < TOL and len(result["warnings"]) == 2, (damage, result)
    records = _tuned_records(fresh)
    assert len(records) == 2 * len(windows)
    assert all(r is not None and r["source"] == "tuned" for r in records)


# --- a cache directory that cannot be written ---------------------------------------------------

def test_an_unwritable_cache_directory_falls_back_to_a_temporary_one(tmp_path, monkeypatch):
    blocked = tmp_path / "a file" / "cache"  # cannot be created: its parent is a file
    blocked.parent.write_text("not a directory")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(blocked))
    monkeypatch.setattr(cache, "_UNWRITABLE", set(), raising=False)
    monkeypatch.setattr(cache, "_SCRATCH", [], raising=False)
    forget()
    results = run_windows([3, 4], **TUNED)
    warned = [w for r in results for w in r["warnings"]]
    assert len(warned) == 1 and "cannot write" in warned[0], warned  # once per process
    assert all(r["error"] < TOL and r["intact"] for r in results), results
    path = Path(attnc.compile(SPEC, window=3, **TUNED).path)
    assert path.is_file() and path.is_relative_to(cache._SCRATCH[0])
    assert len(_tuned_records(cache._SCRATCH[0])) == 4

    results = _results(_spawn(blocked, [3, 4], **TUNED))
    warned = [w for r in results for w in r["warnings"]]
    assert len(warned) == 1 and "cannot write" in warned[0], warned
    assert all(r["error"] < TOL for r in results), results
    forget()


# --- `attnc cache clear` while kernels compile --------------------------------------------------

def test_a_kernel_runs_when_its_file_vanishes_before_import(fresh):
    kernel = attnc.compile(SPEC, window=5)  # generated and written, imported at the first call
    assert cache.clear() == 2
    assert error(kernel, 5) < TOL
    assert Path(kernel.path).is_file()  # a tool asking for the file gets it back
    assert cache.read_kernel(kernel.key) == (kernel.source, dict(kernel.generated.names))


def test_a_cached_kernel_runs_what_it_checked_when_the_file_changes_before_import(fresh):
    attnc.compile(SPEC, window=5)
    forget()
    kernel = attnc.compile(SPEC, window=5)
    assert kernel.cache_hit
    cache.kernel_path(kernel.key).write_text("raise RuntimeError('replaced after the check')\n")
    assert error(kernel, 5) < TOL


def test_a_write_survives_a_clear_that_removes_its_temporary_file(fresh, monkeypatch):
    real, cleared = os.replace, []

    def clear_then_replace(src, dst):
        if not cleared:
            cleared.append(cache.clear())  # removes the temporary file about to be renamed
        return real(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", clear_then_replace)
        kernel = attnc.compile(SPEC, window=5)
    assert cleared == [1]
    assert cache.read_kernel(kernel.key) == (kernel.source, dict(kernel.generated.names))


def test_clear_in_a_loop_while_processes_compile(fresh):
    stop, removed = threading.Event(), []

    def clear_until_stopped():
        while not stop.is_set():
            removed.append(cache.clear())
            time.sleep(0.005)

    clearer = threading.Thread(target=clear_until_stopped)
    clearer.start()
    procs = [_spawn(fresh, [3 + 2 * i, 4 + 2 * i]) for i in range(4)]
    try:
        results = [r for p in procs for r in _results(p, timeout=120)]
    finally:
        stop.set()
        clearer.join()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sum(removed) > 0  # the clears did remove files under the writers
    assert len(results) == 8 and all(r["error"] < TOL for r in results), results


# --- files left by writers that died ------------------------------------------------------------

def test_info_and_clear_handle_files_left_by_interrupted_writers(fresh, capsys):
    kernel = attnc.compile(SPEC, window=5)
    (fresh / "kernels" / f"{kernel.key}.py.k3x9q.tmp").write_text("def half_a_kern")
    (fresh / "configs").mkdir()
    (fresh / "configs" / f"{'0' * 64}.json.p2r8.tmp").write_text('{"BLOCK_M": 1')
    info = cache.info()
    assert (info["kernels"], info["configs"], info["temporary"]) == (1, 0, 2)
    assert cli.main(["cache", "info"]) == 0
    assert "temporary files: 2" in capsys.readouterr().out
    assert cache.clear() == 4
    assert cache.info() == {"path": str(fresh), "kernels": 0, "configs": 0, "temporary": 0,
                            "bytes": 0}
    forget()
    (result,) = run_windows([5])
    assert result["error"] < TOL and result["warnings"] == [] and result["intact"]
