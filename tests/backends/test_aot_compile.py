"""Generated kernels compile for a real GPU target (sm_90, Hopper) without a GPU.

The interpreter runs kernels as numpy code and accepts things the compiler rejects; lowering to a
cubin catches those, and each kernel's shared memory is checked against Hopper's limit. Each
library variant is compiled once for bf16 and the fp32/IEEE path once, forward and backward
kernels alike (linear blocks: recurrent and chunked kernels, and the backward's core kernels),
in a subprocess with the interpreter switched off. With ATTNC_AOT_PYTHON pointing at another
Python (e.g. a venv holding Triton 3.6), the same jobs run against that Triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import attnc
from attnc.backends.triton import aot_check, aot_jobs
from tests.test_linear import MIXED


def _run(jobs, tmp_path, python=sys.executable):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([python, aot_check.__file__, str(path)], capture_output=True,
                          text=True, env=env, timeout=900)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, results


def _check(jobs, tmp_path):
    python = os.environ.get("ATTNC_AOT_PYTHON", sys.executable)
    proc, results = _run(jobs, tmp_path, python)
    assert len(results) == len(jobs), proc.stderr[-3000:]
    failures = [r for r in results if not r["ok"]]
    assert not failures, failures
    assert proc.returncode == 0
    # an H100/H200 block gets at most 227 KiB of shared memory; more fails at launch
    assert [r for r in results if r["shared_bytes"] > 227 * 1024] == []


def _traced_kernel():
    """A kernel from FlexAttention mods: tan of an integer index, exp2, a captured tensor."""
    from attnc.expr import symbols as S
    from attnc.flex import kernel_for, trace_spec
    offset = torch.rand(4)

    def trig(score, b, h, q_idx, kv_idx):
        return torch.sin(score) + torch.tan(b) + torch.exp2(-(h + 1.0)) * offset[h]

    spec, _ = trace_spec(trig, None, {S.B: 2, S.H: 4, S.M: 64, S.N: 64})
    return kernel_for(spec)


def test_representative_kernels_compile_for_sm90(tmp_path):
    """Two key segments (streaming), per-row and per-key input loads (document), a per-tile
    param gather (rel_bias), the fp32 IEEE path (alibi), a block-sparse kernel (document's
    lists) and a kernel traced from Python mods. Backward kernels compile slowly (the fp32 IEEE
    dk/dv kernel alone takes a minute), so here only two get theirs: a per-tile param gradient
    (rel_bias) and the block-sparse walk; the slow test compiles every backward."""
    jobs = [j for name in ("streaming", "document") for j in
            aot_jobs.jobs_for(attnc.load(name), backward=False)]
    jobs += aot_jobs.jobs_for(attnc.load("rel_bias"))
    jobs += aot_jobs.jobs_for(attnc.load("alibi"), dtype="fp32", block_m=64, block_n=32,
                               ieee=True, backward=False)
    jobs += aot_jobs.jobs_for(attnc.load("document", block_sparse=True))
    jobs += aot_jobs.jobs_for(_traced_kernel(), backward=False)
    assert sum("_bwd_dkdv" in j["function"] for j in jobs) == 2
    _check(jobs, tmp_path)


def test_representative_linear_kernels_compile_for_sm90(tmp_path):
    """A diagonal decay (gla, also fp32 IEEE with varlen and ragged head dims), the WY/UT
    delta-rule chunk (gated_delta_net), a vector normalizer state (linear_attn), a sum over j
    (lightning), scalar states and coupled updates (flowformer's recurrent kernel and its
    generated backward, and a nonlinear update's) and wide keys (based: a Taylor map of head
    dim 16 has 273 features)."""
    jobs = [j for name in ("gla", "gated_delta_net", "linear_attn", "lightning", "flowformer")
            for j in aot_jobs.linear_jobs_for(attnc.load(name))]
    jobs += aot_jobs.linear_jobs_for(attnc.load("gla"), dtype="fp32", ieee=True, varlen=True,
                                      dk=64, dv=96)
    jobs += aot_jobs.linear_jobs_for(attnc.load("based"), dk=273, dv=64)
    jobs += aot_jobs.linear_jobs_for(attnc.compile(MIXED), dtype="fp32", ieee=True, varlen=True)
    assert sum(j["function"].endswith("_chunked") for j in jobs) == 6
    assert sum(j["function"].endswith("_recurrent_bwd") for j in jobs) == 2  # generated VJPs
    # the backward's fixed core kernels: the gated delta rule's and the vector decay's
    core = aot_jobs.core_jobs()
    jobs += [j for j in core if j["function"] == "core_backward"
             and (j["constexprs"]["DELTA"] and j["constexprs"]["GATE"] == 1
                  or j["constexprs"]["GATE"] == 2)]
    _check(jobs, tmp_path)


def test_representative_stage_kernels_compile_for_sm90(tmp_path):
    """General cascades' stage kernels: scans in both walking orders, their carries stored per
    key tile and resumed in key-parallel kernels (stick-breaking, forward and backward), a
    multi-pass schedule walking both ranks (Sinkhorn), per-group stabilized sums with a param
    (grouped) and the fp32 IEEE path (standardized's running sums)."""
    jobs = aot_jobs.cascade_jobs_for(attnc.load("stick_breaking"))
    jobs += aot_jobs.cascade_jobs_for(attnc.load("sinkhorn", iters=1), backward=False)
    jobs += aot_jobs.cascade_jobs_for(attnc.load("grouped"), backward=False)
    jobs += aot_jobs.cascade_jobs_for(attnc.load("standardized"), dtype="fp32", ieee=True,
                                      block_p=32, block_l=32, block_d=64, backward=False)
    assert [j["function"] for j in jobs[:5]] == ["attnc_stick_breaking_k1"] + [
        f"attnc_stick_breaking_b{i}" for i in range(1, 5)]
    _check(jobs, tmp_path)


def _is_linear(name: str) -> bool:
    return isinstance(attnc.load(name), attnc.LinearKernel)


def _softmax_family_jobs(name: str, **kw) -> list[dict]:
    kernel = attnc.load(name)
    if isinstance(kernel, attnc.CascadeKernel):
        return aot_jobs.cascade_jobs_for(kernel, **kw)
    return aot_jobs.jobs_for(kernel, **kw)


@pytest.mark.slow
def test_every_library_kernel_compiles_for_sm90(tmp_path):
    jobs = [j for name in attnc.variants() if not _is_linear(name)
            for j in _softmax_family_jobs(name)]
    jobs += [j for name in attnc.variants() if _is_linear(name)
             for dk, dv in ((64, 64), (128, 128)) for dtype in ("bf16", "fp16")
             for j in aot_jobs.linear_jobs_for(attnc.load(name), dtype=dtype, dk=dk, dv=dv)]
    jobs += aot_jobs.core_jobs() + aot_jobs.core_jobs(ieee=True, dk=64, dv=96)
    jobs += aot_jobs.jobs_for(attnc.load("rel_bias"), dtype="fp16", block_d=256, block_m=64,
                               block_n=32)
    jobs += aot_jobs.jobs_for(attnc.load("alibi"), dtype="fp32", block_m=64, block_n=32,
                               ieee=True)
    _check(jobs, tmp_path)


def test_a_broken_kernel_is_reported(tmp_path):
    """The check can fail: a source with a type error does not compile."""
    job = aot_jobs.jobs_for(attnc.load("causal"))[0]
    broken = tmp_path / "broken.py"
    broken.write_text(open(job["path"]).read().replace("acc = tl.zeros([BLOCK_M, BLOCK_DV]",
                                                        "acc = tl.zeros([BLOCK_M, 3]"))
    job["path"] = str(broken)
    proc, results = _run([job], tmp_path)
    assert proc.returncode == 1 and not results[0]["ok"]


def test_kinks_nestings_and_integer_positions_compile_for_sm90(tmp_path):
    """Generated code the interpreter alone would let through: a where under min, whose
    backward reads sympy's ITE and the 1/2 of a tie (== branches); a power by the head index
    (_ipow); a block-sparse mask that is False; linear kernels reading t and h as integers
    (t % 4, h % 2, sqrt(t + 1)), chunked and recurrent, and a generated scan backward through
    max, relu, abs and clamp."""
    from tests.test_kinks import KINKED_SCAN, NESTINGS
    from tests.test_linear_positions import RESET, STEPPED

    def spec(name):
        score, mask, *_ = NESTINGS[name]
        return attnc.compile(f"attention {name} {{\n  param p[h]\n  score = {score}\n"
                             + (f"  mask = {mask}\n" if mask else "") + "}\n")

    jobs = aot_jobs.jobs_for(spec("min_of_where"))[2:]  # preprocess, dq, dk/dv
    jobs += aot_jobs.jobs_for(spec("power_by_head"), backward=False)[:1]
    jobs += aot_jobs.jobs_for(attnc.compile("attention never {\n  mask = n < 0\n}\n",
                                            block_sparse=True), backward=False)[:1]
    for text in (RESET, STEPPED, KINKED_SCAN):
        jobs += aot_jobs.linear_jobs_for(attnc.compile(text), dk=64, dv=64)
    assert sum(j["function"].endswith("_recurrent_bwd") for j in jobs) == 2
    assert sum(j["function"].endswith("_chunked") for j in jobs) == 1
    _check(jobs, tmp_path)
