"""The reference interpreter on general cascades: a mask restricts reductions and scans over m
or n to the visible pairs, scans are inclusive prefix / suffix sums, stabilizer marks change
nothing, any einsum can be an output, and a ScatterSum sums each term over the ranks it uses.
Each is compared with torch code written from the contract's wording (float64)."""

from __future__ import annotations

import math
from dataclasses import replace

import sympy
import torch

from attnc.backends.reference.cascade import intermediates, interpret
from attnc.expr import symbols as S
from attnc.ir.cascade import (OPERAND_DECLS, Cascade, Einsum, Reduce, ScatterSum, TensorDecl,
                              TensorKind, verify)

m, n = S.m, S.n
B, H, M, N, D, DV = 1, 2, 5, 6, 3, 2
MASK = n <= m - 2  # rows 0 and 1 see no key; key n is seen by rows n + 2 ...
VISIBLE = torch.arange(N)[None, :] <= torch.arange(M)[:, None] - 2


def at(name, *ranks):
    return S.at(name, *ranks)


QK = Einsum("QK", ("m", "n"), at("Q", "m", "e") * at("K", "n", "e"), Reduce.SUM, ("e",))


def cascade(nodes, outputs, mask=MASK, params=()) -> Cascade:
    decls = OPERAND_DECLS + tuple(TensorDecl(p, TensorKind.PARAM, dims) for p, dims in params)
    c = Cascade("general", decls, tuple(nodes), tuple(outputs), mask=mask)
    verify(c)
    return c


def operands(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, N, DV, generator=g, dtype=torch.float64))


def test_reductions_over_n_and_m_see_only_visible_pairs():
    nodes = [QK, Einsum("SUM", ("m",), at("QK", "m", "n"), Reduce.SUM, ("n",)),
             Einsum("MAX", ("m",), at("QK", "m", "n"), Reduce.MAX, ("n",)),
             Einsum("MIN", ("m",), at("QK", "m", "n"), Reduce.MIN, ("n",)),
             Einsum("COL", ("n",), at("QK", "m", "n"), Reduce.SUM, ("m",)),
             Einsum("AV", ("m", "f"), at("QK", "m", "n") * at("V", "n", "f"), Reduce.SUM,
                    ("n",))]
    c = cascade(nodes, [("out", "AV"), ("lse", "MAX")])
    q, k, v = operands()
    env = intermediates(c, q, k, v)
    qk = q @ k.transpose(-1, -2)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    torch.testing.assert_close(env["SUM"], torch.where(VISIBLE, qk, 0.0).sum(-1))
    torch.testing.assert_close(env["MAX"], torch.where(VISIBLE, qk, -inf).amax(-1))
    torch.testing.assert_close(env["MIN"], torch.where(VISIBLE, qk, inf).amin(-1))
    torch.testing.assert_close(env["COL"], torch.where(VISIBLE, qk, 0.0).sum(-2))
    torch.testing.assert_close(env["AV"], torch.where(VISIBLE, qk, 0.0) @ v)
    assert (env["MAX"][..., :2] == -math.inf).all() and (env["SUM"][..., :2] == 0).all()
    # any einsum can be an output; the map QK is evaluated at every pair
    res = interpret(c, q, k, v)
    assert torch.equal(res["lse"], env["MAX"]) and torch.equal(env["QK"], qk)


def _scan(values, visible, dim, reverse):
    """The contract's wording, one element at a time: the sum of visible values at j <= i
    (cumsum) or j >= i (rcumsum) along `dim`."""
    x = torch.where(visible, values, 0.0).movedim(dim, -1)
    out = torch.zeros_like(x)
    for i in range(x.shape[-1]):
        part = x[..., i:] if reverse else x[..., :i + 1]
        out[..., i] = part.sum(-1)
    return out.movedim(-1, dim)


def test_scans_along_n_and_m_skip_invisible_pairs():
    nodes = [QK] + [Einsum(f"{op.value}_{r}", ("m", "n"), at("QK", "m", "n"), op, (r,))
                    for op in (Reduce.CUMSUM, Reduce.RCUMSUM) for r in ("m", "n")]
    nodes.append(Einsum("AV", ("m", "f"), sum(at(nd.name, "m", "n") for nd in nodes[1:])
                        * at("V", "n", "f"), Reduce.SUM, ("n",)))
    c = cascade(nodes, [("out", "AV")])
    q, k, v = operands(1)
    env = intermediates(c, q, k, v)
    qk = q @ k.transpose(-1, -2)
    for op, reverse in (("cumsum", False), ("rcumsum", True)):
        for r, dim in (("m", -2), ("n", -1)):
            torch.testing.assert_close(env[f"{op}_{r}"], _scan(qk, VISIBLE, dim, reverse))


def test_stabilizer_marks_change_nothing():
    s = S.scale * at("QK", "m", "n")
    nodes = [QK, Einsum("GM", ("m",), s, Reduce.MAX, ("n",)),
             Einsum("SD", ("m",), sympy.exp(s - at("GM", "m")), Reduce.SUM, ("n",)),
             Einsum("AV", ("m", "f"), sympy.exp(s - at("GM", "m")) * at("V", "n", "f")
                    / at("SD", "m"), Reduce.SUM, ("n",))]
    c = cascade(nodes, [("out", "AV")], mask=n <= m)
    marked = c.with_nodes([replace(nd, stabilizer="GM") if nd.name in ("SD", "AV") else nd
                           for nd in c.nodes])
    verify(marked)
    q, k, v = operands(2)
    want = torch.softmax(torch.where(torch.arange(N)[None] <= torch.arange(M)[:, None],
                                     (q @ k.transpose(-1, -2)) / math.sqrt(D), -math.inf),
                         -1) @ v
    torch.testing.assert_close(interpret(c, q, k, v)["out"], want)
    assert torch.equal(interpret(marked, q, k, v)["out"], interpret(c, q, k, v)["out"])


def test_scatter_sum_sums_over_the_ranks_a_term_uses():
    """A term of rank [m] is summed over m only, one of rank [m, n] over the visible pairs."""
    c = cascade([QK, Einsum("R", ("m",), at("QK", "m", "n"), Reduce.SUM, ("n",)),
                 Einsum("AV", ("m", "f"), at("V", "n", "f"), Reduce.SUM, ("n",)),
                 ScatterSum("d_w", "w", (((S.h,), at("R", "m")),
                                         ((S.h,), at("QK", "m", "n")),
                                         ((m,), at("QK", "m", "n") * 2)))],
                [("out", "AV"), ("d_w", "d_w")], params=(("w", (S.M,)),))
    q, k, v = operands(3)
    param = torch.zeros(M, dtype=torch.float64)
    got = interpret(c, q, k, v, inputs={"w": param})["d_w"]
    qk = torch.where(VISIBLE, q @ k.transpose(-1, -2), 0.0)
    per_head = qk.sum((-1, -2))[0]  # [H]: the [m] term and the [m, n] term are equal sums
    want = torch.zeros(M, dtype=torch.float64)
    want[:H] += 2 * per_head
    want += 2 * qk.sum(-1).sum((0, 1))
    torch.testing.assert_close(got, want)


def test_interpret_is_differentiable_through_masks_and_scans():
    nodes = [QK, Einsum("T", ("m", "n"), sympy.tanh(at("QK", "m", "n"))),
             Einsum("CS", ("m", "n"), at("T", "m", "n"), Reduce.CUMSUM, ("n",)),
             Einsum("GM", ("m",), at("CS", "m", "n"), Reduce.MAX, ("n",)),
             Einsum("AV", ("m", "f"), at("CS", "m", "n") * at("V", "n", "f"), Reduce.SUM,
                    ("n",))]
    c = cascade(nodes, [("out", "AV")])
    q, k, v = (t.requires_grad_() for t in operands(4))
    out = interpret(c, q, k, v)["out"]
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][..., :2, :] == 0).all()  # rows that see no key
