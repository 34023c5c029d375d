"""The library's non-softmax normalizers (issue 15), compiled, forward and backward, against the
independent eager references in tests/normalizer_reference.py (float64, gradients by torch
autograd through the reference).

Cases: fp32 and bf16, ragged M != N both ways, GQA (Hq = 2 Hkv), 16x16 tiles so that several
full and partial tiles are visited, rows that see no key (stick_breaking's first row; the
attention-block variants with their causal mask made to lag by 3 keys). Shapes are small: the
kernels run through Triton's interpreter on CPU (natively on CUDA when available). The tests at
the end check the references themselves against hand-written loops and known identities.
"""

from __future__ import annotations

import math
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import attnc
from attnc.library import describe
from attnc.testing import rel_error
from tests import normalizer_reference as NR
from tests import reference as R
from tests.test_variants import DEVICE, operands

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# gradients pass through more rounding than the forward (weights are rounded to the input dtype
# before their matmuls), as in tests/test_backward.py
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
TILES = {"block_m": 16, "block_n": 16}

VARIANTS = tuple(NR.VARIANTS)
# option overrides that keep the interpreter fast and make the options bite (two iterations,
# a non-unit temperature; 3 groups do not divide the key counts below evenly)
OPTIONS = {"sinkhorn": {"iters": 2, "tau": 0.7}, "grouped": {"groups": 3}}
HAS_LSE = {"sink_softmax"}

# (id, dtype, B, Hq, Hkv, M, N, D, Dv)
CASES = [("fp32-gqa", torch.float32, 1, 4, 2, 29, 40, 16, 24),
         ("bf16-gqa", torch.bfloat16, 1, 2, 1, 40, 27, 32, 16)]


def make_params(name, H, opts, g):
    """Params of a variant, from its math (not from attnc's IR)."""
    o = {**NR.DEFAULTS[name], **opts}
    if name == "sink_softmax":
        return {"sinks": torch.randn(H, generator=g)}
    if name == "grouped":
        return {"w": torch.randn(H, int(o["groups"]), generator=g)}
    return {}


def run_and_grad(kern, name, q, k, v, params, g):
    """The kernel's out (and lse) and the gradients of sum(out * dO) (+ sum(lse * dLSE)) for
    q, k, v and every param, computed on the (rounded) inputs the reference sees as well."""
    leaves = [t.detach().to(DEVICE).requires_grad_() for t in (q, k, v)]
    dev = {n: t.detach().to(DEVICE).requires_grad_() for n, t in params.items()}
    if name in HAS_LSE:
        out, lse = kern(*leaves, return_lse=True, **dev)
    else:
        out, lse = kern(*leaves, **dev), None
    got = (out.detach().cpu(), None if lse is None else lse.detach().cpu())
    grads = torch.autograd.grad(_loss(out, lse, g), leaves + list(dev.values()))
    return got, [t.cpu() for t in grads]


def reference_and_grad(name, q, k, v, params, opts, g, mask=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_params = {n: t.detach().double().requires_grad_() for n, t in params.items()}
    out, lse = NR.reference(name, *leaves, inputs=ref_params, options=opts, mask=mask)
    grads = torch.autograd.grad(_loss(out, lse, g), leaves + list(ref_params.values()))
    return (out.detach(), None if lse is None else lse.detach()), list(grads)


def _loss(out, lse, g):
    """sum(out * dO) + sum(lse * dLSE), dO and dLSE drawn from `g` (the kernel's and the
    reference's generators start from the same seed: both see the same upstream gradients)."""
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss = (out.double().cpu() * d_out).sum()
    if lse is not None:
        d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
        loss = loss + (lse.double().cpu() * d_lse).sum()
    return loss


def check(name, kern, dtype, shape, opts, seed, mask=None):
    """Forward and backward of `kern` against the reference; returns both outs."""
    B, H, Hkv, M, N, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = operands(B, H, Hkv, M, N, D, Dv, dtype, g)
    params = make_params(name, H, opts, g)
    (out, lse), got = run_and_grad(kern, name, q, k, v, params, torch.Generator().manual_seed(1))
    (ref, ref_lse), want = reference_and_grad(name, q, k, v, params, opts,
                                              torch.Generator().manual_seed(1), mask)
    what = f"{name} {dtype} {shape} {opts}"
    assert out.dtype == dtype and out.shape == ref.shape, what
    assert not torch.isnan(out).any(), f"{what}: NaN in out"
    err = rel_error(out, ref)
    assert err <= TOL[dtype], f"{what}: out relative error {err:.3g} > {TOL[dtype]}"
    if ref_lse is not None:
        assert lse is not None and torch.isfinite(lse).all(), f"{what}: lse"
        diff = (lse.double() - ref_lse).abs() / (1 + ref_lse.abs())
        bound = 1e-4 if dtype == torch.float32 else 1e-3  # from fp32 scores in both dtypes
        assert diff.max() <= bound, f"{what}: lse error {diff.max():.3g}"
    names = ["dq", "dk", "dv"] + [f"d_{n}" for n in params]
    for role, a, b, leaf in zip(names, got, want, [q, k, v] + list(params.values())):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, f"{what}: {role}"
        assert torch.isfinite(a).all(), f"{what}: {role} is not finite"
        gerr = rel_error(a, b)
        assert gerr <= GRAD_TOL[dtype], f"{what}: {role} relative error {gerr:.3g}"
    return out, ref


# --- the library ----------------------------------------------------------------------------------
def test_the_library_has_every_normalizer_variant():
    assert set(VARIANTS) <= set(attnc.variants())
    for name in VARIANTS:
        assert describe(name).startswith(f"{name}:")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_reference(name, case):
    cid, dtype, *shape = case
    opts = OPTIONS.get(name, {})
    kern = attnc.load(name, **opts, **TILES)
    check(name, kern, dtype, tuple(shape), opts, seed=zlib.crc32(f"{name}{cid}".encode()))


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_default_options_larger(name):
    """The spec's own option defaults, several tiles each way, default launch configuration."""
    kern = attnc.load(name)
    check(name, kern, torch.float32, (2, 4, 2, 150, 130, 64, 64), {}, seed=3)


# --- rows that see no key -------------------------------------------------------------------------
LAG = 3
LAGGED = ("sigmoid_attn", "softplus_attn", "relu_attn", "standardized", "sink_softmax")


def _lagged(name):
    """The library spec with its causal mask shifted: query m sees keys n <= m - 3, so rows
    0..2 see nothing."""
    text = (Path(__file__).resolve().parents[1] / "variants" / f"{name}.attn").read_text()
    assert text.count("mask = n <= m\n") == 1, name
    return text.replace("mask = n <= m\n", f"mask = n <= m - {LAG}\n")


@pytest.mark.parametrize("name", LAGGED)
def test_rows_that_see_no_key(name):
    kern = attnc.compile(_lagged(name), **TILES)
    M, N = 24, 24
    m, n = R._positions(M, N)
    out, ref = check(name, kern, torch.float32, (1, 2, 1, M, N, 16, 16), {}, seed=5,
                     mask=n <= m - LAG)
    assert (ref[..., :LAG, :] == 0).all() and (ref[..., LAG:, :] != 0).any()
    assert (out[..., :LAG, :] == 0).all()


def test_sink_softmax_lse_of_an_empty_row_is_the_sink():
    kern = attnc.compile(_lagged("sink_softmax"), **TILES)
    g = torch.Generator().manual_seed(6)
    q, k, v = operands(1, 2, 1, 20, 20, 16, 16, torch.float32, g)
    sinks = torch.randn(2, generator=g)
    out, lse = kern(q, k, v, return_lse=True, sinks=sinks)
    assert (out[..., :LAG, :] == 0).all()
    torch.testing.assert_close(lse[0, :, :LAG].cpu(), sinks.view(2, 1).expand(2, LAG))


def test_stick_breaking_first_row_is_zero():
    """Under n < m the first query sees no key: out 0, and its gradients are finite."""
    kern = attnc.load("stick_breaking", **TILES)
    out, ref = check("stick_breaking", kern, torch.float32, (1, 2, 2, 20, 20, 16, 16), {},
                     seed=7)
    assert (ref[..., 0, :] == 0).all() and (ref[..., 1:, :] != 0).any()
    assert (out[..., 0, :] == 0).all()


# --- option domains and call requirements ---------------------------------------------------------
@pytest.mark.parametrize("name, options, message", [
    ("sinkhorn", {"iters": 0}, "iters must be an integer >= 1, got 0"),
    ("sinkhorn", {"tau": 0.0}, "tau must be a finite number > 0"),
    ("grouped", {"groups": 0}, "groups must be an integer >= 1 and <= 16, got 0"),
    ("grouped", {"groups": 17}, "groups must be an integer >= 1 and <= 16, got 17"),
])
def test_options_outside_their_domain_raise(name, options, message):
    with pytest.raises(ValueError, match=message):
        attnc.load(name, **options)


def test_grouped_needs_a_key_per_group():
    kern = attnc.load("grouped", **OPTIONS["grouped"], **TILES)  # 3 groups
    g = torch.Generator().manual_seed(8)
    q, k, v = operands(1, 2, 2, 6, 2, 16, 16, torch.float32, g)
    with pytest.raises(ValueError, match=r"grouped: k: the call needs N >= groups .*got N = 2"):
        kern(q, k, v, w=torch.randn(2, 3, generator=g))


# --- the example ----------------------------------------------------------------------------------
def test_normalizers_example_runs():
    example = Path(__file__).resolve().parents[1] / "examples" / "normalizers.py"
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [float(line.rsplit(" ", 1)[1]) for line in proc.stdout.splitlines()
              if "max relative error" in line]
    assert len(errors) == 3 and max(errors) < 1e-4, proc.stdout


# --- the references themselves --------------------------------------------------------------------
def _tiny(seed, B=1, H=2, Hkv=1, M=5, N=7, D=4, Dv=3):
    g = torch.Generator().manual_seed(seed)
    return operands(B, H, Hkv, M, N, D, Dv, torch.float64, g), g


def test_references_differ_from_each_other_and_are_finite():
    """No two references compute the same thing (a dispatch slip would be caught), and none
    gives NaN on random data."""
    (q, k, v), g = _tiny(0, M=9, N=11)
    outs = {}
    for name in VARIANTS:
        out, _ = NR.reference(name, q, k, v, inputs=make_params(name, 2, {}, g))
        assert torch.isfinite(out).all(), name
        outs[name] = out
    for a in VARIANTS:
        for b in VARIANTS:
            assert a == b or rel_error(outs[a], outs[b]) > 1e-3, (a, b)


def test_options_really_bite():
    (q, k, v), g = _tiny(1, M=9, N=11)
    w = torch.randn(2, 4, generator=g)
    a, _ = NR.sinkhorn(q, k, v)
    b, _ = NR.sinkhorn(q, k, v, **OPTIONS["sinkhorn"])
    assert rel_error(a, b) > 1e-3
    c, _ = NR.grouped(q, k, v, w=w)
    d, _ = NR.grouped(q, k, v, w=w[:, :3], **OPTIONS["grouped"])
    assert rel_error(c, d) > 1e-3


def test_pointwise_references_match_hand_loops():
    """sigmoid_attn, softplus_attn, relu_attn and standardized, one (b, h, m) row at a time."""
    (q, k, v), _ = _tiny(2)
    M, N, D = q.shape[2], k.shape[2], q.shape[3]
    outs = {name: NR.reference(name, q, k, v)[0] for name in
            ("sigmoid_attn", "softplus_attn", "relu_attn", "standardized")}
    for h in range(q.shape[1]):
        for m in range(M):
            seen = list(range(min(m + 1, N)))
            s = [float(q[0, h, m] @ k[0, 0, n]) / math.sqrt(D) for n in seen]
            sig = [1 / (1 + math.exp(-(x - math.log(N)))) for x in s]
            lam = math.log(len(seen))
            sp = [math.log1p(math.exp(lam * x)) for x in s]
            relu = [max(x, 0.0) / len(seen) for x in s]
            mu = sum(s) / len(s)
            sd = math.sqrt(sum((x - mu) ** 2 for x in s) / len(s) + 1e-6)
            weights = {"sigmoid_attn": sig, "softplus_attn": [x / sum(sp) for x in sp],
                       "relu_attn": relu, "standardized": [(x - mu) / sd for x in s]}
            for name, w in weights.items():
                want = sum(wi * v[0, 0, n] for wi, n in zip(w, seen))
                torch.testing.assert_close(outs[name][0, h, m], want, msg=name)


def test_standardized_single_key_row_is_zero():
    """Row 0 sees one key: its score is its own mean, so its weight is 0."""
    (q, k, v), _ = _tiny(3)
    out, _ = NR.standardized(q, k, v)
    assert (out[..., 0, :] == 0).all()


def test_sinkhorn_reference_is_column_stochastic_and_converges():
    """After each iteration every column of K sums to 1; with many iterations on a square score
    matrix the rows sum to 1 too (out = K v with v = 1 gives ones)."""
    (q, k, _), _ = _tiny(4, M=6, N=6)
    ones = torch.ones(1, 1, 6, 1, dtype=torch.float64)
    col = torch.eye(6, dtype=torch.float64).view(1, 1, 6, 6)
    # out = K @ v with v = the identity reads K itself
    K, _ = NR.sinkhorn(q, k, col, iters=3)
    torch.testing.assert_close(K.sum(-2), torch.ones_like(K.sum(-2)))
    out, _ = NR.sinkhorn(q, k, ones, iters=200)
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-6, rtol=0)
    # one iteration from exp(s): the column normalization of the row-softmax matrix
    P = torch.softmax(torch.einsum("bhmd,bhnd->bhmn", q, k.expand_as(q)) / 2.0, dim=-1)
    K1, _ = NR.sinkhorn(q, k, col, iters=1)
    torch.testing.assert_close(K1, P / P.sum(-2, keepdim=True))


def test_sink_softmax_reference_rescales_causal_softmax():
    """With a sink, the causal softmax's weights shrink by Z / (Z + exp(sink)), Z = exp(lse)."""
    (q, k, v), g = _tiny(5)
    sinks = torch.randn(2, generator=g, dtype=torch.float64)
    out, lse = NR.sink_softmax(q, k, v, sinks=sinks)
    base, base_lse = R.causal(q, k, v)
    keep = torch.sigmoid(base_lse - sinks.view(1, -1, 1))
    torch.testing.assert_close(out, base * keep[..., None])
    torch.testing.assert_close(lse, torch.logaddexp(base_lse, sinks.view(1, -1, 1)))
    # a very negative sink is plain causal softmax
    out, _ = NR.sink_softmax(q, k, v, sinks=torch.full((2,), -1e4, dtype=torch.float64))
    torch.testing.assert_close(out, base)


def test_grouped_reference_limits():
    """One group is full softmax attention (whatever w); one group per key mixes the values by
    softmax(w) alone."""
    (q, k, v), g = _tiny(6)
    full, _ = R.full(q, k, v)
    one, _ = NR.grouped(q, k, v, w=torch.randn(2, 1, generator=g, dtype=torch.float64),
                        groups=1)
    torch.testing.assert_close(one, full)
    N = k.shape[2]
    w = torch.randn(2, N, generator=g, dtype=torch.float64)
    each, _ = NR.grouped(q, k, v, w=w, groups=N)
    want = torch.einsum("hn,bnf->bhf", torch.softmax(w, -1), v[:, 0])
    torch.testing.assert_close(each, want[:, :, None].expand_as(each))


def test_stick_breaking_reference_matches_explicit_product():
    (q, k, v), _ = _tiny(7, M=6, N=5)
    out, _ = NR.stick_breaking(q, k, v)
    M, N, D = q.shape[2], k.shape[2], q.shape[3]
    for h in range(q.shape[1]):
        for m in range(M):
            want = torch.zeros(v.shape[-1], dtype=torch.float64)
            for n in range(min(m, N)):
                beta = [torch.sigmoid(q[0, h, m] @ k[0, 0, j] / math.sqrt(D)) for j in range(N)]
                w = beta[n]
                for j in range(n + 1, min(m, N)):
                    w = w * (1 - beta[j])
                want = want + w * v[0, 0, n]
            torch.testing.assert_close(out[0, h, m], want)
    assert (out[..., 0, :] == 0).all()


def test_references_give_finite_gradients_on_empty_rows():
    (q, k, v), g = _tiny(8)
    M, N = q.shape[2], k.shape[2]
    m, n = R._positions(M, N)
    for name in VARIANTS:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        params = {p: t.double().requires_grad_() for p, t in make_params(name, 2, {}, g).items()}
        mask = n <= m - LAG
        out, lse = NR.reference(name, *leaves, inputs=params, mask=mask)
        assert (out[..., :LAG, :] == 0).all(), name
        loss = out.square().sum() + (0 if lse is None else lse.sum())
        for t in torch.autograd.grad(loss, leaves + list(params.values())):
            assert torch.isfinite(t).all(), name
