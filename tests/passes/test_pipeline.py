"""The pipeline as one list of pass records: analyses leave the IR alone, every pass's output is
verified, the names passes give their tensors never take a spec's, and every stage `attnc show`
prints says something the one before it did not."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import attnc
from attnc import pipeline
from attnc.ir.cascade import Cascade
from attnc.ir.linear import LinearScan
from attnc.passes import Pass, PassKind, desugar, pass_count
from attnc.pipeline import LINEAR_STAGES, STAGES, frontend, read_spec, run_passes, show
from attnc.testing import rel_error
from tests.specs import FUSEMAX_3PASS

CAUSAL = "attention c {\n  mask = n <= m\n}\n"


def test_the_pipelines_are_flat_lists_of_pass_records():
    for p in pipeline.PASSES + pipeline.LINEAR_PASSES:
        assert isinstance(p, Pass) and p.doc
        assert (p.kind is PassKind.ANALYSIS) == (p.report is not None)
    assert [p.name for p in pipeline.PASSES] == ["desugar", "pass_count", "online_softmax",
                                                 "online_rescale", "mask_bounds", "tile",
                                                 "autodiff", "schedule", "fuse"]
    assert [p.name for p in pipeline.LINEAR_PASSES] == ["chunk_scan", "tile_scan"]


def test_an_analysis_that_changes_the_ir_is_caught(monkeypatch):
    broken = replace(pass_count.PASS, run=lambda c: replace(c, name="renamed"))
    monkeypatch.setattr(pipeline, "PASSES", (desugar.PASS, broken))
    with pytest.raises(AssertionError, match="the analysis pass_count changed the IR"):
        run_passes(frontend(read_spec(CAUSAL))[1])


def test_a_rewrite_is_verified_right_after_it_runs(monkeypatch):
    """A pass that drops a node others read fails at once, naming the dangling read."""
    def drop_max(c: Cascade) -> Cascade:
        return c.with_nodes([nd for nd in c.nodes if nd.name != "GM"])
    broken = replace(desugar.PASS, run=lambda spec: drop_max(desugar.run(spec)))
    monkeypatch.setattr(pipeline, "PASSES", (broken,))
    with pytest.raises(AssertionError, match="reads GM before it is defined"):
        run_passes(frontend(read_spec(CAUSAL))[1])


# The names desugar and autodiff give their tensors, as a spec's params.
TAKEN = ("S", "SM", "GM", "SN", "SD", "A", "AV", "O", "LSE", "P", "LSEB", "DOO", "Delta", "dP",
         "dS", "DQK", "dQK", "dQ", "dK", "dV", "D_S_0", "d_S", "dO", "dLSE")


def test_pass_names_never_take_a_specs():
    """Params called like every tensor the passes introduce: the cascade renames its own
    (GM_1, ...), and forward and gradients match the math (autodiff once refused them)."""
    decls = ", ".join(f"{n}[h]" for n in TAKEN)
    score = " + ".join(f"0.1 * {n}[h] * (n - m)" for n in TAKEN)
    kernel = attnc.compile(f"attention taken {{\n  param {decls}\n"
                           f"  score = dot(q, k) * scale + {score}\n  mask = n <= m\n}}\n")
    assert kernel.kernel_ir.grad is not None, kernel.kernel_ir.no_backward
    assert "GM_1[m] = max(n)" in kernel.ir("desugar") and "dS_1[m, n]" in kernel.ir("autodiff")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 10, 16, generator=gen, requires_grad=True) for _ in range(3))
    params = {n: torch.randn(2, generator=gen, requires_grad=True) for n in TAKEN}
    out = kernel(q, k, v, **params)
    bias = sum(0.1 * p for p in params.values())[None, :, None, None]
    rel = torch.arange(10)[None, :] - torch.arange(10)[:, None]
    s = (q @ k.transpose(-1, -2)) / 4 + bias * rel
    want = torch.softmax(s.masked_fill(rel > 0, float("-inf")), -1) @ v
    assert rel_error(out, want) < 1e-5
    leaves = [q, k, v, *params.values()]
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(),
                                                                                 leaves)):
        assert rel_error(a, b) < 1e-4


@pytest.mark.parametrize("spec", ["alibi", "rel_bias", FUSEMAX_3PASS, "gated_delta_net",
                                  "flowformer"])
def test_no_stage_repeats_the_one_before(spec):
    """`attnc show` at consecutive stages: an analysis prints its findings, `kernel` adds the
    generated kernels to the kernel IR, so no two neighbours print the same text."""
    src = read_spec(spec)
    stages = LINEAR_STAGES if isinstance(frontend(src)[1], LinearScan) else STAGES
    texts = [show(src, stage) for stage in stages]
    for (a, ta), (b, tb) in zip(zip(stages, texts), zip(stages[1:], texts[1:])):
        assert ta != tb, (a, b)


def test_the_kernel_stage_lists_the_generated_kernels():
    text = show(read_spec("gated_delta_net"), "kernel")
    assert "BT = 32" in text and "gated_delta_net_chunked (chunked)" in text
    assert "grid: One program per (sequence, head, value tile)." in text
