"""Generated kernels compile for a real GPU target (sm_90, Hopper) without a GPU, as launched.

The interpreter runs kernels as numpy code and accepts things the compiler rejects; lowering to a
cubin catches those, and each kernel's shared memory is checked against Hopper's limit. The jobs
come from the launchers themselves (backends/triton/aot_jobs.py records their launches on meta
tensors): each kernel compiles with the configuration, warps, stages and integer and pointer
specialization it would get on a GPU at the shape given. Each library variant is compiled for
bf16 and the fp32/IEEE path once, forward and backward kernels alike (linear blocks: recurrent
and chunked kernels, and the backward's core kernels), in a subprocess with the interpreter
switched off. With ATTNC_AOT_PYTHON pointing at another Python (e.g. a venv holding Triton
3.6), the same jobs run against that Triton. The slow target test reads the library's
`attnc inspect` report against issue 16's targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import attnc
from attnc import inspect
from attnc.backends.triton import aot_check, aot_jobs
from attnc.backends.triton.aot_jobs import Shape
from tests.test_linear import MIXED

FP32 = Shape(dtype=torch.float32, D=64)


def _run(jobs, tmp_path, python=sys.executable):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([python, aot_check.__file__, str(path)], capture_output=True,
                          text=True, env=env, timeout=1800)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, results


def _check(jobs, tmp_path):
    python = os.environ.get("ATTNC_AOT_PYTHON", sys.executable)
    proc, results = _run(jobs, tmp_path, python)
    assert len(results) == len(jobs), proc.stderr[-3000:]
    failures = [(j["kernel"], r) for j, r in zip(jobs, results) if not r["ok"]]
    assert not failures, failures
    assert proc.returncode == 0
    # an H100/H200 block gets at most 227 KiB of shared memory; more fails at launch
    assert [r for r in results if r["shared_bytes"] > 227 * 1024] == []
    # what compiled is what the launch asked for
    assert [(r["num_warps"], r["num_stages"]) for j, r in zip(jobs, results)
            if j["options"]] == [(j["options"]["num_warps"], j["options"]["num_stages"])
                                 for j in jobs if j["options"]]


def _no_core(jobs):
    """Without the linear backward's core kernels (compiled once, by the slow test)."""
    return [j for j in jobs if not j["function"].startswith("core_")]


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
    param gather (rel_bias, its dq over slabs of query tiles), the fp32 IEEE path (alibi), a
    block-sparse kernel (document's lists) and a kernel traced from Python mods. Backward
    kernels compile slowly (the fp32 IEEE dk/dv kernel alone takes a minute), so here only two
    get theirs: a per-tile param gradient (rel_bias) and the block-sparse walk; the slow test
    compiles every backward."""
    jobs = [j for name in ("streaming", "document") for j in
            aot_jobs.kernel_jobs(attnc.load(name), backward=False)]
    jobs += aot_jobs.kernel_jobs(attnc.load("rel_bias"))
    jobs += aot_jobs.kernel_jobs(attnc.load("alibi"), FP32, backward=False)
    jobs += aot_jobs.kernel_jobs(attnc.load("document", block_sparse=True))
    jobs += aot_jobs.kernel_jobs(_traced_kernel(), Shape(B=2, H=4, N=64, D=64),
                                 backward=False)
    assert sum("_bwd_dkdv" in j["function"] for j in jobs) == 2
    assert [j["constexprs"]["IEEE"] for j in jobs if "alibi" in j["function"]] == [True]
    _check(jobs, tmp_path)


def test_representative_linear_kernels_compile_for_sm90(tmp_path):
    """A diagonal decay (gla, also fp32 IEEE with varlen and ragged head dims), the WY/UT
    delta-rule chunk (gated_delta_net), a vector normalizer state (linear_attn), a sum over j
    (lightning), scalar states and coupled updates (flowformer's recurrent kernel and its
    generated backward, and a nonlinear update's) and wide keys (based: a Taylor map of head
    dim 16 has 273 features)."""
    jobs = [j for name in ("gla", "gated_delta_net", "linear_attn", "lightning", "flowformer")
            for j in _no_core(aot_jobs.kernel_jobs(attnc.load(name)))]
    jobs += _no_core(aot_jobs.kernel_jobs(attnc.load("gla"),
                                          Shape(dtype=torch.float32, D=64, Dv=96, varlen=True)))
    jobs += _no_core(aot_jobs.kernel_jobs(attnc.load("based"), Shape(D=16, Dv=64)))
    jobs += aot_jobs.kernel_jobs(attnc.compile(MIXED), Shape(dtype=torch.float32, varlen=True))
    assert sum(j["function"].endswith("_chunked") for j in jobs) == 6
    assert sum(j["function"].endswith("_recurrent_bwd") for j in jobs) == 2  # generated VJPs
    assert {j["constexprs"]["BK"] for j in jobs if j["function"] == "based_chunked"} == {512}
    # the backward's fixed core kernels: the gated delta rule's and the vector decay's
    jobs += [j for name in ("gated_delta_net", "gla")
             for j in aot_jobs.kernel_jobs(attnc.load(name))
             if j["function"] == "core_backward"]
    _check(jobs, tmp_path)


def test_representative_stage_kernels_compile_for_sm90(tmp_path):
    """General cascades' stage kernels: scans in both walking orders, their carries stored per
    key tile and resumed in key-parallel kernels (stick-breaking, forward and backward), a
    multi-pass schedule walking both ranks (Sinkhorn), per-group stabilized sums with a param
    (grouped) and the fp32 IEEE path (standardized's running sums)."""
    jobs = aot_jobs.kernel_jobs(attnc.load("stick_breaking"))
    jobs += aot_jobs.kernel_jobs(attnc.load("sinkhorn", iters=1), backward=False)
    jobs += aot_jobs.kernel_jobs(attnc.load("grouped"), backward=False)
    jobs += aot_jobs.kernel_jobs(attnc.load("standardized"), FP32, backward=False)
    assert [j["function"] for j in jobs[:5]] == ["attnc_stick_breaking_k1"] + [
        f"attnc_stick_breaking_b{i}" for i in range(1, 5)]
    _check(jobs, tmp_path)


def _variants(linear: bool) -> list[str]:
    return [n for n in attnc.variants() if (_family(n) == "linear") == linear]


@pytest.mark.slow
def test_every_library_kernel_compiles_for_sm90(tmp_path):
    """Every library kernel, at bf16 D 128 (softmax families and cascades), bf16 and fp16 at
    head dims 64 and 128 (linear blocks and their core kernels), and the fp32 IEEE paths."""
    jobs = [j for name in _variants(False) for j in aot_jobs.kernel_jobs(attnc.load(name))]
    jobs += [j for name in _variants(True) for d in (64, 128)
             for dtype in (torch.bfloat16, torch.float16)
             for j in aot_jobs.kernel_jobs(attnc.load(name), Shape(D=d, dtype=dtype))]
    jobs += [j for name in ("gla", "gated_delta_net", "retnet") for j in
             aot_jobs.kernel_jobs(attnc.load(name), Shape(dtype=torch.float32, D=64, Dv=96))]
    jobs += aot_jobs.kernel_jobs(attnc.load("rel_bias"), Shape(dtype=torch.float16, D=256))
    jobs += aot_jobs.kernel_jobs(attnc.load("alibi"), FP32)
    _check(jobs, tmp_path)


# Issue 16's targets for the library at sm_90, D = 128, bf16, N = 4096, default configurations.
FORWARD_LOOP, DQ_LOOP, DKDV_LOOP = 400, 450, 540
SHARED_LIMIT = 227 * 1024
# Known misses at B4 H16 N4096 D128 bf16 (benchmarks/results/inspect-sm_90.md): (spec, kernel
# as the report labels it, target: "spills", "loop", "shared", "bf16 dots" or "compiles") ->
# why. An entry that no longer misses fails the test too, so the list stays true.
_CORE_BACKWARD = ("the chunked backward's core kernel keeps the state, its adjoint and the "
                  "chunk's [BT, BK] and [BT, BT] intermediates of a value tile live at once; "
                  "fla splits this into several kernels")
_DELTA_CORE = ("delta-rule core kernels form the WY/UT inverse per value tile; fla computes w "
               "and u once per chunk in a kernel of their own")
_SOLVE = ("the blockwise WY/UT inverse keeps tf32 products: in bf16 the error on correlated "
          "keys rose from 0.65-0.96% to 0.85-1.26%")
_BASED = ("BASED's feature map gives 273 key features, padded to a 512-wide tile")
_ROPE_TILES = ("a key-side rope recomputes its cos/sin table (a range reduction and two "
               "polynomials per feature pair) and reloads the partner features for every "
               "(query tile, key tile) pair; a pre-rotated K or split half dots would avoid it")
_AROUND_DKDV = ("the around backward (backward_around.py) keeps the prologue's tables and the "
                "raw tiles beside both accumulators and lacks the plain dk/dv kernel's k.q^T "
                "orientation and scale-after-loop rewrites")
_L2NORM_ROWS = ("l2norm recomputes each tile's row norms and, in the backward, keeps the "
                "normalized tile and the gain vector live for its VJP")
_GATHER = ("gathered keys run on CUDA cores: one query row per program gathers K/V rows by "
           "index, and the product is a broadcast multiply and a row sum (no tensor cores for "
           "lists not shared by 16 heads); the dk/dv side walks one key per program")
KNOWN_MISSES: dict[tuple[str, str, str], str] = {
    ("alibi", "forward", "loop"):
        "the bias slopes[h] * (n - m) costs an integer subtract, a convert and a multiply per "
        "score; splitting it into row and column vectors is not done",
    ("based", "chunked", "spills"): _BASED,
    ("based", "core_forward (g0)", "spills"): _BASED,
    ("based", "core_backward (g0)", "spills"): _BASED,
    ("delta_net", "chunked", "bf16 dots"): _SOLVE,
    ("delta_net", "recurrent", "spills"):
        "8 bytes: the delta rule's readout and write of a 128 x 64 state per step",
    ("delta_net", "core_forward (g0-delta)", "spills"): _DELTA_CORE,
    ("delta_net", "core_backward (g0-delta)", "spills"): _DELTA_CORE,
    ("document", "forward", "loop"):
        "document ids are loaded per key and compared per score (ISETP and FSEL per element)",
    ("document", "dkdv", "spills"):
        "8 bytes: the document ids of both tiles next to the two accumulators",
    ("flowformer", "recurrent_bwd", "spills"):
        "the generated recurrent backward holds coupled 128 x 128 states and their adjoints in"
        " one program",
    ("gated_delta_net", "chunked", "bf16 dots"): _SOLVE,
    ("gated_delta_net", "core_forward (g1-delta)", "spills"): _DELTA_CORE,
    ("gated_delta_net", "core_backward (g1-delta)", "spills"): _DELTA_CORE,
    ("gated_heads", "dkdv", "spills"): _AROUND_DKDV,
    ("gated_heads", "dkdv", "loop"): _AROUND_DKDV,
    ("gla", "recurrent", "spills"):
        "12 bytes: the vector gate's exp per key feature next to a 128 x 64 state",
    ("hedgehog", "chunked", "spills"):
        "16 bytes: the feature map's softmax is recomputed in the kernel",
    ("lightning", "chunked", "spills"):
        "its output sums over all value features, so one program holds a 128 x 128 state",
    ("lightning", "core_backward (g1)", "spills"): _CORE_BACKWARD,
    ("linear_attn", "recurrent", "spills"):
        "20 bytes: a matrix and a normalizer state, both read and written per step",
    ("linear_attn", "core_backward (g0)", "spills"): _CORE_BACKWARD,
    ("mamba2_ssd", "core_backward (g1)", "spills"): _CORE_BACKWARD,
    ("mla", "forward", "loop"): _ROPE_TILES,
    ("mla", "dq", "loop"): _ROPE_TILES,
    ("mla", "dkdv", "spills"): _AROUND_DKDV,
    ("mla", "dkdv", "loop"): _AROUND_DKDV,
    ("nsa_selected", "forward", "loop"):
        "every listed block is a partial block: the lists carry no full-block fast path, so "
        "each tile evaluates the causal mask",
    ("qk_norm", "forward", "loop"): _ROPE_TILES,
    ("qk_norm", "dq", "spills"): _L2NORM_ROWS,
    ("qk_norm", "dq", "loop"): _L2NORM_ROWS,
    ("qk_norm", "dkdv", "spills"): _AROUND_DKDV,
    ("qk_norm", "dkdv", "loop"): _AROUND_DKDV,
    ("rel_bias", "forward", "spills"):
        "the bucketed relative bias is computed and gathered per score (a log, a clamp and a "
        "load per element)",
    ("rel_bias", "forward", "loop"):
        "the bucketed relative bias is computed and gathered per score (a log, a clamp and a "
        "load per element)",
    ("rel_bias", "dkdv", "spills"):
        "8 bytes: the gathered bias next to the two accumulators",
    ("retnet", "core_backward (g1)", "spills"): _CORE_BACKWARD,
    ("rope", "forward", "loop"): _ROPE_TILES,
    ("rope", "dq", "loop"): _ROPE_TILES,
    ("rope", "dkdv", "spills"): _AROUND_DKDV,
    ("rope", "dkdv", "loop"): _AROUND_DKDV,
    ("simple_gla", "core_backward (g1)", "spills"): _CORE_BACKWARD,
    ("softcap", "forward", "loop"):
        "tanh from exp2, a reciprocal and a series near 0 (attnc/expr/functions.py) per score",
    ("softcap", "dq", "loop"):
        "tanh and its derivative 1 - tanh^2 per score",
    ("softcap", "dkdv", "loop"):
        "tanh and its derivative 1 - tanh^2 per score",
    ("streaming", "dkdv", "spills"):
        "8 bytes: the sink and window bounds of both tiles next to the two accumulators",
    ("token_topk", "forward", "loop"): _GATHER,
    ("token_topk", "dq", "spills"): _GATHER,
    ("token_topk", "dq", "loop"): _GATHER,
    ("token_topk", "dkdv", "loop"): _GATHER,
    ("zerotuning", "forward", "loop"):
        "the per-head gamma on the first key's weight is a where per score",
}


def _family(name: str) -> str:
    kernel = attnc.load(name)
    return "linear" if isinstance(kernel, attnc.LinearKernel) else \
        "cascade" if isinstance(kernel, attnc.CascadeKernel) else "softmax"


def _misses(row: dict, family: str) -> list[str]:
    """The targets a report row misses: spills and loop lengths for softmax kernels, spills
    and bf16 tensor cores for linear ones, shared memory for every kernel."""
    if not row["ok"]:
        return ["compiles"]
    found = []
    if family != "cascade" and (row["spill_bytes"]["store"] or row["spill_bytes"]["load"]):
        found.append("spills")
    if not row["fits"] or row["shared_bytes"] > SHARED_LIMIT:
        found.append("shared")
    limit = {"forward": FORWARD_LOOP, "dq": DQ_LOOP, "dkdv": DKDV_LOOP}.get(
        row["kernel"].split(" ")[0])
    if family == "softmax" and limit is not None and row["loop_instructions"] > limit:
        found.append("loop")
    if family == "linear" and row["mma"]["count"] and row["mma"]["types"] != ["bf16"]:
        found.append("bf16 dots")
    return found


@pytest.mark.slow
def test_library_meets_the_targets():
    """Zero spills in every softmax and linear kernel; softmax forward key loop <= 400 SASS
    instructions per thread, dq <= 450, dk/dv <= 540; every linear dot on bf16 tensor cores;
    every kernel within 227 KiB of shared memory; except the known misses, each with its
    reason."""
    rows = inspect.library(workers=2)
    families = {name: _family(name) for name in attnc.variants()}
    missed = {(r["spec"], r["kernel"], what): r for r in rows
              for what in _misses(r, families[r["spec"]])}
    unexplained = sorted(set(missed) - set(KNOWN_MISSES))
    assert not unexplained, [(key, missed[key].get("loop_instructions"),
                              missed[key].get("spill_bytes"), missed[key].get("mma"))
                             for key in unexplained]
    assert sorted(set(KNOWN_MISSES) - set(missed)) == []  # fixed: drop them from the list


def test_a_broken_kernel_is_reported(tmp_path):
    """The check can fail: a source with a type error does not compile."""
    job = aot_jobs.kernel_jobs(attnc.load("causal"), backward=False)[0]
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

    jobs = [j for j in aot_jobs.kernel_jobs(spec("min_of_where"))
            if j["kernel"] != "forward"]
    jobs += aot_jobs.kernel_jobs(spec("power_by_head"), backward=False)
    jobs += aot_jobs.kernel_jobs(attnc.compile("attention never {\n  mask = n < 0\n}\n",
                                               block_sparse=True), backward=False)
    for text in (RESET, STEPPED, KINKED_SCAN):
        jobs += _no_core(aot_jobs.kernel_jobs(attnc.compile(text), Shape(D=64)))
    assert sum(j["function"].endswith("_recurrent_bwd") for j in jobs) == 2
    assert sum(j["function"].endswith("_chunked") for j in jobs) == 1
    _check(jobs, tmp_path)
