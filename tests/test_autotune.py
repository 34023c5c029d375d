"""The autotuner: candidate pruning, choosing and dropping candidates, persistence across
processes, launch options the user fixed, and the kernels it tunes (results never change)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import attnc
from attnc import autotune
from attnc.backends.triton.softmax.launch import (backward_config, backward_overrides,
                                                  default_config, role_configs)
from attnc.testing import random_linear_inputs, rel_error

H100_SHARED = 227 * 1024
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _grids(kind):
    return {kernel: autotune.GRIDS[(kernel, "low")] for kernel in autotune.KERNELS[kind]}


def _parts(kind, cfg):
    """A candidate's per-kernel configs (a backward one holds the dk/dv and the dq kernel's)."""
    if kind == "forward":
        return {"forward": cfg}
    return role_configs(cfg)


@pytest.mark.parametrize("kind", ["forward", "backward"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_candidates_fit_shared_memory_registers_and_warps(kind, D):
    default = DEFAULT if kind == "forward" else backward_overrides(DEFAULT)
    cands = autotune.prune(kind, default, _grids(kind), D, D, torch.bfloat16, H100_SHARED, {})
    assert cands[0] == default and len(cands) >= 2
    for cfg in cands[1:]:
        for kernel, part in _parts(kind, cfg).items():
            assert autotune.SHARED_MEMORY[kernel](part, D, D, 2) <= H100_SHARED
            rows = part["BLOCK_N"] if kernel == "dkdv" else part["BLOCK_M"]
            assert rows >= 16 * part["num_warps"]  # no warp repeats another's rows
            if D <= 128:  # at 256, 16 rows per warp already exceed the budget: timing decides
                assert rows * 2 * D <= autotune.REGISTERS_PER_THREAD * 32 * part["num_warps"]
    assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)


def test_backward_candidates_tune_each_kernel_apart():
    cands = autotune.prune("backward", backward_overrides(DEFAULT), _grids("backward"), 128, 128,
                           torch.bfloat16, H100_SHARED, {})
    roles = [role_configs(c) for c in cands[1:]]
    # asymmetric tiles: the dk/dv kernel's 128 keys against 32 queries, the dq kernel's 128
    # queries against 32 keys, on two warpgroups; three stages; the two kernels differ
    assert {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3} in [
        r["dkdv"] for r in roles]
    assert {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3} in [
        r["dq"] for r in roles]
    assert any(r["dq"] != r["dkdv"] for r in roles)
    # a 64-row tile never gets 8 warps (both warpgroups would compute the same rows)
    assert not any(r["dkdv"]["BLOCK_N"] == 64 and r["dkdv"]["num_warps"] == 8 for r in roles)
    # options the user fixed apply to both kernels
    fixed = backward_overrides({"BLOCK_M": 64, "num_stages": 2})
    kept = autotune.prune("backward", backward_overrides(DEFAULT), _grids("backward"), 128, 128,
                          torch.bfloat16, H100_SHARED, fixed)
    assert len(kept) > 1
    for cfg in kept[1:]:
        for part in role_configs(cfg).values():
            assert part["BLOCK_M"] == 64 and part["num_stages"] == 2


def test_backward_default_splits_no_tile_across_warpgroups():
    gpu = torch.device("cuda")
    for D, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (256, torch.float16),
                     (128, torch.float32)):
        roles = role_configs(backward_config(default_config(D, D, dtype, gpu), dtype, gpu))
        for kernel, cfg in roles.items():
            rows = cfg["BLOCK_N"] if kernel == "dkdv" else cfg["BLOCK_M"]
            assert rows >= 16 * cfg["num_warps"], (D, dtype, kernel, cfg)
    roles = role_configs(backward_config(default_config(128, 128, torch.bfloat16, gpu),
                                         torch.bfloat16, gpu))
    assert roles == {"dkdv": {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
                     "dq": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}}


def test_wide_heads_prune_more():
    grid = _grids("forward")
    counts = [len(autotune.prune("forward", DEFAULT, grid, D, D, torch.bfloat16, H100_SHARED,
                                 {})) for D in (64, 128, 256)]
    assert counts[0] > counts[1] > counts[2]
    # the largest tiles with the most stages do not fit at D = 256
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4}
    assert big not in autotune.prune("forward", DEFAULT, grid, 256, 256, torch.bfloat16,
                                     H100_SHARED, {})
    # a smaller device limit prunes further
    assert len(autotune.prune("forward", DEFAULT, grid, 128, 128, torch.bfloat16, 99 * 1024,
                              {})) < counts[1]


def test_fixed_options_restrict_candidates():
    grid = _grids("forward")
    cands = autotune.prune("forward", DEFAULT, grid, 64, 64, torch.float16, H100_SHARED,
                           {"num_warps": 8, "BLOCK_M": 128})
    assert all(c["num_warps"] == 8 and c["BLOCK_M"] == 128 for c in cands[1:])


def test_linear_candidates_respect_widths_and_registers():
    cands = autotune.linear_candidates("chunked", {"BV": 64, "num_warps": 4, "num_stages": 3},
                                       (16, 32), 128, 2, 32, torch.bfloat16, torch.device("cpu"))
    assert {c["BV"] for c in cands[1:]} == {16, 32}
    for cfg in cands[1:]:
        assert 2 * 128 * cfg["BV"] <= autotune.REGISTERS_PER_THREAD * 32 * cfg["num_warps"]


def _outputs(value):
    return (torch.full((4,), float(value)),)


def test_tune_picks_the_fastest_and_drops_wrong_or_failing_candidates():
    configs = [{"id": 0}, {"id": 1}, {"id": 2}, {"id": 3}]
    delay = {0: 0.03, 1: 0.001, 2: 0.0, 3: 0.0}

    def run(cfg):
        if cfg["id"] == 3:
            raise RuntimeError("out of resources: shared memory")
        time.sleep(delay[cfg["id"]])
        return _outputs(2.0 if cfg["id"] == 2 else 1.0)  # id 2 computes something else
    with pytest.warns(RuntimeWarning, match="different from the default"):
        result = autotune.tune(run, configs, torch.device("cpu"), torch.float32)
    assert result.best == {"id": 1}
    notes = {t.config["id"]: t.note for t in result.trials}
    assert notes[2].startswith("differs") and "out of resources" in notes[3]
    assert [t.ms is None for t in result.trials] == [False, False, True, True]


def test_tune_raises_when_the_default_fails():
    def run(cfg):
        raise RuntimeError("broken")
    with pytest.raises(RuntimeError, match="broken"):
        autotune.tune(run, [{"id": 0}, {"id": 1}], torch.device("cpu"), torch.float32)


def test_enabled_follows_option_then_environment(monkeypatch):
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    assert autotune.enabled(None) and not autotune.enabled(False)
    monkeypatch.setenv("ATTNC_AUTOTUNE", "0")
    assert not autotune.enabled(None) and autotune.enabled(True)


ALIBI = ("attention alibi_tune {\n  param slopes[h]\n"
         "  score = dot(q, k) * scale + slopes[h] * (n - m)\n  mask = n <= m\n}\n")


def _attention_operands(M=37, N=41):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, M, 16, generator=g).requires_grad_()
    k = torch.randn(1, 1, N, 16, generator=g).requires_grad_()
    v = torch.randn(1, 1, N, 16, generator=g).requires_grad_()
    slopes = torch.rand(2, generator=g).requires_grad_()
    return q, k, v, slopes


def _records(tmp_path):
    return [json.loads(p.read_text()) for p in (tmp_path / "configs").glob("*.json")]


def test_tuned_kernel_matches_the_untuned_one_forward_and_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    q, k, v, slopes = _attention_operands()
    results = []
    for tune in (False, True):
        out = attnc.compile(ALIBI, autotune=tune)(q, k, v, slopes=slopes)
        grads = torch.autograd.grad(out.sum(), (q, k, v, slopes))
        results.append((out, *grads))
    for a, b in zip(*results):
        assert rel_error(a, b) < 1e-5
    records = sorted(_records(tmp_path), key=lambda r: r["kind"])
    assert [(r["kind"], r["source"]) for r in records] == [("backward-m64", "tuned"),
                                                           ("forward-m64", "tuned")]
    for r in records:
        timed = [t for t in r["trials"] if t["ms"] is not None]
        assert len(timed) == 4 and r["shape"] == [1, 2, 37, 16, 1, 41, 16]
        best = min(timed, key=lambda t: t["ms"])["config"]
        assert {key: r[key] for key in best} == best


CHILD = textwrap.dedent("""
    import sys, torch
    import attnc
    from attnc import autotune
    def forbidden(*a, **k):
        raise SystemExit("tuned again in a new process")
    autotune.tune = forbidden
    kernel = attnc.compile(sys.argv[1], autotune=True)
    q = torch.randn(1, 2, 37, 16)
    k = torch.randn(1, 1, 41, 16)
    kernel(q, k, k, slopes=torch.rand(2))
    print(kernel.launch_records[0]["source"])
""")


def test_a_new_process_reuses_the_tuned_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    q, k, v, slopes = _attention_operands()
    with torch.no_grad():
        attnc.compile(ALIBI, autotune=True)(q, k, v, slopes=slopes)
    done = subprocess.run([sys.executable, "-c", CHILD, ALIBI], capture_output=True, text=True,
                          env=dict(os.environ, ATTNC_CACHE_DIR=str(tmp_path)), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tuned"]


def test_fixed_launch_options_are_kept_while_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    q, k, v, slopes = _attention_operands()
    kernel = attnc.compile(ALIBI, autotune=True, block_m=16)
    with torch.no_grad():
        kernel(q, k, v, slopes=slopes)
    (record,) = kernel.launch_records
    assert record["BLOCK_M"] == 16
    assert all(t["config"]["BLOCK_M"] == 16 for t in record["trials"])
    assert len(record["trials"]) == 2


def test_short_queries_tune_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    _, k, v, slopes = _attention_operands()
    kernel = attnc.compile(ALIBI, autotune=True)
    with torch.no_grad():
        for M in (1, 3, 200):
            kernel(torch.randn(1, 2, M, 16), k, v, slopes=slopes)
    assert sorted(r["kind"] for r in kernel.launch_records) == ["forward-m128", "forward-m16"]
    with torch.no_grad():  # an empty call has nothing to tune on
        kernel(torch.randn(1, 2, 40, 16), k[:, :, :0], v[:, :, :0], slopes=slopes)
    assert [r["source"] for r in kernel.launch_records if r["kind"] == "forward-m64"] == [
        "default"]


def test_untuned_kernels_write_no_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTNC_AUTOTUNE", raising=False)
    q, k, v, slopes = _attention_operands()
    kernel = attnc.compile(ALIBI)
    with torch.no_grad():
        kernel(q, k, v, slopes=slopes)
    assert _records(tmp_path) == []
    assert kernel.launch_records[0]["source"] == "default"


def test_linear_kernel_tunes_its_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    plain = attnc.load("gla")
    tuned = attnc.load("gla", autotune=True)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 37, 32, generator=g) for _ in range(3))
    inputs = random_linear_inputs(plain, 1, 2, 37, 32, 32, generator=g)
    assert rel_error(tuned(q, k, v, **inputs), plain(q, k, v, **inputs)) < 1e-6
    (record,) = [r for r in tuned.launch_records if r["source"] == "tuned"]
    assert record["kind"] == "chunked-bt16"
    assert {t["config"]["BV"] for t in record["trials"]} == {16, 32}


@pytest.mark.parametrize("name", ["gla", "gated_delta_net"])
def test_linear_backward_tunes_its_core_kernels(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    plain = attnc.load(name)
    tuned = attnc.load(name, autotune=True)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 37, 32, generator=g).requires_grad_() for _ in range(3))
    inputs = random_linear_inputs(plain, 1, 2, 37, 32, 32, generator=g)
    dout = torch.randn(1, 2, 37, 32, generator=g)
    grads = [torch.autograd.grad(kernel(q, k, v, **inputs), (q, k, v), dout)
             for kernel in (plain, tuned)]
    for a, b in zip(*grads):
        assert rel_error(b, a) < 1e-5
    kinds = sorted(r["kind"] for r in tuned.launch_records if r["source"] == "tuned")
    gate = "diagonal_decay" if name == "gla" else "gated_delta_rule"
    chunk = 16 if name == "gla" else 32
    assert kinds == [f"chunked-bt{chunk}", f"core_backward-{gate}-bt{chunk}-ieee",
                     f"core_forward-{gate}-bt{chunk}-ieee"]
    for r in tuned.launch_records:
        assert len([t for t in r["trials"] if t["ms"] is not None]) >= 2
