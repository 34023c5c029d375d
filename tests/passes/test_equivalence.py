"""Every pass preserves meaning: interpret(before) == interpret(after) on random inputs.

The cascade passes are checked with the cascade interpreter (mask_bounds' output is interpreted
with its tile plan applied: keys outside visited tiles dropped, no mask on full tiles); fuse's
kernel IR is checked with the tile-level kernel interpreter. The backward too: autodiff's
cascade, interpreted, equals fuse's backward kernel IR run tile by tile (dq over the forward's key
tiles, dk/dv over the transposed query tiles). Shapes are ragged and exercise several tiles, GQA
and M != N.
"""

from __future__ import annotations

import pytest
import torch

from attnc.backends.reference.cascade import (interpret, interpret_backward, run_kernel,
                                              run_kernel_backward)
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.cascade import Cascade
from attnc.pipeline import run_passes
from tests.specs import FUSEMAX_3PASS, SPECS, make_inputs

SHAPES = [(1, 2, 1, 37, 37, 8, 8), (2, 4, 2, 29, 45, 16, 8)]  # B, H, Hkv, M, N, D, Dv
TILES = (8, 8)


def _operands(shape, seed):
    B, H, Hkv, M, N, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, Dv, generator=g, dtype=torch.float64)
    return q, k, v, g


def _close(a: dict, b: dict):
    for role in ("out", "lse"):
        if role in a and role in b:
            torch.testing.assert_close(a[role], b[role], rtol=1e-9, atol=1e-9)


def _trail(src):
    spec = lower(parse(src), src)
    return spec, run_passes(spec)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("shape", SHAPES, ids=["self", "gqa-cross"])
def test_each_pass_preserves_meaning(name, shape):
    src, _ = SPECS[name]
    if name in ("document",) and shape[3] > shape[4]:
        pytest.skip("document ids are per key; M <= N")
    _, trail = _trail(src)
    q, k, v, g = _operands(shape, seed=len(name))
    inputs = make_inputs(trail[0][1].extra_inputs, shape[0], shape[1], shape[3], shape[4], g)
    before = interpret(trail[0][1], q, k, v, inputs=inputs)
    assert torch.isfinite(before["out"]).all()
    for pass_name, ir in trail[1:]:
        if isinstance(ir, Cascade):
            after = interpret(ir, q, k, v, inputs=inputs, tiles=TILES)
        else:
            after = run_kernel(ir, q, k, v, inputs=inputs, tiles=TILES)
        _close(before, after)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_backward_kernel_ir_matches_the_backward_cascade(name):
    shape = SHAPES[1] if name != "document" else (2, 4, 2, 29, 29, 16, 8)
    _, trail = _trail(SPECS[name][0])
    stages = dict(trail)
    cascade, kernel = stages["autodiff"], stages["fuse"]
    q, k, v, g = _operands(shape, seed=len(name) + 1)
    inputs = make_inputs(trail[0][1].extra_inputs, shape[0], shape[1], shape[3], shape[4], g)
    res = interpret(cascade, q, k, v, inputs=inputs)
    saved = {"O": res["out"], "LSE": res["lse"],
             "dO": torch.randn(res["out"].shape, generator=g, dtype=torch.float64),
             "dLSE": torch.randn(res["lse"].shape, generator=g, dtype=torch.float64)}
    want = interpret_backward(cascade.backward, q, k, v, inputs=inputs, saved=saved)
    got = run_kernel_backward(kernel, q, k, v, inputs=inputs, saved=saved, tiles=TILES)
    assert set(want) <= set(got) and {"dq", "dk", "dv"} <= set(want)
    for role in want:
        torch.testing.assert_close(got[role], want[role], rtol=1e-9, atol=1e-9)


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    _, trail = _trail(SPECS["late_rows"][0])
    q, k, v, _ = _operands(SHAPES[0], seed=3)
    for _, ir in trail:
        res = (interpret(ir, q, k, v, tiles=TILES) if isinstance(ir, Cascade)
               else run_kernel(ir, q, k, v, tiles=TILES))
        assert torch.equal(res["out"][:, :, :5], torch.zeros_like(res["out"][:, :, :5]))
        assert torch.isneginf(res["lse"][:, :, :5]).all()
        assert torch.isfinite(res["out"]).all()


def test_fusemax_cascade_passes_preserve_meaning():
    spec, trail = _trail(FUSEMAX_3PASS)
    q, k, v, _ = _operands(SHAPES[1], seed=5)
    before = interpret(spec, q, k, v)
    for _, ir in trail:
        after = (interpret(ir, q, k, v, tiles=TILES) if isinstance(ir, Cascade)
                 else run_kernel(ir, q, k, v, tiles=TILES))
        torch.testing.assert_close(after["out"], before["out"], rtol=1e-9, atol=1e-9)


def test_unsound_bounds_are_caught_by_the_interpreter():
    """The check above can fail: a mask_bounds result that skips visible keys changes the result."""
    from dataclasses import replace

    import sympy

    from attnc.expr import symbols as S
    _, trail = _trail(SPECS["causal"][0])
    bounded = dict(trail)["mask_bounds"]
    seg = bounded.bounds.segments[0]
    broken = replace(bounded, bounds=replace(bounded.bounds, segments=(
        replace(seg, hi=sympy.Min(S.N, S.m_lo)),)))
    q, k, v, _ = _operands(SHAPES[0], seed=1)
    good = interpret(bounded, q, k, v, tiles=TILES)
    bad = interpret(broken, q, k, v, tiles=TILES)
    assert not torch.allclose(good["out"], bad["out"])


def test_an_integer_score_is_interpreted_as_floats():
    """score = n - m, no mask: the scores are integers, and the online-softmax scan (running
    max from -inf) runs them as floats, against a dense softmax of the same."""
    from tests.reference import masked_softmax
    _, trail = _trail("attention positions {\n  score = n - m\n}\n")
    q, k, v, _ = _operands(SHAPES[1], seed=6)
    m, n = torch.arange(q.shape[2]).view(-1, 1), torch.arange(k.shape[2]).view(1, -1)
    want_out, want_lse = masked_softmax((n - m).double().expand(2, 4, -1, -1),
                                        torch.ones((), dtype=torch.bool),
                                        v.repeat_interleave(2, dim=1))
    for ir in [ir for _, ir in trail if isinstance(ir, Cascade)]:
        got = interpret(ir, q, k, v, tiles=TILES)
        torch.testing.assert_close(got["out"], want_out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["lse"], want_lse, rtol=1e-9, atol=1e-9)
