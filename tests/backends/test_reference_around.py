"""The reference interpreters (`interpret` at every cascade stage, `run_kernel` on the kernel IR)
apply what a spec says around its score, checked against dense torch formulas written here from
the math (README "The spec language"; attnc/ir/around.py), in float64 on ragged shapes with GQA
and tiles smaller than the lengths. Also: torch autograd flows through them into operands and
params, the backward interpreters refuse a kernel with something around its score, and
check_around (`attnc check`'s comparison for such kernels) passes a compiled kernel and fails a
wrong one."""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.backends.reference.check_around import check_around
from attnc.backends.reference.cascade import interpret, run_kernel, run_kernel_backward
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.cascade import Cascade
from attnc.pipeline import run_passes

B, HQ, HKV, M, N, D, DV = 2, 4, 2, 21, 27, 8, 6
TILES = (8, 8)
THETA = 100.0


def _trail(src: str):
    return run_passes(lower(parse(src), src))


def _randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _rope_half(x, pos, dims):
    """Pairs (i, i + dims/2) of the first dims features turned by pos * THETA^(-2i/dims)."""
    half = dims // 2
    out = x.clone()
    for i in range(half):
        ang = pos * THETA ** (-2 * i / dims)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., i + half] = b * torch.cos(ang) + a * torch.sin(ang)
    return out


def _rope_pairs(x, pos):
    """Pairs (2i, 2i + 1) of all features."""
    dims = x.shape[-1]
    out = x.clone()
    for i in range(dims // 2):
        ang = pos * THETA ** (-2 * i / dims)
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., 2 * i + 1] = b * torch.cos(ang) + a * torch.sin(ang)
    return out


def _unit(x):
    return x / torch.sqrt((x ** 2).sum(-1, keepdim=True) + 1e-6)


def _softmax(s):
    """Softmax over the keys with -inf hidden; rows that see nothing: out 0, lse -inf."""
    lse = torch.logsumexp(s, -1)
    w = torch.where(torch.isneginf(s), 0.0, torch.exp(s - lse[..., None].nan_to_num(0.0)))
    return w, lse


def _check(src, inputs, q, k, v, want_out, want_lse=None):
    trail = _trail(src)
    assert not trail[-1][1].around.plain
    for name, ir in trail:
        if isinstance(ir, Cascade):
            tiles = None if name == "desugar" else TILES
            got = interpret(ir, q, k, v, inputs=inputs, tiles=tiles)
        else:
            got = run_kernel(ir, q, k, v, inputs=inputs, tiles=TILES)
        torch.testing.assert_close(got["out"], want_out, rtol=1e-9, atol=1e-9, msg=name)
        if want_lse is not None:
            torch.testing.assert_close(got["lse"], want_lse, rtol=1e-9, atol=1e-9, msg=name)


ROPE_QKNORM = """
attention rope_qknorm {
  option theta = 100.0
  input pos_q[b, m], pos_k[b, n]
  param gq[d], gk[h, d], temp[b, h, m], vs[b, h, n]
  q = rope(l2norm(q, gq[d]), pos_q[b, m], theta, 4)
  q = q * temp[b, h, m]
  k = rope_interleaved(k, pos_k[b, n], theta)
  k = l2norm(k, gk[h, d])
  v = v / vs[b, h, n]
  mask = n <= m + 3
}
"""


def test_prologues_rope_l2norm_and_row_scales():
    g = torch.Generator().manual_seed(0)
    q, k, v = _randn(B, HQ, M, D, g=g), _randn(B, HKV, N, D, g=g), _randn(B, HKV, N, DV, g=g)
    inputs = {"pos_q": torch.randint(0, 50, (B, M), generator=g),
              "pos_k": torch.randint(0, 50, (B, N), generator=g),
              "gq": _randn(D, g=g), "gk": _randn(HQ, D, g=g),
              "temp": _randn(B, HQ, M, g=g), "vs": 1.5 + torch.rand(B, HQ, N, generator=g,
                                                                  dtype=torch.float64)}
    qt = _rope_half(_unit(q) * inputs["gq"], inputs["pos_q"][:, None, :].double(), 4)
    qt = qt * inputs["temp"][..., None]
    # key-side rows are per K/V head: h in gk[h, d] and vs[b, h, n] is the K/V head
    kt = _unit(_rope_pairs(k, inputs["pos_k"][:, None, :].double())) * inputs["gk"][None, :HKV,
                                                                                   None, :]
    vt = v / inputs["vs"][:, :HKV, :, None]
    heads = torch.arange(HQ) // (HQ // HKV)
    s = qt @ kt[:, heads].transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~(torch.arange(N) <= torch.arange(M)[:, None] + 3), -math.inf)
    w, lse = _softmax(s)
    _check(ROPE_QKNORM, inputs, q, k, v, w @ vt[:, heads], lse)


def test_several_dots_a_key_value_operand_a_gate_and_a_head_map():
    src = """
attention mla_like {
  operand qr[m], kr[n], c[n]
  input hmap[h]
  param gt[b, h, m]
  score = tanh((dot(q, c) + 2 * dot(qr, kr)) * scale)
  v = c
  gate = sigmoid(gt[b, h, m])
  kv_head = hmap[h]
  mask = n <= m
}
"""
    g = torch.Generator().manual_seed(1)
    q, c = _randn(B, HQ, M, D, g=g), _randn(B, HKV, N, D, g=g)
    qr, kr = _randn(B, HQ, M, 4, g=g), _randn(B, HKV, N, 4, g=g)
    hmap = torch.tensor([1, 0, 1, 1])
    gt = _randn(B, HQ, M, g=g)
    s = (q @ c[:, hmap].transpose(-1, -2) + 2 * qr @ kr[:, hmap].transpose(-1, -2))
    s = torch.tanh(s / math.sqrt(D))
    s = s.masked_fill(~(torch.arange(N) <= torch.arange(M)[:, None]), -math.inf)
    w, lse = _softmax(s)
    out = (w @ c[:, hmap]) * torch.sigmoid(gt)[..., None]
    inputs = {"qr": qr, "kr": kr, "c": c, "hmap": hmap, "gt": gt}
    _check(src, inputs, q, c, None, out, lse)


@pytest.mark.parametrize("block", [1, 4])
def test_gathered_keys_and_the_rest_of_the_mask(block):
    key = "n" if block == 1 else f"n // {block}"
    row = "m" if block == 1 else "m // 4"
    rows = M if block == 1 else -(-M // 4)
    src = f"""
attention gathered {{
  input idx[b, h, {rows}, 5]
  mask = n <= m and {key} in idx[b, h, {row}, :]
}}
"""
    g = torch.Generator().manual_seed(2)
    q, k, v = _randn(B, HQ, M, D, g=g), _randn(B, HKV, N, D, g=g), _randn(B, HKV, N, DV, g=g)
    idx = torch.randint(-1, N // block, (B, HQ, rows, 5), generator=g)
    idx[:, :, 0] = -1  # query row (block) 0 lists nothing: out 0, lse -inf
    listed = torch.zeros(B, HQ, M, N, dtype=torch.bool)
    for b in range(B):
        for h in range(HQ):
            for m in range(M):
                for j in idx[b, h, m // block if block > 1 else m]:
                    if j >= 0:
                        listed[b, h, m, j * block:(j + 1) * block] = True
    heads = torch.arange(HQ) // (HQ // HKV)
    s = q @ k[:, heads].transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~(listed & (torch.arange(N) <= torch.arange(M)[:, None])), -math.inf)
    w, lse = _softmax(s)
    _check(src, {"idx": idx}, q, k, v, w @ v[:, heads], lse)


def test_head_mixing_before_and_after_the_softmax():
    src = """
attention mixing {
  param wpre[h, h], wpost[h, h], a[b, m, h], c[b, m, h]
  premix = wpre[h, g] + a[b, m, h] * c[b, m, g]
  postmix = wpost[h, g]
  mask = n <= m
}
"""
    g = torch.Generator().manual_seed(3)
    q, k, v = _randn(B, HQ, M, D, g=g), _randn(B, HKV, N, D, g=g), _randn(B, HKV, N, DV, g=g)
    inputs = {"wpre": _randn(HQ, HQ, g=g), "wpost": _randn(HQ, HQ, g=g),
              "a": _randn(B, M, HQ, g=g), "c": _randn(B, M, HQ, g=g)}
    heads = torch.arange(HQ) // (HQ // HKV)
    raw = q @ k[:, heads].transpose(-1, -2) / math.sqrt(D)
    pre = inputs["wpre"][None, :, :, None] + torch.einsum("bmh,bmg->bhgm", inputs["a"],
                                                           inputs["c"])
    s = torch.einsum("bhgm,bgmn->bhmn", pre, raw)
    s = s.masked_fill(~(torch.arange(N) <= torch.arange(M)[:, None]), -math.inf)
    w, lse = _softmax(s)
    w = torch.einsum("hg,bgmn->bhmn", inputs["wpost"], w)
    _check(src, inputs, q, k, v, w @ v[:, heads], lse)


def test_premixed_scores_under_a_mask_false_everywhere_leave_empty_rows():
    src = "attention empty {\n  param w[h, h]\n  premix = w[h, g]\n  mask = n < 0\n}\n"
    g = torch.Generator().manual_seed(6)
    q, k, v = _randn(1, 2, 5, 4, g=g), _randn(1, 1, 6, 4, g=g), _randn(1, 1, 6, 3, g=g)
    _check(src, {"w": _randn(2, 2, g=g)}, q, k, v, torch.zeros(1, 2, 5, 3, dtype=torch.float64),
           torch.full((1, 2, 5), -math.inf, dtype=torch.float64))


def test_gradients_flow_through_interpret_into_operands_and_params():
    src = """
attention grads {
  operand qr[m], kr[n]
  param gq[h, d], temp[h]
  q = l2norm(q, gq[h, d]) * temp[h]
  score = (dot(q, k) + dot(qr, kr)) * scale
  mask = n <= m
}
"""
    g = torch.Generator().manual_seed(4)
    leaves = {"q": _randn(1, 2, 5, 4, g=g), "k": _randn(1, 1, 6, 4, g=g),
              "v": _randn(1, 1, 6, 3, g=g), "qr": _randn(1, 2, 5, 2, g=g),
              "kr": _randn(1, 1, 6, 2, g=g), "gq": _randn(2, 4, g=g),
              "temp": _randn(2, g=g)}
    for x in leaves.values():
        x.requires_grad_(True)
    cascade = dict(_trail(src))["autodiff"]

    def fn(q, k, v, qr, kr, gq, temp):
        return interpret(cascade, q, k, v, inputs={"qr": qr, "kr": kr, "gq": gq,
                                                   "temp": temp})["out"]

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


def test_the_backward_interpreter_refuses_what_it_cannot_apply():
    kernel = dict(_trail(ROPE_QKNORM))["fuse"]
    with pytest.raises(ValueError, match="differentiate run_kernel with torch autograd"):
        run_kernel_backward(kernel, *(torch.zeros(1, 1, 4, 8, dtype=torch.float64),) * 3,
                            saved={})


class _Off:
    """A kernel whose output is 1% off: check_around must notice."""

    def __init__(self, kernel):
        self.kernel, self.kernel_ir, self._trail = kernel, kernel.kernel_ir, kernel._trail

    def __call__(self, *args, **kwargs):
        out, lse = self.kernel(*args, **kwargs)
        return out * 1.01, lse


def test_check_around_compares_a_kernel_with_the_reference():
    kernel = attnc.compile("""
attention checked {
  operand qr[m], kr[n]
  input pos[b, m], posk[b, n], hmap[h]
  param gq[h, d], gt[b, h, m]
  q = rope(l2norm(q, gq[h, d]), pos[b, m], 100.0)
  k = rope(k, posk[b, n], 100.0)
  score = (dot(q, k) + dot(qr, kr)) * scale
  gate = sigmoid(gt[b, h, m])
  kv_head = hmap[h]
  mask = n <= m
}
""", block_m=16, block_n=16)
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 2, 19, 8, generator=g), torch.randn(1, 2, 23, 8, generator=g), \
        torch.randn(1, 2, 23, 8, generator=g)
    for wrapped, ok in ((kernel, True), (_Off(kernel), False)):
        res = check_around(wrapped, q, k, v, dtype=torch.float32, device="cpu",
                           generator=torch.Generator().manual_seed(0), tolerance=1e-4)
        assert res["ok"] is ok, res
        assert res["grad_rel_error"] is not None
