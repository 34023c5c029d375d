"""Backward kernels: gradients of every library variant against torch autograd through the
independent eager references (tests/reference.py, float64), plus the contracts around them:
block-sparse kernels, fully masked rows, determinism, torch.compile, double backward, inputs
that must not require grad, and scores with no derivative.

The loss reads both outputs, sum(out * dO) + sum(lse * dLSE), so the lse gradient is covered.
Kernels run through Triton's interpreter on the CPU (natively on CUDA when available).
"""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.testing import rel_error
from tests import reference as R
from tests.test_variants import DEVICE, SMALL, VARIANTS, make_inputs, operands

# Gradients pass through more rounding than the forward (p and ds are rounded to the input
# dtype before their matmuls, as in FlashAttention-2), hence looser low-precision bounds.
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2}

# (id, dtype, B, Hq, Hkv, M, N, D, Dv, tiles): ragged lengths, GQA, M != N both ways.
CASES = [("fp32-gqa", torch.float32, 1, 4, 2, 45, 61, 32, 24, (16, 16)),
         ("bf16-mqa", torch.bfloat16, 2, 2, 1, 53, 37, 16, 16, (16, 32))]


def _loss_grads(out, lse, wrt, g):
    """Gradients of sum(out * dO) + sum(lse * dLSE) over the rows that see a key."""
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(lse.detach())
    loss = ((out.double().cpu() * d_out).sum()
            + (torch.where(finite.cpu(), lse.double().cpu(), 0.0) * d_lse).sum())
    return torch.autograd.grad(loss, wrt)


def _grads(kern, q, k, v, inputs, scale=None, block_mask=None, seed=0):
    """(kernel grads, reference grads) for q, k, v and every param, from the same rounded data."""
    leaves = [t.detach().to(DEVICE).requires_grad_() for t in (q, k, v)]
    params = {n: t.detach().to(DEVICE).requires_grad_(t.is_floating_point())
              for n, t in inputs.items()}
    out, lse = kern(*leaves, scale=scale, return_lse=True, block_mask=block_mask, **params)
    learn = [t for t in params.values() if t.requires_grad]
    got = _loss_grads(out, lse, leaves + learn, torch.Generator().manual_seed(seed))
    return got, params, learn


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_gradients(name, case):
    _, dtype, B, H, Hkv, M, N, D, Dv, tiles = case
    opts = SMALL.get(name, [{}])[0]
    if name in ("document",) and M > N:
        M, N = N, M
    kern = attnc.load(name, **opts, block_m=tiles[0], block_n=tiles[1])
    g = torch.Generator().manual_seed(11)
    q, k, v = operands(B, H, Hkv, M, N, D, Dv, dtype, g)
    inputs = make_inputs(name, B, H, M, N, opts, g)
    got, _, _ = _grads(kern, q, k, v, inputs)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_inputs = {n: (t.double().requires_grad_() if t.is_floating_point() else t)
                  for n, t in inputs.items()}
    out, lse = R.reference(name, *ref_leaves, inputs=ref_inputs, options=opts)
    want = _loss_grads(out, lse, ref_leaves + [t for t in ref_inputs.values() if t.requires_grad],
                       torch.Generator().manual_seed(0))
    names = ["dq", "dk", "dv"] + [f"d_{n}" for n, t in ref_inputs.items() if t.requires_grad]
    for what, a, b, leaf in zip(names, got, want, [q, k, v] + list(inputs.values())):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, what
        err = rel_error(a, b)
        assert err <= GRAD_TOL[dtype], f"{name} {what}: relative error {err:.3g}"


def test_fully_masked_rows_give_zero_gradients():
    """Row m sees keys n < m - 40: rows below 41 see nothing and must pass no gradient."""
    kern = attnc.compile("attention late {\n  param w[h]\n  score = dot(q, k) * scale * w[h]\n"
                         "  mask = n < m - 40\n}\n", block_m=16, block_n=16)
    g = torch.Generator().manual_seed(2)
    q, k, v = operands(1, 2, 1, 60, 60, 16, 16, torch.float32, g)
    w = (torch.rand(2, generator=g) + 0.5).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = kern(*leaves, return_lse=True, w=w)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    dq, dk, dv = (t.grad for t in leaves)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv, w.grad))
    assert torch.equal(dq[:, :, :41], torch.zeros_like(dq[:, :, :41]))
    assert torch.equal(dk[:, :, 19:], torch.zeros_like(dk[:, :, 19:]))  # keys no row sees
    assert dq[:, :, 41:].abs().sum() > 0 and w.grad.abs().sum() > 0


def test_param_read_twice():
    """bias[m] and bias[n] in one score (FlexAttention refuses this): both reads' gradients
    land in bias."""
    spec = ("attention twice {\n  param bias[M]\n"
            "  score = dot(q, k) * scale + bias[m] - 2 * bias[n]\n  mask = n <= m\n}\n")
    kern = attnc.compile(spec, block_m=16, block_n=16)
    g = torch.Generator().manual_seed(4)
    q, k, v = operands(1, 2, 2, 40, 40, 16, 16, torch.float32, g)
    bias = torch.randn(40, generator=g)
    got, _, _ = _grads(kern, q, k, v, {"bias": bias})
    qd, kd, vd, bd = (t.double().requires_grad_() for t in (q, k, v, bias))
    m, n = torch.arange(40)[:, None], torch.arange(40)[None, :]
    s = qd @ kd.transpose(-1, -2) / 4.0 + bd[:, None] - 2 * bd[None, :]
    out, lse = R.masked_softmax(s, n <= m, vd)
    want = _loss_grads(out, lse, [qd, kd, vd, bd], torch.Generator().manual_seed(0))
    for a, b in zip(got, want):
        assert rel_error(a, b) < 1e-4


def _doc_mask(doc):
    def document(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)
    return document


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_sparse_gradients(dtype):
    """A data-dependent mask makes a block-sparse kernel: dq walks the key lists, dk/dv the
    query lists; a learnable per-head scale is captured by the score_mod."""
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, M, N, D = 2, 4, 2, 70, 70, 16
    doc = torch.randint(0, 3, (B, N), generator=g).sort(-1).values
    q, k, v = operands(B, H, Hkv, M, N, D, D, dtype, g)
    head_scale = (torch.rand(H, generator=g) + 0.5).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * head_scale[h]

    bm = attnc.create_block_mask(_doc_mask(doc), B, 1, M, N, device="cpu", BLOCK_SIZE=32)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attnc.flex_attention(*leaves, score_mod=score_mod, block_mask=bm, enable_gqa=True)
    d_out = torch.randn(out.shape, generator=g)
    (out.float() * d_out).sum().backward()
    got = [t.grad for t in leaves] + [head_scale.grad]

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    hs = head_scale.detach().double().requires_grad_()
    kk, vv = (t.repeat_interleave(H // Hkv, 1) for t in ref_leaves[1:])
    s = ref_leaves[0] @ kk.transpose(-1, -2) / D ** 0.5 * hs.view(1, H, 1, 1)
    m, n = torch.arange(M)[:, None], torch.arange(N)[None, :]
    visible = ((doc[:, :, None] == doc[:, None, :]) & (m >= n))[:, None]
    ref, _ = R.masked_softmax(s, visible, vv)
    (ref * d_out.double()).sum().backward()
    for a, b in zip(got, ref_leaves + [hs]):
        assert rel_error(a, b.grad) <= GRAD_TOL[dtype]


def test_param_gradients_are_bitwise_deterministic():
    kern = attnc.load("rel_bias", max_distance=8, block_m=16, block_n=16)
    g = torch.Generator().manual_seed(6)
    q, k, v = operands(2, 4, 2, 50, 50, 16, 16, torch.float32, g)
    bias = torch.randn(4, 17, generator=g)
    runs = [_grads(kern, q, k, v, {"bias": bias})[0] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_per_element_param_scratch_is_bounded_by_slabs(monkeypatch):
    """A param indexed by m and n needs per-element partial sums; with the scratch capped at
    two 16-row slabs' worth, the dq kernel runs on slabs of query tiles, and the gradients
    agree with one launch."""
    from attnc.backends.triton.softmax import launch as launcher
    kern = attnc.load("rel_bias", max_distance=8, block_m=16, block_n=16)
    g = torch.Generator().manual_seed(12)
    q, k, v = operands(1, 2, 2, 70, 50, 16, 16, torch.float32, g)
    bias = torch.randn(2, 17, generator=g)
    whole = _grads(kern, q, k, v, {"bias": bias})[0]
    launches = []
    dq_kernel = kern.module().module.attnc_rel_bias_bwd_dq

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return dq_kernel[grid]

    monkeypatch.setattr(launcher, "TILE_BUFFER_ELEMENTS", 2 * 16 * 50 * 2)
    monkeypatch.setattr(kern.module().module, "attnc_rel_bias_bwd_dq", Counting())
    slabs = _grads(kern, q, k, v, {"bias": bias})[0]
    assert launches == [(2, 2), (2, 2), (1, 2)]  # rows 0-31, 32-63, 64-69
    for a, b in zip(slabs, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    kern = attnc.load("alibi", block_m=16, block_n=16)
    g = torch.Generator().manual_seed(7)
    q, k, v = operands(1, 2, 2, 33, 33, 16, 16, torch.float32, g)
    slopes = torch.rand(2, generator=g)

    def step(q, k, v, slopes):
        return kern(q, k, v, slopes=slopes).square().sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, slopes)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for a, b in zip(grads(compiled), grads(step)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_double_backward_is_refused():
    kern = attnc.load("causal", block_m=16, block_n=16)
    g = torch.Generator().manual_seed(8)
    q, k, v = (t.requires_grad_() for t in operands(1, 1, 1, 20, 20, 16, 16, torch.float32, g))
    dq, = torch.autograd.grad(kern(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


def test_inputs_never_require_grad():
    kern = attnc.load("document", block_m=16, block_n=16)
    q, k, v = operands(1, 1, 1, 20, 20, 16, 16, torch.float32, torch.Generator().manual_seed(9))
    doc = torch.zeros(1, 20).requires_grad_()
    with pytest.raises(ValueError, match="doc is an input"):
        kern(q, k, v, doc=doc)


def test_score_without_derivative_runs_forward_and_refuses_backward():
    kern = attnc.compile("attention stepped {\n  param p[h]\n"
                         "  score = dot(q, k) * scale + p[h] % 1.5\n}\n")
    q, k, v = (t.requires_grad_() for t in operands(1, 2, 2, 20, 20, 16, 16, torch.float32,
                                                    torch.Generator().manual_seed(10)))
    p = torch.rand(2) * 4
    out = kern(q, k, v, p=p)
    s = q @ k.transpose(-1, -2) / 4.0 + torch.remainder(p, 1.5).view(1, 2, 1, 1)
    assert rel_error(out, torch.softmax(s, -1) @ v) < 1e-5
    assert "no backward" in kern.ir("kernel")
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()
