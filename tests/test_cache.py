"""The disk cache: a hit in a new process generates no code, a changed spec misses, and
concurrent writers leave exactly one intact file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import attnc
from attnc import cache

SPEC = "attention cached {\n  option window = 5\n  mask = n <= m and m - n < window\n}\n"

# Compiles SPEC in a fresh process and prints whether the cache hit. With ATTNC_FORBID_CODEGEN
# set, the code generator is replaced by one that fails, proving a hit generates nothing.
CHILD = textwrap.dedent("""
    import os, sys
    import attnc.backends.triton.codegen as codegen
    if os.environ.get("ATTNC_FORBID_CODEGEN"):
        def forbidden(*a, **k):
            raise SystemExit("code generated on a cache hit")
        codegen.generate = forbidden
    import attnc
    options = {k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])}
    kernel = attnc.compile(sys.argv[1], **options)
    print("hit" if kernel.cache_hit else "miss", kernel.key)
""")


def _child(tmp_path, *args, forbid=False):
    env = dict(os.environ, ATTNC_CACHE_DIR=str(tmp_path))
    if forbid:
        env["ATTNC_FORBID_CODEGEN"] = "1"
    return subprocess.Popen([sys.executable, "-c", CHILD, SPEC, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out.split()


def test_second_process_hits_and_generates_no_code(tmp_path):
    first, key = _result(_child(tmp_path))
    assert first == "miss"
    second, key2 = _result(_child(tmp_path, forbid=True))
    assert (second, key2) == ("hit", key)


def test_changed_spec_or_option_misses(tmp_path):
    _, key = _result(_child(tmp_path))
    status, other = _result(_child(tmp_path, "window=6"))
    assert status == "miss" and other != key
    assert len(list((tmp_path / "kernels").glob("*.py"))) == 2


def test_concurrent_writers_leave_one_intact_file(tmp_path):
    procs = [_child(tmp_path) for _ in range(4)]
    keys = {_result(p)[1] for p in procs}
    assert len(keys) == 1
    files = sorted((tmp_path / "kernels").iterdir(), key=lambda f: f.suffix)
    # one source and its names, no temporary leftovers
    assert [f.name.split(".", 1)[1] for f in files] == ["names.json", "py"], files
    compile(files[1].read_text(), str(files[1]), "exec")


def test_info_clear_and_configs(tmp_path, monkeypatch):
    import torch
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    kernel = attnc.compile(SPEC, autotune=True)  # a tuned launch configuration is persisted
    kernel(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
    info = cache.info()
    assert info["path"] == str(tmp_path) and info["kernels"] == 1 and info["configs"] == 1
    assert info["bytes"] > 0
    assert cache.clear() == 3  # the kernel, its names, the config
    assert cache.info()["kernels"] == 0


def test_key_depends_on_tool_versions(monkeypatch, tmp_path):
    from attnc.pipeline import read_spec
    from attnc.runtime import compile_spec
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    base = cache.versions()
    assert set(base) == {"attnc", "codegen", "triton", "torch", "cache format"}
    a = compile_spec(read_spec(SPEC), {})
    monkeypatch.setattr(cache, "versions", lambda: {**base, "triton": "0.0"})
    b = compile_spec(read_spec(SPEC), {})
    assert a.key != b.key and not b.cache_hit
