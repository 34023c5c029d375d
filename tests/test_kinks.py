"""Kinks and nested conditionals in compiled kernels (DSL specs and FlexAttention mods), forward
and backward, against torch.

* Exact ties: max/min of equal values (torch.maximum gives each 1/2), relu and |x| at 0, clamp
  at its bounds, where on its own threshold. The generated backward kernels must give torch
  autograd's gradients there, params' included.
* min/max/clamp/relu around a where, and a where under a comparison, which sympy turns into its
  ITE form, must compile and match torch forward and backward; so must |u| of a u sympy cannot
  prove real.

References are dense float64 torch written from the math (the DSL cases) or the mod itself run
on index tensors (as tests/test_flex.py's `_eager`, with the lse); torch autograd through them
is the oracle.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.testing import rel_error
from tests.reference import masked_softmax

B, H, L, D = 1, 2, 40, 16
TOL = 1e-4  # fp32 kernels against float64 references


def _qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]


def _tied_tables():
    """t[L] with entries equal to each head's clamp bounds lo[h], hi[h] and to w[h] (so the
    diagonal of max(t[m], t[n], w[h]) ties three ways); bounds and w as [H] tensors."""
    g = torch.Generator().manual_seed(21)
    lo, hi, w = torch.tensor([-0.5, -0.25]), torch.tensor([0.5, 0.75]), torch.tensor([0.3, -0.1])
    t = torch.randn(L, generator=g)
    t[0::6], t[1::6], t[2::6] = lo[0], hi[1], w[0]
    t[3::6], t[4::6] = 0.0, w[1]
    return {"t": t, "lo": lo, "hi": hi, "w": w}


def _run(fn, leaves: dict, seed: int):
    """out, lse and the gradients of sum(out * dO) + sum(lse * dLSE) for every leaf."""
    run = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    out, lse = fn(run)
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * d_out).sum() + (lse.double() * d_lse).sum()
    grads = torch.autograd.grad(loss, list(run.values()), allow_unused=True)
    return out, lse, {n: torch.zeros_like(x) if d is None else d
                      for (n, x), d in zip(run.items(), grads)}


def _check(ours, want):
    out, lse, grads = ours
    ref_out, ref_lse, ref_grads = want
    assert rel_error(out, ref_out) < TOL
    assert rel_error(lse, ref_lse) < TOL
    for n in ref_grads:
        assert rel_error(grads[n], ref_grads[n]) < TOL, n


def _dense(q, k, v, score):
    """softmax(score(q.k * scale)) @ v with every key visible, float64."""
    s = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return masked_softmax(score(s), torch.ones((), dtype=torch.bool), v.double())


TIES = """
attention ties {
  param t[n], lo[h], hi[h], w[h]
  score = (dot(q, k) * scale + max(t[m], t[n]) - 0.5 * min(t[m], t[n]) + relu(t[m] - t[n])
           + 0.3 * abs(t[m] - t[n]) + clamp(t[n], lo[h], hi[h]) + 0.25 * max(t[m], t[n], w[h])
           + 0.2 * where(t[m] > t[n], t[m], t[n]))
}
"""


def test_spec_gradients_at_ties_are_torchs():
    """On the diagonal t[m] == t[n]: max and min give each side 1/2, relu and abs nothing, the
    where its false branch; where t[n] equals a bound the clamp passes the gradient to t; the
    three-way max shares it in thirds (as amax does)."""
    kern = attnc.compile(TIES, block_m=16, block_n=16)
    q, k, v = _qkv(22)
    leaves = {"q": q, "k": k, "v": v, **_tied_tables()}

    def reference(x):
        a, c = x["t"].double()[:, None], x["t"].double()[None, :]
        lo, hi, w = (x[n].double().view(-1, 1, 1) for n in ("lo", "hi", "w"))
        three = torch.stack(torch.broadcast_tensors(a, c, w)).amax(0)
        return _dense(x["q"], x["k"], x["v"], lambda s: (
            s + torch.maximum(a, c) - 0.5 * torch.minimum(a, c) + torch.relu(a - c)
            + 0.3 * torch.abs(a - c) + torch.clamp(c, lo, hi) + 0.25 * three
            + 0.2 * torch.where(a > c, a, c)))

    ours = _run(lambda x: kern(x["q"], x["k"], x["v"], t=x["t"], lo=x["lo"], hi=x["hi"],
                               w=x["w"], return_lse=True), leaves, 23)
    _check(ours, _run(reference, leaves, 23))


def test_mod_gradients_at_ties_are_torchs():
    """The same kinks written with torch in a score_mod (torch.maximum, torch.clamp with tensor
    bounds and one-sided, Tensor.clamp, torch.relu, torch.abs, torch.where), gradients of the
    captured tensors included, against the mod run by torch."""
    q, k, v = _qkv(24)
    leaves = {"q": q, "k": k, "v": v, **_tied_tables()}

    def mod_of(x):
        t, lo, hi = x["t"], x["lo"], x["hi"]

        def mod(score, b, h, q_idx, kv_idx):
            a, c = t[q_idx], t[kv_idx]
            return (score + torch.maximum(a, c) - 0.5 * torch.minimum(a, c) + torch.relu(a - c)
                    + 0.3 * torch.abs(a - c) + torch.clamp(c, lo[h], hi[h])
                    + torch.clamp(a, min=lo[h]) + c.clamp(max=0.5) + 0.2 * torch.where(a > c, a, c))
        return mod

    def ours(x):
        return attnc.flex_attention(x["q"], x["k"], x["v"], score_mod=mod_of(x), return_lse=True)

    def reference(x):
        s = {n: y.double() for n, y in x.items()}
        return _eager_lse(s["q"], s["k"], s["v"], mod_of(s))

    got = _run(ours, leaves, 25)
    _check(got, _run(reference, leaves, 25))


def _eager_lse(q, k, v, score_mod):
    """tests/test_flex.py's eager FlexAttention semantics, with the lse."""
    s = torch.einsum("bhmd,bhnd->bhmn", q, k) / math.sqrt(q.shape[-1])
    idx = (torch.arange(q.shape[0]).view(-1, 1, 1, 1), torch.arange(q.shape[1]).view(1, -1, 1, 1),
           torch.arange(q.shape[2]).view(1, 1, -1, 1), torch.arange(k.shape[2]).view(1, 1, 1, -1))
    return masked_softmax(score_mod(s, *idx), torch.ones((), dtype=torch.bool), v)


# --- a where inside min/max/clamp/relu, and under a comparison ---------------------------------

# (score, mask) in the DSL, and the same as torch over s = q.k * scale, p [H, 1, 1], m [M, 1],
# n [1, N] (mask None: every key visible)
NESTINGS = {
    "min_of_where": ("min(where(p[h] < 1, dot(q, k) * scale, dot(q, k) * scale * 0.5), 1.5)",
                     None,
                     lambda s, p, m, n: torch.minimum(torch.where(p < 1, s, s * 0.5),
                                                      torch.tensor(1.5, dtype=s.dtype)), None),
    "clamp_of_where": ("clamp(where(n <= m, dot(q, k) * scale, dot(q, k) * scale * 0.5) * p[h], "
                       "-0.5, 0.75)", None,
                       lambda s, p, m, n: torch.clamp(torch.where(n <= m, s, s * 0.5) * p,
                                                      -0.5, 0.75), None),
    "where_compared": ("where(where(p[h] < 1, dot(q, k) * scale, -dot(q, k) * scale) > 0.2, "
                       "dot(q, k) * scale, 0.5 * dot(q, k) * scale)", None,
                       lambda s, p, m, n: torch.where(torch.where(p < 1, s, -s) > 0.2, s, 0.5 * s),
                       None),
    "max_relu_where": ("max(relu(where(p[h] < 1, dot(q, k) * scale, 2 * dot(q, k) * scale)), "
                       "0.25 * dot(q, k) * scale)", None,
                       lambda s, p, m, n: torch.maximum(torch.relu(torch.where(p < 1, s, 2 * s)),
                                                        0.25 * s), None),
    "mask_of_where": ("dot(q, k) * scale * p[h]", "where(p[h] < 1, m - n, n - m) >= 0",
                      lambda s, p, m, n: s * p,
                      lambda s, p, m, n: torch.where(p < 1, m - n, n - m) >= 0),
    # |u| of a u sympy cannot prove real: its own derivative is complex (re, im, atan2)
    "abs_of_sqrt_of_relu": ("abs(sqrt(relu(dot(q, k) * scale * p[h]) + 0.5))", None,
                            lambda s, p, m, n: torch.abs(torch.sqrt(torch.relu(s * p) + 0.5)),
                            None),
    "abs_of_log": ("abs(log(sigmoid(dot(q, k) * scale))) * p[h]", None,
                   lambda s, p, m, n: torch.abs(torch.log(torch.sigmoid(s))) * p, None),
    # a power by a head-dependent integer, of negative bases too (exp2 of a log alone is NaN)
    "power_by_head": ("(dot(q, k) * scale) ** (h + 1) + 0.5 * p[h] * (dot(q, k) * scale) ** h",
                      None, lambda s, p, m, n: (s ** _heads(1) + 0.5 * p * s ** _heads(0)), None),
}


def _heads(offset):
    """h + offset for each head, as a float tensor [H, 1, 1]."""
    return (torch.arange(H, dtype=torch.float64) + offset).view(-1, 1, 1)


@pytest.mark.parametrize("name", list(NESTINGS))
def test_spec_where_nestings_compile_and_match_torch(name):
    score, mask, score_ref, mask_ref = NESTINGS[name]
    text = f"attention {name} {{\n  param p[h]\n  score = {score}\n"
    text += f"  mask = {mask}\n}}\n" if mask else "}\n"
    kern = attnc.compile(text, block_m=16, block_n=16)
    q, k, v = _qkv(26)
    leaves = {"q": q, "k": k, "v": v, "p": torch.tensor([0.5, 2.0])}

    def reference(x):
        p = x["p"].double().view(-1, 1, 1)
        m, n = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)
        s = torch.einsum("bhmd,bhnd->bhmn", x["q"].double(), x["k"].double()) / math.sqrt(D)
        visible = torch.ones((), dtype=torch.bool) if mask_ref is None else mask_ref(s, p, m, n)
        return masked_softmax(score_ref(s, p, m, n), visible, x["v"].double())

    ours = _run(lambda x: kern(x["q"], x["k"], x["v"], p=x["p"], return_lse=True), leaves, 27)
    _check(ours, _run(reference, leaves, 27))


MOD_NESTINGS = {
    "clamp_of_where": lambda p: lambda score, b, h, q_idx, kv_idx: torch.clamp(
        torch.where(p[h] < 1, score, score * 0.5), max=1.5),
    "where_compared": lambda p: lambda score, b, h, q_idx, kv_idx: torch.where(
        torch.where(q_idx >= kv_idx, score * p[h], -score) > 0.3, score, -0.5 * score),
    "maximum_of_where": lambda p: lambda score, b, h, q_idx, kv_idx: torch.maximum(
        torch.where(q_idx >= kv_idx, score, score * 0.25), torch.abs(score * p[h]) - 1),
    "clamp_bounds_of_where": lambda p: lambda score, b, h, q_idx, kv_idx: torch.clamp(
        score, min=torch.where(p[h] < 1, -0.5, -0.25), max=torch.where(q_idx > kv_idx, 0.5, 1.0)),
}


@pytest.mark.parametrize("name", list(MOD_NESTINGS))
def test_mod_where_nestings_compile_and_match_torch(name):
    q, k, v = _qkv(28)
    leaves = {"q": q, "k": k, "v": v, "p": torch.tensor([0.5, 2.0])}

    def ours(x):
        return attnc.flex_attention(x["q"], x["k"], x["v"], score_mod=MOD_NESTINGS[name](x["p"]),
                                    return_lse=True)

    def reference(x):
        s = {n: y.double() for n, y in x.items()}
        return _eager_lse(s["q"], s["k"], s["v"], MOD_NESTINGS[name](s["p"]))

    _check(_run(ours, leaves, 29), _run(reference, leaves, 29))



# --- a linear block's generated backward ---------------------------------------------------------

KINKED_SCAN = """
linear kinked {
  state S[i, j]
  S[i, j] = max(S[i, j], relu(k[i]) * clamp(v[j], -0.5, 0.5)) + 0.1 * abs(k[i]) * v[j]
  o[j] = sum(i) q[i] * S[i, j]
}
"""


def test_a_scans_generated_backward_at_ties_is_torchs():
    """A sequential scan's fused backward (sympy's vector-Jacobian products) at exact ties:
    max(S, x) with S == x (a zero state against a zero input), relu and abs at k == 0, clamp
    with v on its bounds; against torch autograd through a float64 loop."""
    from attnc.ir.linear_kernel import ScanBackward
    kernel = attnc.compile(KINKED_SCAN)
    assert kernel.plan.backward is ScanBackward.RECURRENT
    g = torch.Generator().manual_seed(31)
    T, DK, DV = 9, 4, 8
    q, k = (torch.randn(B, H, T, DK, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=g)
    k[:, :, ::3, :2] = 0.0
    v[:, :, ::2, 0], v[:, :, 1::2, 1] = 0.5, -0.5
    v[:, :, :, 2] = 0.0

    def loop(q, k, v):
        S, out = torch.zeros(B, H, DK, DV, dtype=q.dtype), []
        for t in range(T):
            kt, vt = k[:, :, t, :, None], v[:, :, t, None, :]
            S = (torch.maximum(S, torch.relu(kt) * torch.clamp(vt, -0.5, 0.5))
                 + 0.1 * torch.abs(kt) * vt)
            out.append((q[:, :, t, :, None] * S).sum(-2))
        return torch.stack(out, 2)

    d_o = torch.randn(B, H, T, DV, generator=g)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad((kernel(*leaves) * d_o).sum(), leaves)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad((loop(*ref) * d_o.double()).sum(), ref)
    for name, a, b in zip("qkv", got, want):
        assert rel_error(a, b) < TOL, name
