"""The fused forward of what surrounds a score (attnc.ir.around): rope (half-split and
interleaved, partial dims, per-head NoPE), l2norm with gains, row scales, several dots with a
value alias (MLA, against a naive DeepSeek-style MLA), output gates (with zero-gate tiles
skipped), kv-head maps -- each against tests/reference_around.py on random data: fp32 and bf16,
ragged lengths, GQA, fully masked rows, 16 x 16 tiles; and the per-call checks."""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.testing import rel_error
from tests import reference_around as R

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
TILES = {"block_m": 16, "block_n": 16}
B, HQ, HKV, M, N, D = 1, 4, 2, 21, 37, 32
DTYPES = [torch.float32, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _operands(dtype, g, M=M, N=N, D=D, Dv=D, Hkv=HKV):
    """q, k, v rounded to `dtype`, and their float64 copies the reference sees."""
    q = torch.randn(B, HQ, M, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=g).to(dtype)
    return (q, k, v), tuple(t.double() for t in (q, k, v))


def _positions(g, M=M, N=N):
    """Positions of a chunk of M queries at the end of N keys, keys shuffled a little."""
    pos_k = torch.arange(N).expand(B, N) + torch.randint(0, 3, (B, 1), generator=g)
    return pos_k[:, N - M:].contiguous(), pos_k.contiguous()


def _late(m, n):
    return n <= m + (N - M)


def _check(out, lse, ref, ref_lse, dtype, what):
    err = rel_error(out.double(), ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), f"{what}: lse -inf rows differ"
        lerr = rel_error(lse.double()[finite], ref_lse[finite])
        assert lerr <= LSE_TOL[dtype], f"{what}: lse relative error {lerr:.3g}"


ROPE = """attention r {{
  input pos_q[b, m], pos_k[b, n]
  q = {fn}(q, pos_q[b, m], 500.0{dims})
  k = {fn}(k, pos_k[b, n], 500.0{dims})
  mask = n <= m + {shift}
}}
"""


@pytest.mark.parametrize("fn,dims,dtype", [
    ("rope", None, torch.float32), ("rope", 12, torch.bfloat16),
    ("rope_interleaved", None, torch.bfloat16), ("rope_interleaved", 8, torch.float32)])
def test_rope(fn, dims, dtype):
    g = _gen(1)
    (q, k, v), (qd, kd, vd) = _operands(dtype, g)
    pos_q, pos_k = _positions(g)
    text = ROPE.format(fn=fn, dims="" if dims is None else f", {dims}", shift=N - M)
    kernel = attnc.compile(text, **TILES)
    out, lse = kernel(q, k, v, pos_q=pos_q, pos_k=pos_k, return_lse=True)
    inter = fn == "rope_interleaved"
    ref, ref_lse = R.attention(
        [(R.rope(qd, pos_q[:, None], 500.0, dims, inter),
          R.rope(kd, pos_k[:, None], 500.0, dims, inter), 1)], vd, 1 / math.sqrt(D), _late)
    _check(out, lse, ref, ref_lse, dtype, f"{fn} dims {dims}")


def test_rope_library_variant_rotates_rot_features():
    g = _gen(2)
    (q, k, v), (qd, kd, vd) = _operands(torch.float32, g, M=N)
    pos_q, pos_k = _positions(g, M=N)
    kernel = attnc.load("rope", rot=8, **TILES)
    out = kernel(q, k, v, pos_q=pos_q, pos_k=pos_k)
    ref, _ = R.attention([(R.rope(qd, pos_q[:, None], 10000.0, 8),
                           R.rope(kd, pos_k[:, None], 10000.0, 8), 1)], vd, 1 / math.sqrt(D),
                         R.causal)
    _check(out, None, ref, None, torch.float32, "rope rot=8")
    # the rotation matters: without it the output differs
    plain, _ = R.attention([(qd, kd, 1)], vd, 1 / math.sqrt(D), R.causal)
    assert rel_error(plain, ref) > 1e-2


def test_per_head_nope_is_an_angle_of_zero():
    """`where(nope[h] == 1, 0, pos)`: heads flagged NoPE see unrotated q."""
    text = """attention nope {
  input pos_q[b, m], pos_k[b, n], nope[h]
  q = rope(q, where(nope[h] == 1, 0, pos_q[b, m]), 10000.0)
  k = rope(k, pos_k[b, n], 10000.0)
}
"""
    g = _gen(3)
    (q, k, v), (qd, kd, vd) = _operands(torch.float32, g)
    pos_q, pos_k = _positions(g)
    nope = torch.tensor([0, 1, 0, 1])
    out = attnc.compile(text, **TILES)(q, k, v, pos_q=pos_q, pos_k=pos_k, nope=nope)
    angle_q = torch.where(nope[None, :, None] == 1, 0, pos_q[:, None, :])
    ref, _ = R.attention([(R.rope(qd, angle_q, 10000.0), R.rope(kd, pos_k[:, None], 10000.0),
                           1)], vd, 1 / math.sqrt(D))
    _check(out, None, ref, None, torch.float32, "per-head nope")


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm(dtype):
    g = _gen(4)
    (q, k, v), (qd, kd, vd) = _operands(dtype, g, M=N)
    pos_q, pos_k = _positions(g, M=N)
    gq, gk = 0.5 + torch.rand(D, generator=g), 0.5 + torch.rand(D, generator=g)
    kernel = attnc.load("qk_norm", **TILES)
    out, lse = kernel(q, k, v, pos_q=pos_q, pos_k=pos_k, gq=gq, gk=gk, scale=4.0,
                      return_lse=True)
    ref, ref_lse = R.attention(
        [(R.rope(R.l2norm(qd, gq.double()), pos_q[:, None], 10000.0),
          R.rope(R.l2norm(kd, gk.double()), pos_k[:, None], 10000.0), 1)], vd, 4.0, R.causal)
    _check(out, lse, ref, ref_lse, dtype, "qk_norm")


ROW_SCALES = """attention scaled {
  param temp[b, h, m], vs[b, h, n]
  q = l2norm(q) * temp[b, h, m]
  v = v * vs[b, h, n]
  mask = n <= m - 5
}
"""


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_scales_and_fully_masked_rows(dtype):
    """Per-query temperature after an l2norm and a per-key value scale (on the key side h is
    the K/V head); rows 0..4 see no key: out 0, lse -inf."""
    g = _gen(5)
    (q, k, v), (qd, kd, vd) = _operands(dtype, g, M=N)
    temp = 1 + torch.rand(B, HQ, N, generator=g)
    vs = torch.randn(B, HQ, N, generator=g)
    out, lse = attnc.compile(ROW_SCALES, **TILES)(q, k, v, temp=temp, vs=vs, return_lse=True)
    ref, ref_lse = R.attention([(R.l2norm(qd) * temp.double()[..., None], kd, 1)],
                               vd * vs.double()[:, :HKV, :, None], 1 / math.sqrt(D),
                               lambda m, n: n <= m - 5)
    _check(out, lse, ref, ref_lse, dtype, "row scales")
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == -math.inf)


def _mla_inputs(dtype, g, H=HQ, M=29, N=29, Dn=16, Dr=16, Dc=32, Dv=16):
    x_nope = torch.randn(B, H, M, Dn, generator=g)
    x_rope = torch.randn(B, H, M, Dr, generator=g)
    c = torch.randn(B, 1, N, Dc, generator=g)
    k_rope = torch.randn(B, 1, N, Dr, generator=g)
    w_uk = torch.randn(H, Dc, Dn, generator=g) / math.sqrt(Dc)
    w_uv = torch.randn(H, Dc, Dv, generator=g) / math.sqrt(Dc)
    pos_k = torch.arange(N).expand(B, N).contiguous()
    pos_q = pos_k[:, :M].contiguous()
    rounded = [t.to(dtype).double() for t in (x_nope, x_rope, c, k_rope)]
    return rounded, w_uk.double(), w_uv.double(), pos_q, pos_k


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_absorbed_matches_naive_mla(dtype):
    """The absorbed `mla` spec -- q_abs = x_nope W_uk^T per head over the latent, values the
    latent, out = out_latent W_uv -- is DeepSeek-V2's MLA computed naively."""
    g = _gen(6)
    (x_nope, x_rope, c, k_rope), w_uk, w_uv, pos_q, pos_k = _mla_inputs(dtype, g)
    scale = 1 / math.sqrt(x_nope.shape[-1] + x_rope.shape[-1])
    ref = R.naive_mla(x_nope, x_rope, c, k_rope, w_uk, w_uv, pos_q, pos_k, 10000.0, scale)
    q_abs = torch.einsum("bhmd,hcd->bhmc", x_nope, w_uk)  # absorbed into the latent
    latent = attnc.load("mla", **TILES)(q_abs.to(dtype), c.to(dtype), qr=x_rope.to(dtype),
                                        kr=k_rope.to(dtype), pos_q=pos_q, pos_k=pos_k,
                                        scale=scale)
    out = torch.einsum("bhmc,hcd->bhmd", latent.double(), w_uv)
    err = rel_error(out, ref)
    assert err <= TOL[dtype], f"mla {dtype}: relative error {err:.3g}"


def test_mla_takes_no_v_and_checks_its_operands():
    g = _gen(7)
    (x_nope, x_rope, c, k_rope), _, _, pos_q, pos_k = _mla_inputs(torch.float32, g)
    kernel = attnc.load("mla", **TILES)
    q = torch.randn(B, HQ, 29, 32, generator=g)
    args = dict(qr=x_rope.float(), kr=k_rope.float(), pos_q=pos_q, pos_k=pos_k)
    with pytest.raises(ValueError, match=r"mla: .*takes no v"):
        kernel(q, c.float(), c.float(), **args)
    with pytest.raises(ValueError, match=r"operand kr has shape"):
        kernel(q, c.float(), **{**args, "kr": k_rope.float().expand(B, 2, -1, -1)})
    with pytest.raises(ValueError, match=r"operand qr has dtype"):
        kernel(q, c.float(), **{**args, "qr": x_rope.to(torch.bfloat16)})
    with pytest.raises(ValueError, match=r"missing operand 'kr'"):
        kernel(q, c.float(), **{k: t for k, t in args.items() if k != "kr"})
    with pytest.raises(ValueError, match=r"dot\(qr, kr\): kr has head dim 8"):
        kernel(q, c.float(), **{**args, "kr": k_rope.float()[..., :8]})


def test_value_alias_is_k():
    text = "attention tied {\n  v = k\n  mask = n <= m\n}\n"
    g = _gen(8)
    (q, k, _), (qd, kd, _) = _operands(torch.float32, g, M=N)
    out = attnc.compile(text, **TILES)(q, k)
    ref, _ = R.attention([(qd, kd, 1)], kd, 1 / math.sqrt(D), R.causal)
    _check(out, None, ref, None, torch.float32, "v = k")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_and_zero_gated_tiles(dtype):
    """out *= sigmoid(logit); a query tile gated to 0 everywhere skips its keys in inference
    (out exactly 0), and still has its lse when the lse is asked for."""
    g = _gen(9)
    (q, k, v), (qd, kd, vd) = _operands(dtype, g, M=N)
    logits = torch.randn(B, HQ, N, generator=g)
    logits[0, 1, :16] = -math.inf  # the first query tile of (b 0, h 1): gate 0
    gate = torch.sigmoid(logits).double()
    ref, ref_lse = R.attention([(qd, kd, 1)], vd, 1 / math.sqrt(D), R.causal, gate=gate)
    kernel = attnc.load("gated_heads", **TILES)
    out = kernel(q, k, v, gate_logits=logits)
    _check(out, None, ref, None, dtype, "gated")
    assert torch.all(out[0, 1, :16] == 0)
    out, lse = kernel(q, k, v, gate_logits=logits, return_lse=True)
    _check(out, lse, ref, ref_lse, dtype, "gated with lse")
    if dtype == torch.float32:  # the gate after the splits' merge
        split = attnc.load("gated_heads", kv_splits=2, **TILES)
        _check(split(q, k, v, gate_logits=logits), None, ref, None, dtype, "gated, key splits")


KV_MAP = """attention mapped {
  input hmap[h]
  kv_head = hmap[h]
  mask = n <= m
}
"""


def test_kv_head_map():
    g = _gen(10)
    (q, k, v), (qd, kd, vd) = _operands(torch.float32, g, M=N)
    hmap = torch.tensor([1, 1, 0, 1])
    kernel = attnc.compile(KV_MAP, **TILES)
    out = kernel(q, k, v, hmap=hmap)
    ref, _ = R.attention([(qd, kd, 1)], vd, 1 / math.sqrt(D), R.causal, kv_map=hmap.tolist())
    _check(out, None, ref, None, torch.float32, "kv_head map")
    with pytest.raises(ValueError, match=r"mapped: hmap: .* ranges over \[0, 2\] but k and v "
                                         r"have 2 heads"):
        kernel(q, k, v, hmap=torch.tensor([0, 2, 0, 1]))


def test_rope_dims_above_the_head_dim_are_refused():
    g = _gen(11)
    (q, k, v), _ = _operands(torch.float32, g, D=8, Dv=8)
    pos_q, pos_k = _positions(g)
    with pytest.raises(ValueError, match=r"rope: the rope of q rotates 16 features but q has "
                                         r"head dim 8"):
        attnc.load("rope", **TILES)(q, k, v, pos_q=pos_q, pos_k=pos_k)


def test_block_sparse_kernels_visit_the_block_masks_blocks():
    """A block-sparse gated kernel with a key block left out of the causal block mask equals
    the dense kernel where that block is masked out: the lists decide, the gate still applies."""
    g = _gen(12)
    (q, k, v), _ = _operands(torch.float32, g, M=N)
    gate = torch.randn(B, HQ, N, generator=g)
    def keep(b, h, m, n):
        return (n <= m) & ((n < 16) | (n >= 32))
    mask = attnc.create_block_mask(keep, B, HQ, N, N, BLOCK_SIZE=16)
    sparse = attnc.load("gated_heads", block_sparse=True, **TILES)
    dense = attnc.compile("attention gated_hole {\n  param gate_logits[b, h, m]\n"
                          "  gate = sigmoid(gate_logits[b, h, m])\n"
                          "  mask = n <= m and (n < 16 or n >= 32)\n}", **TILES)
    with pytest.warns(UserWarning, match="mask_mod 'keep' is ignored"):  # lists decide
        out = sparse(q, k, v, gate_logits=gate, block_mask=mask)
    assert rel_error(out, dense(q, k, v, gate_logits=gate)) < 1e-5


def test_gradients_reach_the_value_alias_the_operands_and_the_gate_params():
    """The runtime's autograd: the latent's gradient sums its key and value uses, the operands
    get theirs, and the gate's adjoint reaches its param through torch autograd."""
    g = _gen(13)
    (x_nope, x_rope, c, k_rope), _, _, pos_q, pos_k = _mla_inputs(torch.float32, g)
    q = torch.randn(B, HQ, x_nope.shape[2], 32, generator=g)
    leaves = [t.float().requires_grad_() for t in (q, c, x_rope, k_rope)]
    out = attnc.load("mla", **TILES)(leaves[0], leaves[1], qr=leaves[2], kr=leaves[3],
                                     pos_q=pos_q, pos_k=pos_k, scale=0.3)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    qd, cd, qr, kr = ref_leaves
    ref, _ = R.attention([(qd, cd, 1), (R.rope(qr, pos_q[:, None], 10000.0, None, True),
                                        R.rope(kr, pos_k[:, None], 10000.0, None, True), 1)],
                         cd, 0.3, R.causal)
    want = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, a, b in zip(("q", "latent", "qr", "kr"), got, want):
        assert rel_error(a.double(), b) <= 1e-4, name
    logits = torch.randn(B, HQ, N, generator=g, requires_grad=True)
    (q, k, v), (qd, kd, vd) = _operands(torch.float32, g, M=N)
    out = attnc.load("gated_heads", **TILES)(q, k, v, gate_logits=logits)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, logits, dout)[0]
    ld = logits.detach().double().requires_grad_()
    ref, _ = R.attention([(qd, kd, 1)], vd, 1 / math.sqrt(D), R.causal, gate=torch.sigmoid(ld))
    assert rel_error(got.double(), torch.autograd.grad(ref, ld, dout.double())[0]) <= 1e-4
