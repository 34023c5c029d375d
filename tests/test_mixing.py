"""Head-mixing kernels (premix / postmix: talking heads, DCMHA) against an eager reference
written here from the math (backends/triton/softmax/mixing.py's docstring states it):

    s'[h] = Σ_{g visible} A[h, g] s[g]  (-inf where h does not see the key),
    w = softmax(s'), w'[h] = Σ_g P[h, g] w[g]  (0 where h does not see the key),
    out[h] = w'[h] @ v_kv(h).

Specs are built by hand (an AttentionSpec with an Around), so these tests need only the kernel;
the library variant is compiled from its text in test_head_mixing_variant.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import sympy
import torch

import attnc
from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.around import Around, g
from attnc.ir.cascade import TensorDecl, TensorKind
from attnc.pipeline import Source, frontend
from attnc.runtime import compile_ir
from attnc.runtime.mixing import MixingKernel
from attnc.testing import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}

W_PRE, W_POST = S.access("w_pre", S.h, g), S.access("w_post", S.h, g)
# DCMHA's dynamic part: a per-(b, m) rank-one term on top of the static matrix
DYNAMIC = W_PRE + S.access("a", S.b, S.m, S.h) * S.access("c", S.b, S.m, g)
DECLS = {"w_pre": (S.H, S.H), "w_post": (S.H, S.H), "a": (S.B, S.M, S.H),
         "c": (S.B, S.M, S.H)}


def build(premix=None, postmix=None, mask: str | None = "n <= m", around: Around | None = None,
          tiles=(16, 16)) -> MixingKernel:
    line = "" if mask is None else f"  mask = {mask}\n"
    text = f"attention mixed {{\n  score = dot(q, k) * scale\n{line}}}\n"
    src = Source(text, "<spec>")
    _, ir = frontend(src, {})
    read = {str(a.base) for ex in (premix, postmix) if ex is not None
            for a in ex.atoms(sympy.Indexed)}
    decls = tuple(TensorDecl(n, TensorKind.PARAM, DECLS[n]) for n in sorted(read))
    around = around or Around()
    ir = replace(ir, decls=ir.decls + decls, around=replace(around, premix=premix,
                                                              postmix=postmix))
    kernel = compile_ir(ir, src, {}, {"block_m": tiles[0], "block_n": tiles[1]})
    assert isinstance(kernel, MixingKernel)
    return kernel


def reference(q, k, v, scale, visible, pre=None, post=None):
    """float64 math; visible [H, M, N] (or broadcastable), pre / post [B, M, H, H]."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    visible = visible.expand_as(s)
    if pre is not None:
        s = torch.einsum("bmhg,bgmn->bhmn", pre.double(), torch.where(visible, s, 0.0))
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    if post is not None:
        w = torch.einsum("bmhg,bgmn->bhmn", post.double(), w).masked_fill(~visible, 0.0)
    return w @ v, lse


def params(B, H, M, dtype, grad=False):
    gen = torch.Generator().manual_seed(7)
    eye = torch.eye(H)
    out = {"w_pre": eye + 0.3 * torch.randn(H, H, generator=gen),
           "w_post": eye + 0.3 * torch.randn(H, H, generator=gen),
           "a": 0.5 * torch.randn(B, M, H, generator=gen),
           "c": 0.5 * torch.randn(B, M, H, generator=gen)}
    return {n: t.to(DEVICE, dtype).requires_grad_(grad) for n, t in out.items()}


def coefficient(ex, p, B, M, H):
    """The mixing matrix [B, M, H, H] written out from the spec expression's math."""
    if ex is None:
        return None
    static = (p["w_post"] if ex == W_POST else p["w_pre"]).double()
    out = static.expand(B, M, H, H)
    if ex == DYNAMIC:
        out = out + p["a"].double()[..., :, None] * p["c"].double()[..., None, :]
    return out


def causal(M, N, H=1):
    return torch.ones(M, N, dtype=torch.bool, device=DEVICE).tril().expand(H, M, N)


def operands(B, Hq, Hkv, M, N, D, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=gen).to(DEVICE, dtype)
            for h, n, d in ((Hq, M, D), (Hkv, N, D), (Hkv, N, Dv))]


def check(kernel, premix, postmix, dtype, B, Hq, Hkv, M, N, D, Dv, visible, scale=None,
          grads=True):
    """Forward (out, lse) and, with `grads`, the gradients of Σ out·dO + Σ lse·dlse in q, k,
    v and every param the mixing reads, against the reference's through torch autograd."""
    q, k, v = (t.requires_grad_(grads) for t in operands(B, Hq, Hkv, M, N, D, Dv, dtype))
    p = params(B, Hq, M, dtype, grad=grads)
    names = sorted({str(a.base) for ex in (premix, postmix) if ex is not None
                    for a in ex.atoms(sympy.Indexed)})
    out, lse = kernel(q, k, v, scale=scale, return_lse=True, **{n: p[n] for n in names})
    s = 1 / math.sqrt(D) if scale is None else scale
    ref, ref_lse = reference(q, k, v, s, visible, coefficient(premix, p, B, M, Hq),
                             coefficient(postmix, p, B, M, Hq))
    assert out.dtype == dtype and out.shape == (B, Hq, M, Dv)
    err = rel_error(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.detach().cpu()), finite.cpu())
    bound = LSE_TOL[dtype] * (1 + ref_lse[finite].abs())
    assert ((lse.detach().double()[finite] - ref_lse[finite]).abs() <= bound).all()
    if grads:
        gen = torch.Generator().manual_seed(11)
        dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
        dlse = torch.randn(lse.shape, generator=gen).to(DEVICE)
        wrt = [q, k, v] + [p[n] for n in names]
        got = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), wrt)
        want = torch.autograd.grad((ref * dout.double()).sum()
                                   + (ref_lse.masked_fill(~finite, 0) * dlse.double()).sum(), wrt)
        for name, a, b in zip(["q", "k", "v"] + names, got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            err = rel_error(a, b)
            assert err <= GRAD_TOL[dtype], f"d{name}: relative error {err:.3g}"
    return out, ref


MODES = {"premix": (W_PRE, None), "postmix": (None, W_POST), "both": (W_PRE, W_POST),
         "dynamic": (DYNAMIC, None), "dynamic-both": (DYNAMIC, W_POST)}


# every mode in fp32; bf16 on the mode that runs every code path (premix with its dynamic part,
# postmix): the suite's time is the interpreter's
CASES = [(mode, torch.float32) for mode in MODES] + [("dynamic-both", torch.bfloat16)]


@pytest.mark.parametrize("mode, dtype", CASES)
def test_causal_ragged_gqa(mode, dtype):
    premix, postmix = MODES[mode]
    kernel = build(premix, postmix)
    B, Hq, Hkv, M, N = 2, 4, 2, 37, 37
    check(kernel, premix, postmix, dtype, B, Hq, Hkv, M, N, 16, 24, causal(M, N))


def test_forward_without_autograd():
    """No tensor requires grad: the forward alone, the output detached from any graph."""
    kernel = build(W_PRE, W_POST)
    out, _ = check(kernel, W_PRE, W_POST, torch.float32, 1, 2, 2, 30, 30, 16, 16,
                   causal(30, 30), grads=False)
    assert not out.requires_grad


@pytest.mark.parametrize("mode", ["both", "dynamic"])
def test_fully_masked_rows_and_cross_lengths(mode):
    """Rows 0..2 see no key (out 0, lse -inf); M != N, bottom-right offsets, an explicit scale
    and odd head counts (Hq = 3 of a 16-head tile, MQA)."""
    premix, postmix = MODES[mode]
    kernel = build(premix, postmix, mask="n <= m - 3")
    M, N = 21, 45
    visible = (torch.arange(N, device=DEVICE)[None, :]
               <= torch.arange(M, device=DEVICE)[:, None] - 3)
    out, _ = check(kernel, premix, postmix, torch.float32, 1, 3, 1, M, N, 32, 32, visible,
                   scale=0.3)
    assert out[:, :, :3].abs().max() == 0


def test_head_dependent_mask_stays_invisible():
    """A per-head window: scores invisible to a head are left out of its mixtures and the
    mixed weights of keys it cannot see are dropped (the key walk covers every head's keys)."""
    kernel = build(W_PRE, W_POST, mask="n <= m and n >= m - 6 * h - 2")
    H, M, N = 3, 33, 33
    rows, keys = torch.arange(M, device=DEVICE), torch.arange(N, device=DEVICE)
    heads = torch.arange(H, device=DEVICE)[:, None, None]
    visible = (keys[None, None, :] <= rows[None, :, None]) & (
        rows[None, :, None] - keys[None, None, :] <= 6 * heads + 2)
    check(kernel, W_PRE, W_POST, torch.float32, 1, H, H, M, N, 16, 16, visible)


def test_no_mask_and_wide_tiles():
    kernel = build(W_PRE, W_POST, mask=None, tiles=(32, 32))
    M, N = 19, 70
    check(kernel, W_PRE, W_POST, torch.float32, 1, 2, 2, M, N, 16, 16,
          torch.ones(M, N, dtype=torch.bool, device=DEVICE))


def test_identity_mixing_is_plain_attention():
    """premix = postmix = [h == g]: plain causal attention, as torch's sdpa computes it."""
    eye = sympy.Piecewise((1, sympy.Eq(S.h, g)), (0, True))
    kernel = build(eye, eye)
    q, k, v = operands(1, 4, 4, 33, 33, 16, 16, torch.float32, seed=3)
    out = kernel(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_error(out, ref) <= 1e-5


@pytest.mark.slow  # compiling the graph takes ~30 s
def test_torch_compile_fullgraph():
    """The kernels are custom ops: torch.compile traces the call (coefficients included) as
    one graph, and its gradients equal the eager call's."""
    kernel = build(DYNAMIC, W_POST)
    q, k, v = (t.requires_grad_() for t in operands(1, 2, 2, 20, 20, 16, 16, torch.float32))
    p = params(1, 2, 20, torch.float32, grad=True)
    run = torch.compile(lambda *xs: kernel(*xs[:3], w_pre=xs[3], w_post=xs[4], a=xs[5],
                                           c=xs[6]), fullgraph=True)
    leaves = [q, k, v, p["w_pre"], p["w_post"], p["a"], p["c"]]
    compiled = torch.autograd.grad(run(*leaves).sum(), leaves)
    eager = torch.autograd.grad(kernel(q, k, v, **p).sum(), leaves)
    for a, b in zip(compiled, eager):
        assert rel_error(a, b) <= 1e-6


def test_too_many_heads_is_refused():
    kernel = build(W_PRE, None)
    q, k, v = operands(1, 17, 17, 8, 8, 16, 16, torch.float32)
    p = params(1, 17, 8, torch.float32)
    with pytest.raises(ValueError, match="q has 17 heads"):
        kernel(q, k, v, w_pre=p["w_pre"])


def test_wrong_coefficient_shape_names_it():
    kernel = build(W_PRE, None)
    q, k, v = operands(1, 4, 4, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="w_pre"):
        kernel(q, k, v, w_pre=torch.zeros(3, 3, device=DEVICE))


def test_gradient_of_a_score_param_is_refused():
    """The backward differentiates q, k, v and the mixing's params; a param the score reads
    (here per-head ALiBi slopes) is refused by name when it requires grad, and works detached."""
    text = ("attention biased {\n  param slopes[h]\n  score = dot(q, k) * scale + slopes[h] * "
            "(n - m)\n  mask = n <= m\n}\n")
    src = Source(text, "<spec>")
    _, ir = frontend(src, {})
    ir = replace(ir, decls=ir.decls + (TensorDecl("w_pre", TensorKind.PARAM, (S.H, S.H)),),
                 around=Around(premix=W_PRE))
    kernel = compile_ir(ir, src, {}, {"block_m": 16, "block_n": 16})
    q, k, v = (t.requires_grad_() for t in operands(1, 2, 2, 20, 20, 16, 16, torch.float32))
    p = params(1, 2, 20, torch.float32, grad=True)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    out = kernel(q, k, v, w_pre=p["w_pre"], slopes=slopes.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="no gradient for slopes"):
        out.sum().backward()
    out = kernel(q, k, v, w_pre=p["w_pre"], slopes=slopes)
    out.sum().backward()
    rows, keys = torch.arange(20, device=DEVICE)[:, None], torch.arange(20, device=DEVICE)
    s = q.detach().double() @ k.detach().double().transpose(-1, -2) / 4 + \
        slopes.double()[:, None, None] * (keys - rows)
    visible = keys <= rows
    mixed = torch.einsum("hg,bgmn->bhmn", p["w_pre"].detach().double(),
                         torch.where(visible, s, 0.0)).masked_fill(~visible, -math.inf)
    assert rel_error(out, mixed.softmax(-1) @ v.detach().double()) <= TOL[torch.float32]
    assert q.grad is not None and p["w_pre"].grad is not None


def test_other_around_statements_are_refused_at_their_line():
    text = ("attention gated {\n  param w[h, h]\n  input gt[b, h, m]\n  premix = w[h, g]\n"
            "  gate = sigmoid(gt[b, h, m])\n  score = dot(q, k) * scale\n}\n")
    with pytest.raises(CompileError, match="combines with no other statement") as err:
        attnc.compile(text)
    assert err.value.line == 5 and err.value.hint


def test_a_mixing_reading_keys_is_refused():
    with pytest.raises(CompileError, match="premix reads n"):
        build(W_PRE * S.n, None)


def test_generated_source_spans_heads():
    kernel = build(W_PRE, W_POST)
    assert "BLOCK_H" in kernel.source and "_mix_stats" in kernel.source
    assert "grid: One program per (query tile, b), spanning every query head." in \
        kernel.ir("kernel")


def test_head_mixing_variant():
    """The library's talking-heads spec (variants/head_mixing.attn), compiled from its text."""
    kernel = attnc.compile("head_mixing", block_m=16, block_n=16)
    assert isinstance(kernel, MixingKernel)
    B, H, M = 1, 4, 27
    q, k, v = operands(B, H, 2, M, M, 16, 16, torch.float32, seed=5)
    p = params(B, H, M, torch.float32)
    out = kernel(q, k, v, w_pre=p["w_pre"], w_post=p["w_post"])
    ref, _ = reference(q, k, v, 1 / 4, causal(M, M), p["w_pre"].expand(B, M, H, H),
                       p["w_post"].expand(B, M, H, H))
    assert rel_error(out, ref) <= TOL[torch.float32]
