"""Stage kernels of general cascades, generated from schedules written by hand.

The scheduler is bypassed: each test lowers a cascade, writes its stages itself, fuses and
runs the generated kernels through Triton's interpreter, and compares with torch code written
from the math. So the code generator is tested on its own contract (layouts, accumulators,
stabilized sums, scans in either order, stages in either direction, GQA, param and input loads,
mask bounds), whatever the scheduler chooses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnc.expr import symbols as S
from attnc.ir.cascade import Order, Reduce, Stage
from attnc.passes import fuse, mask_bounds
from attnc.pipeline import frontend, read_spec, verify_ir
from attnc.runtime.cascade import CascadeKernel

QK = "  QK[m, n] = Q[m, e] * K[n, e]\n  S[m, n] = QK[m, n] * scale\n"


def _kernel(text: str, stages, mask=None, edit=None) -> CascadeKernel:
    src = read_spec(text)
    _, ir = frontend(src, {})
    c = ir if edit is None else dataclasses.replace(
        ir, nodes=tuple(edit.get(nd.name, lambda x: x)(nd) for nd in ir.nodes))
    c = mask_bounds.run(dataclasses.replace(c, mask=mask))
    c = dataclasses.replace(c, stages=tuple(stages))
    verify_ir(c)
    plan = fuse.run(c)
    verify_ir(plan)
    return CascadeKernel(src, {}, ir, [("fuse", plan)], {}, None)


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _qkv(B, H, Hk, M, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, D, generator=g), torch.randn(B, Hk, N, D, generator=g),
            torch.randn(B, Hk, N, D, generator=g))


def _scores(q, k):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5


def _values(q, v):
    return v.repeat_interleave(q.shape[1] // v.shape[1], 1)


def test_one_stage_sigmoid_with_gqa_and_ragged_lengths():
    text = f"cascade sig {{\n{QK}  W[m, n] = sigmoid(S[m, n])\n" \
           "  O[m, f] = sum(n) W[m, n] * V[n, f]\n}\n"
    kernel = _kernel(text, [Stage("m", "n", ("QK", "S", "W", "O"), ("Q", "K", "V"), ("O",))])
    q, k, v = _qkv(2, 4, 2, 37, 45, 16)
    ref = torch.sigmoid(_scores(q, k)) @ _values(q, v)
    assert _rel(kernel(q, k, v), ref) < 1e-5


def test_stabilized_sums_with_a_sink_and_a_causal_mask_skip_tiles():
    text = (f"cascade sink {{\n{QK}  GM[m] = max(n) S[m, n]\n  SN[m, n] = exp(S[m, n] - GM[m])\n"
            "  SD[m] = sum(n) SN[m, n]\n  AV[m, f] = sum(n) SN[m, n] * V[n, f]\n"
            "  O[m, f] = AV[m, f] / (SD[m] + exp(-GM[m]))\n}\n")
    stab = {name: (lambda nd: dataclasses.replace(nd, stabilizer="GM")) for name in ("SD", "AV")}
    mask = S.n <= S.m + S.N - S.M
    nodes = ("QK", "S", "GM", "SN", "SD", "AV", "O")
    kernel = _kernel(text, [Stage("m", "n", nodes, ("Q", "K", "V"), ("O",))], mask, stab)
    # the loop stops at the diagonal: the mask bounds reached the kernel
    body = kernel.source[kernel.source.index("def attnc_sink_k1"):]
    assert "p_hi" in body.split("\n    hi = ")[1].split("\n")[0]
    q, k, v = _qkv(1, 2, 2, 40, 70, 16)
    q = q * 3  # large scores: the running max must rescale
    s = _scores(q, k)
    vis = torch.arange(70)[None, :] <= torch.arange(40)[:, None] + 30
    e = torch.exp(s.double()).masked_fill(~vis, 0)
    ref = (e / (e.sum(-1, keepdim=True) + 1)) @ v.double()
    assert _rel(kernel(q, k, v), ref) < 1e-5


def test_three_stages_in_both_directions_sinkhorn():
    text = (f"cascade sk {{\n{QK}  RS[m] = sum(n) exp(S[m, n])\n  LR[m] = -log(RS[m])\n"
            "  CS[n] = sum(m) exp(S[m, n] + LR[m])\n  LC[n] = -log(CS[n])\n"
            "  O[m, f] = sum(n) exp(S[m, n] + LR[m] + LC[n]) * V[n, f]\n}\n")
    stages = [Stage("m", "n", ("QK", "S", "RS", "LR"), ("Q", "K"), ("LR",)),
              Stage("n", "m", ("QK", "S", "CS", "LC"), ("Q", "K", "LR"), ("LC",)),
              Stage("m", "n", ("QK", "S", "O"), ("Q", "K", "V", "LR", "LC"), ("O",))]
    kernel = _kernel(text, stages)
    assert kernel.source.count("@triton.jit\ndef attnc_sk_k") == 3
    q, k, v = _qkv(2, 4, 2, 40, 50, 16)
    e = torch.exp(_scores(q, k).double())
    e = e / e.sum(-1, keepdim=True)
    e = e / e.sum(-2, keepdim=True)
    assert _rel(kernel(q, k, v), e @ _values(q, v).double()) < 1e-5


@pytest.mark.parametrize("order", [Order.ASCENDING, Order.DESCENDING])
def test_scans_carry_across_tiles_in_their_order(order):
    """Stick-breaking (a suffix scan, walked from the last key) and its prefix twin."""
    scan = Reduce.RCUMSUM if order is Order.DESCENDING else Reduce.CUMSUM
    text = (f"cascade sb {{\n{QK}  LB[m, n] = -softplus(S[m, n])\n  R[m, n] = LB[m, n] * 1\n"
            "  A[m, n] = sigmoid(S[m, n]) * exp(R[m, n] - LB[m, n])\n"
            "  O[m, f] = sum(n) A[m, n] * V[n, f]\n}\n")
    edit = {"R": lambda nd: dataclasses.replace(nd, reduce=scan, over=("n",))}
    nodes = ("QK", "S", "LB", "R", "A", "O")
    kernel = _kernel(text, [Stage("m", "n", nodes, ("Q", "K", "V"), ("O",), order)],
                     S.n < S.m, edit)
    q, k, v = _qkv(1, 2, 2, 70, 70, 16)
    beta = torch.sigmoid(_scores(q, k).double())
    lb = torch.log1p(-beta).masked_fill(~(torch.arange(70)[None, :] < torch.arange(70)[:, None]),
                                        0)
    run = lb.flip(-1).cumsum(-1).flip(-1) if scan is Reduce.RCUMSUM else lb.cumsum(-1)
    a = (beta * torch.exp(run - lb)).tril(-1)
    assert _rel(kernel(q, k, v), a @ v.double()) < 1e-5
    with pytest.raises(AssertionError):  # a wrong order is a wrong answer, not a silent one
        wrong = Order.ASCENDING if order is Order.DESCENDING else Order.DESCENDING
        bad = _kernel(text, [Stage("m", "n", nodes, ("Q", "K", "V"), ("O",), wrong)],
                      S.n < S.m, edit)
        assert _rel(bad(q, k, v), a @ v.double()) < 1e-5


def test_param_and_input_loads_at_every_level():
    text = (f"cascade grp {{\n  param w[H, 2]\n  input g[B, N]\n  param tau[B, H, M]\n{QK}"
            "  E[m, n] = exp(S[m, n] * tau[b, h, m])\n"
            "  Z0[m] = sum(n) where(g[b, n] == 0, E[m, n], 0)\n"
            "  A0[m, f] = sum(n) where(g[b, n] == 0, E[m, n], 0) * V[n, f]\n"
            "  Z1[m] = sum(n) where(g[b, n] == 1, E[m, n], 0)\n"
            "  A1[m, f] = sum(n) where(g[b, n] == 1, E[m, n], 0) * V[n, f]\n"
            "  O[m, f] = (exp(w[h, 0]) * A0[m, f] / Z0[m] + exp(w[h, 1]) * A1[m, f] / Z1[m])"
            " / (exp(w[h, 0]) + exp(w[h, 1]))\n}\n")
    nodes = ("QK", "S", "E", "Z0", "A0", "Z1", "A1", "O")
    kernel = _kernel(text, [Stage("m", "n", nodes, ("Q", "K", "V", "w", "g", "tau"), ("O",))])
    B, H, M, N = 2, 2, 30, 41
    q, k, v = _qkv(B, H, H, M, N, 16)
    g = torch.Generator().manual_seed(1)
    w, tau = torch.randn(H, 2, generator=g), torch.rand(B, H, M, generator=g)
    ids = (torch.arange(N) % 2).repeat(B, 1)
    e = torch.exp(_scores(q, k).double() * tau[..., None])
    ref = 0
    for c in range(2):
        ec = e * (ids[:, None, None, :] == c)
        ref = ref + torch.softmax(w.double(), -1)[None, :, c, None, None] * (
            ec / ec.sum(-1, keepdim=True)) @ v.double()
    assert _rel(kernel(q, k, v, w=w, g=ids, tau=tau), ref) < 1e-5


def test_bf16_dots_take_the_calls_dtype():
    text = f"cascade sig {{\n{QK}  W[m, n] = sigmoid(S[m, n])\n" \
           "  O[m, f] = sum(n) W[m, n] * V[n, f]\n}\n"
    kernel = _kernel(text, [Stage("m", "n", ("QK", "S", "W", "O"), ("Q", "K", "V"), ("O",))])
    q, k, v = _qkv(1, 2, 2, 33, 33, 32)
    ref = torch.sigmoid(_scores(q.double(), k.double())) @ v.double()
    out = kernel(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 2e-2


def test_a_scan_resumed_from_its_checkpoints_in_a_stage_parallel_over_its_rank():
    """Column sums of stick-breaking weights: the scan along n runs in an m-parallel stage that
    stores its carry per key tile; a stage parallel over n rebuilds it from that carry."""
    text = (f"cascade ck {{\n{QK}  LB[m, n] = -softplus(S[m, n])\n  R[m, n] = LB[m, n] * 1\n"
            "  A[m, n] = sigmoid(S[m, n]) * exp(R[m, n] - LB[m, n])\n"
            "  Z[n] = sum(m) A[m, n]\n"
            "  O[m, f] = sum(n) A[m, n] * Z[n] * V[n, f]\n}\n")
    edit = {"R": lambda nd: dataclasses.replace(nd, reduce=Reduce.RCUMSUM, over=("n",))}
    walk = ("QK", "S", "LB", "R", "A")
    stages = [Stage("m", "n", walk, ("Q", "K"), (), Order.DESCENDING, checkpoints=("R",)),
              Stage("n", "m", walk + ("Z",), ("Q", "K"), ("Z",), resumes=("R",)),
              Stage("m", "n", walk + ("O",), ("Q", "K", "V", "Z"), ("O",), Order.DESCENDING)]
    kernel = _kernel(text, stages, S.n < S.m, edit)
    q, k, v = _qkv(1, 2, 2, 70, 70, 16)
    beta = torch.sigmoid(_scores(q, k).double())
    vis = torch.arange(70)[None, :] < torch.arange(70)[:, None]
    lb = torch.log1p(-beta).masked_fill(~vis, 0)
    a = (beta * torch.exp(lb.flip(-1).cumsum(-1).flip(-1) - lb)).masked_fill(~vis, 0)
    ref = (a * a.sum(-2, keepdim=True)) @ v.double()
    assert _rel(kernel(q, k, v), ref) < 1e-5
