"""General cascades written by hand, end to end: compiled, run forward and backward through
Triton's interpreter, and compared with torch code written from each variant's math (never
from attnc's IR). These are the issue's examples: a masked softmax cascade (which still takes
the FlashAttention kernel), standardized scores in two passes or one, Sinkhorn normalization,
grouped normalization over an extra rank, a forgetting gate (a scan along n), and a cascade
whose output is an epilogue of its normalized result.
"""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.runtime.cascade import CascadeKernel

B, H, HKV, D = 1, 2, 1, 16


def _data(M, N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g)
    k, v = (torch.randn(B, HKV, N, D, generator=g) for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _heads(x):
    return x.repeat_interleave(H // HKV, 1)


def _scores(q, k):
    return q.double() @ _heads(k).double().transpose(-1, -2) / D ** 0.5


def _rel(a, b) -> float:
    """||a - b|| / ||b|| (the absolute error where b is 0: a gradient that must vanish)."""
    diff, size = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / size if size > 0 else diff


def _check(kernel, ref_fn, M, N, tol=1e-5, inputs=None, dtype=torch.float32):
    """Forward and every gradient (q, k, v and float inputs) against `ref_fn` (float64)."""
    q, k, v = _data(M, N, dtype=dtype)
    inputs = inputs or {}
    out = kernel(q, k, v, **inputs)
    assert torch.isfinite(out).all()
    leaves = [q, k, v] + [t for t in inputs.values() if t.requires_grad]
    ref = ref_fn(q, k, v, **inputs)
    assert _rel(out, ref) < tol
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    want = torch.autograd.grad(ref, leaves, dout.double())
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and _rel(a, b) < tol * 10


def test_a_masked_softmax_cascade_takes_the_softmax_kernel():
    text = ("cascade msm {\n  mask = n <= m + N - M\n  QK[m, n] = Q[m, e] * K[n, e] * scale\n"
            "  GM[m] = max(n) QK[m, n]\n  SN[m, n] = exp(QK[m, n] - GM[m])\n"
            "  SD[m] = sum(n) SN[m, n]\n  A[m, n] = SN[m, n] / SD[m]\n"
            "  AV[m, f] = sum(n) A[m, n] * V[n, f]\n}\n")
    kernel = attnc.compile(text)
    assert not isinstance(kernel, CascadeKernel)  # the mask moved into the online softmax

    def ref(q, k, v):
        s = _scores(q, k)
        vis = torch.ones(s.shape[-2:], dtype=torch.bool).tril(s.shape[-1] - s.shape[-2])
        return torch.softmax(s.masked_fill(~vis, -torch.inf), -1) @ _heads(v).double()
    _check(kernel, ref, 24, 40)


NAIVE_STANDARDIZE = """cascade naive_std {
  QK[m, n] = Q[m, e] * K[n, e] * scale
  MU[m] = sum(n) QK[m, n] / N
  VAR[m] = sum(n) (QK[m, n] - MU[m]) ** 2 / N
  A[m, n] = (QK[m, n] - MU[m]) / sqrt(VAR[m] + 0.000001)
  O[m, f] = sum(n) A[m, n] * V[n, f]
}
"""
RUNNING_STANDARDIZE = """cascade running_std {
  QK[m, n] = Q[m, e] * K[n, e] * scale
  S1[m] = sum(n) QK[m, n]
  S2[m] = sum(n) QK[m, n] ** 2
  SV[m, f] = sum(n) QK[m, n] * V[n, f]
  V1[m, f] = sum(n) V[n, f]
  MU[m] = S1[m] / N
  SIG[m] = sqrt(S2[m] / N - MU[m] ** 2 + 0.000001)
  O[m, f] = (SV[m, f] - MU[m] * V1[m, f]) / SIG[m]
}
"""


@pytest.mark.parametrize("text,kernels", [(NAIVE_STANDARDIZE, 2), (RUNNING_STANDARDIZE, 1)])
def test_standardized_scores_in_as_many_kernels_as_passes(text, kernels):
    kernel = attnc.compile(text)
    assert len(kernel.plan.forward) == kernels

    def ref(q, k, v):
        s = _scores(q, k)
        mu = s.mean(-1, keepdim=True)
        a = (s - mu) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return a @ _heads(v).double()
    _check(kernel, ref, 24, 33, tol=1e-4)


SINKHORN_2 = """cascade sinkhorn2 {
  QK[m, n] = Q[m, e] * K[n, e] * scale
  LR1[m] = -log(sum(n) exp(QK[m, n]))
  LC1[n] = -log(sum(m) exp(QK[m, n] + LR1[m]))
  LR2[m] = -log(sum(n) exp(QK[m, n] + LC1[n]))
  LC2[n] = -log(sum(m) exp(QK[m, n] + LR2[m]))
  O[m, f] = sum(n) exp(QK[m, n] + LR2[m] + LC2[n]) * V[n, f]
}
"""


def test_sinkhorn_iterations_alternate_row_and_column_kernels():
    kernel = attnc.compile(SINKHORN_2)
    assert [sk.parallel for sk in kernel.plan.forward] == ["m", "n", "m", "n", "m"]

    def ref(q, k, v):
        e = torch.exp(_scores(q, k))
        for _ in range(2):
            e = e / e.sum(-1, keepdim=True)
            e = e / e.sum(-2, keepdim=True)
        return e @ _heads(v).double()
    _check(kernel, ref, 20, 28, tol=1e-4)


GROUPED = """cascade grouped2 {
  option G = 3
  param w[H, G]
  input grp[B, N]
  rank c = G
  mask = n <= m
  QK[m, n] = Q[m, e] * K[n, e] * scale
  E[m, n, c] = where(grp[b, n] == c, exp(QK[m, n]), 0)
  Z[m, c] = sum(n) E[m, n, c]
  AV[m, f, c] = sum(n) E[m, n, c] * V[n, f]
  WZ[m] = sum(c) where(Z[m, c] > 0, exp(w[h, c]), 0)
  O[m, f] = sum(c) where(Z[m, c] > 0, exp(w[h, c]) * AV[m, f, c] / Z[m, c], 0) / WZ[m]
}
"""


def test_grouped_normalization_over_an_extra_rank():
    kernel = attnc.compile(GROUPED)
    assert len(kernel.plan.forward) == 1
    g = torch.Generator().manual_seed(3)
    w = torch.randn(H, 3, generator=g, dtype=torch.float64).requires_grad_()
    grp = torch.randint(0, 3, (B, 30), generator=g)

    def ref(q, k, v, w, grp):
        e = torch.exp(_scores(q, k)).tril()
        out = 0
        weights = []
        for c in range(3):
            ec = e * (grp[:, None, None, :] == c)
            z = ec.sum(-1, keepdim=True)
            seen = (z > 0).double()
            weights.append(torch.exp(w[:, c])[None, :, None, None] * seen)
            out = out + weights[-1] * (ec / torch.where(z > 0, z, 1)) @ _heads(v).double()
        return out / sum(weights)
    _check(kernel, ref, 30, 30, tol=1e-4, inputs={"w": w, "grp": grp})


FORGETTING = """cascade forgetting {
  input logf[B, H, N]
  mask = n <= m
  QK[m, n] = Q[m, e] * K[n, e] * scale
  D[m, n] = rcumsum(n) logf[b, h, n]
  S[m, n] = QK[m, n] + D[m, n] - logf[b, h, n]
  GM[m] = max(n) S[m, n]
  SN[m, n] = exp(S[m, n] - GM[m])
  O[m, f] = sum(n) SN[m, n] * V[n, f] / sum(n) SN[m, n]
}
"""


def test_a_forgetting_gate_is_a_scan_along_the_keys():
    """Forgetting Transformer: s_ij + sum of log f_l over j < l <= i, a suffix scan of the
    gate along n under the causal mask (walked from the diagonal down). Its dk/dv kernel,
    parallel over keys, resumes the scan from the carries the dq kernel stored per key tile."""
    kernel = attnc.compile(FORGETTING)
    assert len(kernel.plan.forward) == 1
    assert [sk.stage.resumes for sk in kernel.plan.backward][-1]
    logf = torch.nn.functional.logsigmoid(
        torch.randn(B, H, 26, generator=torch.Generator().manual_seed(5)))

    def ref(q, k, v, logf):
        c = torch.cumsum(logf.double(), -1)  # sum_{l <= i}
        s = _scores(q, k) + c[..., :, None] - c[..., None, :]
        s = s.masked_fill(~torch.ones(26, 26, dtype=torch.bool).tril(), -torch.inf)
        return torch.softmax(s, -1) @ _heads(v).double()
    _check(kernel, ref, 26, 26, inputs={"logf": logf})


def test_a_cascade_output_may_be_an_epilogue_of_its_normalized_result():
    text = ("cascade gated {\n  param g[H]\n  QK[m, n] = Q[m, e] * K[n, e] * scale\n"
            "  W[m, n] = sigmoid(QK[m, n])\n  AV[m, f] = sum(n) W[m, n] * V[n, f]\n"
            "  O[m, f] = tanh(AV[m, f]) * g[h]\n}\n")
    kernel = attnc.compile(text)
    g = torch.linspace(0.5, 1.5, H, dtype=torch.float64).requires_grad_()

    def ref(q, k, v, g):
        return torch.tanh(torch.sigmoid(_scores(q, k)) @ _heads(v).double()) * g[:, None, None]
    _check(kernel, ref, 24, 24, inputs={"g": g})


def test_fully_masked_rows_give_zero_and_finite_gradients():
    text = ("attention late {\n  mask = n <= m - 8\n  normalize = l1(softplus)\n}\n")
    kernel = attnc.compile(text)
    q, k, v = _data(20, 20)
    out = kernel(q, k, v)
    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in grads)
    assert torch.equal(grads[0][:, :, :8], torch.zeros_like(grads[0][:, :, :8]))


def test_bf16_runs_with_bf16_tolerances():
    kernel = attnc.compile(RUNNING_STANDARDIZE)
    q, k, v = _data(24, 24, dtype=torch.bfloat16)
    s = _scores(q, k)
    a = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True)
                                                    + 1e-6)
    out = kernel(q, k, v)
    assert out.dtype == torch.bfloat16 and _rel(out, a @ _heads(v).double()) < 3e-2


def test_weights_that_read_neither_q_nor_k():
    text = ("cascade gauss {\n  option width = 4.0\n  mask = n <= m\n"
            "  W[m, n] = exp(-((m - n) / width) ** 2)\n"
            "  O[m, f] = sum(n) W[m, n] * V[n, f] / sum(n) W[m, n]\n}\n")
    kernel = attnc.compile(text)

    def ref(q, k, v):
        i = torch.arange(30, dtype=torch.float64)
        w = torch.exp(-((i[:, None] - i[None, :]) / 4) ** 2).tril()
        return (w / w.sum(-1, keepdim=True)) @ _heads(v).double() + 0 * (q.sum() + k.sum())
    _check(kernel, ref, 30, 30)


@pytest.mark.parametrize("options,what", [
    ({"block_sparse": True}, "block_sparse=True applies to softmax kernels"),
    ({"autotune": True}, "autotune=True applies to softmax and linear kernels"),
    ({"block_m": 24}, "block_m must be a power of two >= 16, got 24"),
    ({"num_stages": 2}, "num_stages does not apply to a general cascade's kernels"),
])
def test_launch_options_a_general_cascade_does_not_take_are_refused(options, what):
    with pytest.raises(ValueError, match=what):
        attnc.compile("attention s {\n  normalize = sigmoid\n}\n", **options)


def test_return_lse_without_an_lse_is_refused():
    kernel = attnc.compile("attention s {\n  normalize = sigmoid\n}\n")
    q, k, v = _data(8, 8)
    with pytest.raises(ValueError, match="return_lse=True, but this cascade has no lse"):
        kernel(q, k, v, return_lse=True)


def test_inference_stores_none_of_the_backwards_residuals():
    """sink_softmax's backward reads the running max, the unnormalized sums, ...: stored only
    when a gradient is due (the SAVE constexpr), with the same output either way."""
    kernel = attnc.load("sink_softmax")
    saves = [name for sk in kernel.plan.forward for name in sk.saves]
    assert saves
    q, k, v = _data(24, 24)
    sinks = torch.zeros(H)
    with torch.no_grad():
        lean = kernel.forward_memory(q, k, v, [sinks], 0.25, save=False)
    full = kernel.forward_memory(q.detach(), k.detach(), v.detach(), [sinks], 0.25)
    assert all(lean[name].numel() == 0 < full[name].numel() for name in saves)
    assert torch.equal(lean[kernel.plan.out], full[kernel.plan.out])
    with torch.no_grad():
        assert torch.equal(kernel(q, k, v, sinks=sinks, scale=0.25),
                           full[kernel.plan.out].to(q.dtype))
