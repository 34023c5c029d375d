"""FlexAttention mods that index a captured tensor by another captured tensor's value
(per[lut[kv_idx]]), in score_mods and mask_mods: forward and gradients (the gathered tensor's
included) against the mods run by torch on index tensors (tests/test_flex.py's `_eager`), and
the indexings attnc refuses, with the reason."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.expr import symbols as S
from attnc.flex import trace_spec
from attnc.frontends.flex import ModError
from attnc.testing import rel_error
from tests.test_flex import _eager

B, H, M, N, D = 2, 2, 40, 44, 16
TOL = 1e-5


def _qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, D, generator=g), torch.randn(B, H, N, D, generator=g),
            torch.randn(B, H, N, D, generator=g))


def _tables(seed):
    g = torch.Generator().manual_seed(seed)
    return {"per": torch.randn(H, 5, generator=g), "lut": torch.randint(0, 5, (B, N), generator=g),
            "perm": torch.randperm(N, generator=g), "flag": torch.rand(N, generator=g) > 0.5,
            "pair": torch.randn(2, generator=g)}


def _grads(fn, q, k, v, learn: dict, seed: int):
    """out and the gradients of sum(out * dO) for q, k, v and the tensors in `learn`."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    params = {n: x.clone().requires_grad_() for n, x in learn.items()}
    out = fn(*leaves, params)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    wrt = leaves + list(params.values())
    grads = torch.autograd.grad((out.double() * d_out).sum(), wrt, allow_unused=True)
    return out, [torch.zeros_like(x) if d is None else d for x, d in zip(wrt, grads)]


def _check(mod_of, tables, mask_of=None, seed=51):
    """attnc (fp32) against the eager mod (float64); mask_of(tables) a mask_mod, whose block
    mask attnc builds."""
    q, k, v = _qkv(seed)
    learn = {n: t for n, t in tables.items() if t.is_floating_point()}

    def ours(q, k, v, params):
        t = {**tables, **params}
        bm = None
        if mask_of is not None:
            bm = attnc.create_block_mask(mask_of(t), B, 1, M, N, device="cpu", BLOCK_SIZE=16)
        return attnc.flex_attention(q, k, v, score_mod=mod_of(t), block_mask=bm)

    def reference(q, k, v, params):
        t = {n: x.double() if x.is_floating_point() else x for n, x in {**tables, **params}.items()}
        return _eager(q, k, v, mod_of(t), None if mask_of is None else mask_of(t))

    out, got = _grads(ours, q, k, v, learn, seed)
    want_out, want = _grads(reference, *(x.double() for x in (q, k, v)),
                            {n: x.double() for n, x in learn.items()}, seed)
    assert rel_error(out, want_out) < TOL
    for name, a, b in zip(["q", "k", "v", *learn], got, want):
        assert rel_error(a, b) < TOL, name


def test_a_table_indexed_by_a_lookup():
    """per[h, lut[b, kv_idx]]: the gradient reaches per through the gathered table."""
    _check(lambda t: lambda score, b, h, q_idx, kv_idx: score + t["per"][h, t["lut"][b, kv_idx]],
           _tables(52))


def test_lookups_nested_with_arithmetic_on_the_value():
    """The same table at the query's and the key's lookup, a lookup of a lookup
    (lut[b, perm[kv_idx]]) with arithmetic on the value, and a bool table read as 0/1."""
    def mod_of(t):
        per, lut, perm, flag, pair = (t[n] for n in ("per", "lut", "perm", "flag", "pair"))

        def mod(score, b, h, q_idx, kv_idx):
            return (score + per[h, lut[b, kv_idx]] - 0.5 * per[h, lut[b, q_idx]]
                    + per[h, (lut[b, perm[kv_idx]] + 1) % 5] * pair[flag[kv_idx].long()])
        return mod
    _check(mod_of, _tables(53))


def test_a_mask_through_a_lookup():
    """Documents by position after a permutation: doc[b, perm[q_idx]] == doc[b, perm[kv_idx]]
    in the mask_mod (evaluated block by block, then the block-sparse kernel)."""
    tables = _tables(54)
    tables["doc"] = torch.randint(0, 3, (B, N), generator=torch.Generator().manual_seed(55))

    def mask_of(t):
        doc, perm = t["doc"], t["perm"]
        return lambda b, h, q_idx, kv_idx: doc[b, perm[q_idx]] == doc[b, perm[kv_idx]]
    _check(lambda t: lambda score, b, h, q_idx, kv_idx: score * t["per"][h, t["lut"][b, kv_idx]],
           tables, mask_of)


def test_new_lookup_values_reuse_the_kernel():
    """Caching follows the IR: new values in lut (and so in the gathered table) run the same
    kernel with the new values."""
    q, k, v = _qkv(56)
    tables = _tables(57)
    per = tables["per"]
    outs, specs = [], []
    for seed in (58, 59):
        lut = torch.randint(0, 5, (B, N), generator=torch.Generator().manual_seed(seed))

        def mod(score, b, h, q_idx, kv_idx):
            return score + per[h, lut[b, kv_idx]]
        outs.append(attnc.flex_attention(q, k, v, score_mod=mod))
        specs.append(trace_spec(mod, None, {S.B: B, S.H: H, S.M: M, S.N: N})[0])
        ref = _eager(q.double(), k.double(), v.double(), mod)
        assert rel_error(outs[-1], ref) < TOL
    assert specs[0] == specs[1] and not torch.equal(outs[0], outs[1])


def test_lookups_attnc_refuses_say_why():
    q, k, v = _qkv(60)
    per, lut = torch.randn(9), torch.randint(0, 5, (N,), generator=torch.Generator().manual_seed(6))
    cases = [
        (lambda score, b, h, q_idx, kv_idx: score + per[lut[q_idx % N] - lut[kv_idx] + 4],
         ModError, "more than one captured read"),
        (lambda score, b, h, q_idx, kv_idx: score + per[lut[kv_idx] + h],
         ModError, "mixes the value"),
        (lambda score, b, h, q_idx, kv_idx: score + per[lut[kv_idx] + 5],
         ValueError, r"takes the values \[5, 9\].*size 9; clamp"),
        (lambda score, b, h, q_idx, kv_idx: score + per[lut[kv_idx] - 1],
         ValueError, r"takes the values \[-1, 3\]"),
    ]
    for mod, error, message in cases:
        with pytest.raises(error, match=message):
            attnc.flex_attention(q, k, v, score_mod=mod)
