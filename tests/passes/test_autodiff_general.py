"""autodiff on general cascades (no OnlineSoftmax): the backward cascade, run by the reference
interpreter, is the derivative of the forward cascade.

Each cascade below is checked twice in float64: against torch.autograd through the reference
interpreter's forward (which is torch code), and by `torch.autograd.gradcheck` on an autograd
Function whose backward interprets autodiff's cascade. Masks leave some rows (and, for the
column sums, some keys) with no visible pair; the cascades guard their divisions so that the
forward has no infinite value anywhere (torch.autograd would see NaN through torch.where).
Cascades come from DSL text where the DSL has the form, else are built as IR.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import sympy
import torch

from attnc.backends.reference.cascade import interpret, interpret_backward, intermediates
from attnc.expr import symbols as S
from attnc.expr.functions import BY_NAME
from attnc.ir.cascade import (OPERAND_DECLS, Cascade, Einsum, Reduce, Saved, ScatterSum,
                              TensorDecl, TensorKind, verify)
from attnc.passes import autodiff
from attnc.pipeline import frontend, read_spec

m, n = S.m, S.n
OO = sympy.oo


def at(name, *ranks):
    return S.at(name, *ranks)


def where(cond, yes, no):
    return sympy.Piecewise((yes, cond), (no, True))


def guard(x):
    """x, or 1 where x is 0: a denominator of a row that sees no key."""
    return where(sympy.Eq(x, 0), 1, x)


def from_text(text: str, mask=None) -> Cascade:
    c = frontend(read_spec(text), {})[1]
    return replace(c, mask=mask)


def from_nodes(name, nodes, *, params=(), inputs=(), mask=None, lse=None) -> Cascade:
    decls = OPERAND_DECLS + tuple(TensorDecl(p, TensorKind.PARAM, dims) for p, dims in params)
    decls += tuple(TensorDecl(p, TensorKind.INPUT, dims) for p, dims in inputs)
    outputs = (("out", nodes[-1].name),) + ((("lse", lse),) if lse else ())
    c = Cascade(name=name, decls=decls, nodes=tuple(nodes), outputs=outputs, mask=mask)
    verify(c)
    return c


QK = Einsum("QK", ("m", "n"), at("Q", "m", "e") * at("K", "n", "e"), Reduce.SUM, ("e",))
SCORE = S.scale * at("QK", "m", "n")
CAUSAL_GAP = n <= m - 2  # rows 0 and 1 see no key

SIGMOID = """cascade sigmoid_w {
  param p[H]
  QK[m, n] = Q[m, e] * K[n, e]
  W[m, n]  = sigmoid(QK[m, n] * scale + p[h])
  AV[m, f] = sum(n) W[m, n] * V[n, f]
}
"""

# l1 normalization of softplus weights, divided after the sum (one pass over n)
L1_LATE = """cascade l1_late {
  QK[m, n] = Q[m, e] * K[n, e]
  W[m, n]  = softplus(QK[m, n] * scale)
  Z[m]     = sum(n) W[m, n]
  NV[m, f] = sum(n) W[m, n] * V[n, f]
  O[m, f]  = NV[m, f] / where(Z[m] == 0, 1, Z[m])
}
"""

# standardization from running sums: sum, sum of squares and count in one pass
STANDARDIZE_RUNNING = """cascade standardize_running {
  QK[m, n] = Q[m, e] * K[n, e]
  S1[m]    = sum(n) QK[m, n] * scale
  S2[m]    = sum(n) (QK[m, n] * scale) ** 2
  CN[m]    = sum(n) where(m < M and n < N, 1, 0)
  MU[m]    = S1[m] / where(CN[m] == 0, 1, CN[m])
  VR[m]    = S2[m] / where(CN[m] == 0, 1, CN[m]) - MU[m] ** 2
  W[m, n]  = (QK[m, n] * scale - MU[m]) / sqrt(VR[m] + 0.01)
  AV[m, f] = sum(n) W[m, n] * V[n, f]
}
"""

# two passes: the mean first, then the variance around it
STANDARDIZE_TWO_PASS = """cascade standardize_two_pass {
  QK[m, n] = Q[m, e] * K[n, e]
  S1[m]    = sum(n) QK[m, n] * scale
  CN[m]    = sum(n) where(m < M and n < N, 1, 0)
  MU[m]    = S1[m] / where(CN[m] == 0, 1, CN[m])
  VR[m]    = sum(n) (QK[m, n] * scale - MU[m]) ** 2 / where(CN[m] == 0, 1, CN[m])
  W[m, n]  = (QK[m, n] * scale - MU[m]) / sqrt(VR[m] + 0.01)
  AV[m, f] = sum(n) W[m, n] * V[n, f]
}
"""

# one Sinkhorn iteration: rows, then columns (a sum over m), then the output
SINKHORN = """cascade sinkhorn_1 {
  QK[m, n] = Q[m, e] * K[n, e]
  E[m, n]  = exp(QK[m, n] * scale)
  R[m]     = sum(n) E[m, n]
  E1[m, n] = E[m, n] / where(R[m] == 0, 1, R[m])
  C[n]     = sum(m) E1[m, n]
  E2[m, n] = E1[m, n] / where(C[n] == 0, 1, C[n])
  AV[m, f] = sum(n) E2[m, n] * V[n, f]
}
"""

# a param read per row: a gate on each query's output
ROW_GATE = """cascade row_gate {
  param g[B, H, M]
  QK[m, n] = Q[m, e] * K[n, e]
  W[m, n]  = tanh(QK[m, n] * scale) * g[b, h, m]
  D[m]     = sum(n) W[m, n] ** 2
  AV[m, f] = sum(n) W[m, n] * V[n, f] * sigmoid(g[b, h, m] * D[m])
}
"""


def sink_softmax(guarded: bool) -> Cascade:
    """Softmax with a per-head sink logit in the denominator, stabilized by the row max
    guarded on rows that see no key, or by max(GM, sink)."""
    sink = S.access("sinks", S.h)
    gm = at("GM", "m")
    top = where(sympy.Eq(gm, -OO), 0, gm) if guarded else sympy.Max(gm, sink)
    nodes = [QK, Einsum("GM", ("m",), SCORE, Reduce.MAX, ("n",)),
             Einsum("G", ("m",), top),
             Einsum("SN", ("m", "n"), sympy.exp(SCORE - at("G", "m"))),
             Einsum("SD", ("m",), at("SN", "m", "n"), Reduce.SUM, ("n",)),
             Einsum("DEN", ("m",), at("SD", "m") + sympy.exp(sink - at("G", "m"))),
             Einsum("LSE", ("m",), at("G", "m") + sympy.log(at("DEN", "m"))),
             Einsum("AV", ("m", "f"), at("SN", "m", "n") * at("V", "n", "f") / at("DEN", "m"),
                    Reduce.SUM, ("n",))]
    return from_nodes("sink_softmax", nodes, params=(("sinks", (S.H,)),), mask=CAUSAL_GAP,
                      lse="LSE")


def stick_breaking() -> Cascade:
    """w[m, n] = sigmoid(s) * prod over earlier visible keys of (1 - sigmoid(s)): a cumsum
    along n of log(1 - sigmoid(s)), exclusive by subtracting the key's own term."""
    s = SCORE
    log_stay = sympy.log(BY_NAME["sigmoid"].head(-s))
    nodes = [QK, Einsum("LS", ("m", "n"), log_stay),
             Einsum("CS", ("m", "n"), at("LS", "m", "n"), Reduce.CUMSUM, ("n",)),
             Einsum("W", ("m", "n"), BY_NAME["sigmoid"].head(s)
                    * sympy.exp(at("CS", "m", "n") - at("LS", "m", "n"))),
             Einsum("AV", ("m", "f"), at("W", "m", "n") * at("V", "n", "f"), Reduce.SUM,
                    ("n",))]
    return from_nodes("stick_breaking", nodes, mask=sympy.And(CAUSAL_GAP, n >= m - 5))


def reverse_scan_over_m() -> Cascade:
    """A suffix sum over the queries (rcumsum along m) of a key-side weight."""
    nodes = [QK, Einsum("T", ("m", "n"), sympy.tanh(SCORE)),
             Einsum("RS", ("m", "n"), at("T", "m", "n"), Reduce.RCUMSUM, ("m",)),
             Einsum("AV", ("m", "f"), at("RS", "m", "n") * at("V", "n", "f"), Reduce.SUM,
                    ("n",))]
    return from_nodes("suffix_over_m", nodes, mask=CAUSAL_GAP)


def unnormalized_max() -> Cascade:
    """exp(s - max): the output depends on the max, which is differentiated (indicator)."""
    nodes = [QK, Einsum("GM", ("m",), SCORE, Reduce.MAX, ("n",)),
             Einsum("G", ("m",), where(sympy.Eq(at("GM", "m"), -OO), 0, at("GM", "m"))),
             Einsum("AV", ("m", "f"), sympy.exp(SCORE - at("G", "m")) * at("V", "n", "f"),
                    Reduce.SUM, ("n",))]
    return from_nodes("unnormalized_max", nodes, mask=CAUSAL_GAP)


CASES = {
    "sigmoid_param_h": lambda: from_text(SIGMOID, CAUSAL_GAP),
    "l1_late_division": lambda: from_text(L1_LATE, CAUSAL_GAP),
    "standardize_running_sums": lambda: from_text(STANDARDIZE_RUNNING, CAUSAL_GAP),
    "standardize_two_pass": lambda: from_text(STANDARDIZE_TWO_PASS, CAUSAL_GAP),
    "sinkhorn_rows_columns": lambda: from_text(SINKHORN, sympy.And(CAUSAL_GAP, n <= 3)),
    "param_b_h_m": lambda: from_text(ROW_GATE, CAUSAL_GAP),
    "sink_softmax_stabilized": lambda: sink_softmax(True),
    "sink_softmax_max_sink": lambda: sink_softmax(False),
    "cumsum_scan_masked": stick_breaking,
    "rcumsum_over_m": reverse_scan_over_m,
    "max_differentiated": unnormalized_max,
    "unmasked_sigmoid": lambda: from_text(SIGMOID),
}


def _leaves(c: Cascade, B=1, H=2, Hkv=1, M=6, N=7, D=3, Dv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, H, M, D, generator=g, dtype=torch.float64),
           torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64),
           torch.randn(B, Hkv, N, Dv, generator=g, dtype=torch.float64)]
    sizes = {S.B: B, S.H: H, S.M: M, S.N: N}
    params = {d.name: torch.randn([int(x.subs(sizes)) for x in d.dims], generator=g,
                                  dtype=torch.float64)
              for d in c.decls if d.kind is TensorKind.PARAM}
    return qkv, params, g


def _backward(c: Cascade, q, k, v, params, dout, dlse):
    env = intermediates(c, q, k, v, inputs=params)
    return interpret_backward(c.backward, q, k, v, inputs=params, residuals=env,
                              saved={"dO": dout, "dLSE": dlse})


class _Interpreted(torch.autograd.Function):
    """The forward cascade's outputs (lse with -inf made 0); gradients by autodiff's."""

    @staticmethod
    def forward(ctx, c, names, q, k, v, *params):
        res = interpret(c, q, k, v, inputs=dict(zip(names, params)))
        ctx.save_for_backward(q, k, v, *params)
        ctx.c, ctx.names = c, names
        lse = res.get("lse", torch.zeros(res["out"].shape[:-1], dtype=q.dtype))
        return res["out"], torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, *params = ctx.saved_tensors
        grads = _backward(ctx.c, q, k, v, dict(zip(ctx.names, params)), dout, dlse)
        return (None, None, grads["dq"], grads["dk"], grads["dv"],
                *(grads.get(f"d_{p}") for p in ctx.names))


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_autograd_through_the_interpreter(name):
    c = autodiff.run(CASES[name]())
    assert c.backward is not None, c.no_backward
    verify(c)
    qkv, params, g = _leaves(c)
    leaves = [t.requires_grad_() for t in qkv + list(params.values())]
    res = interpret(c, *qkv, inputs=params)
    dout = torch.randn(res["out"].shape, generator=g, dtype=torch.float64)
    loss = (res["out"] * dout).sum()
    dlse = None
    if "lse" in res:
        finite = torch.isfinite(res["lse"])
        dlse = torch.where(finite, torch.randn(res["lse"].shape, generator=g,
                                               dtype=torch.float64), 0.0)
        loss = loss + (torch.where(finite, res["lse"], 0.0) * dlse).sum()
    want = torch.autograd.grad(loss, leaves, allow_unused=True)
    with torch.no_grad():
        got = _backward(c, *qkv, params, dout, dlse)
    for role, w in zip(["dq", "dk", "dv"] + [f"d_{p}" for p in params], want):
        assert torch.isfinite(got[role]).all(), role
        expect = torch.zeros_like(got[role]) if w is None else w
        torch.testing.assert_close(got[role], expect, rtol=1e-9, atol=1e-10, msg=role)


@pytest.mark.parametrize("name", CASES)
def test_backward_gradcheck(name):
    c = autodiff.run(CASES[name]())
    qkv, params, _ = _leaves(c, M=5, N=6, D=2, Dv=2)
    leaves = [t.requires_grad_() for t in qkv + list(params.values())]
    names = tuple(params)
    assert torch.autograd.gradcheck(
        lambda q, k, v, *ps: _Interpreted.apply(c, names, q, k, v, *ps), leaves,
        eps=1e-6, atol=1e-6, rtol=1e-5)


def test_stabilizers_are_the_maxima_that_only_shift():
    assert autodiff.stabilizers(sink_softmax(True)) == {"GM"}
    # max(GM, sink) stabilizes; with it held fixed, so does GM
    assert autodiff.stabilizers(sink_softmax(False)) == {"G", "GM"}
    assert autodiff.stabilizers(unnormalized_max()) == set()


def test_stabilizer_gets_no_adjoint_and_residuals_are_saved():
    c = autodiff.run(sink_softmax(True))
    bwd = c.backward
    names = {nd.name for nd in bwd.cascade.nodes}
    assert not any("GM" in nm for nm in names - {"G"})  # no dGM, no tie count for GM
    assert dict(bwd.saved).keys() == {Saved.DOUT, Saved.DLSE}
    assert bwd.dqk is None and bwd.cascade.mask == c.mask
    # rank-[m] results are residuals; QK and SN are recomputed
    assert {t for t, _ in bwd.residuals} <= {"G", "SD", "DEN", "LSE", "AV"}
    assert {"QK", "SN"} <= names
    scatter = bwd.cascade.node("d_sinks")
    assert isinstance(scatter, ScatterSum) and [ix for ix, _ in scatter.terms] == [(S.h,)]


def test_max_gets_an_indicator_split_among_ties():
    c = autodiff.run(unnormalized_max())
    ties = [nd for nd in c.backward.cascade.nodes if nd.name.startswith("ties_GM")]
    assert len(ties) == 1 and ties[0].reduce is Reduce.SUM


def test_no_zero_einsums_and_shared_dot_products():
    c = autodiff.run(from_text(SIGMOID, CAUSAL_GAP))
    nodes = c.backward.cascade.nodes
    assert all(nd.expr != 0 for nd in nodes if isinstance(nd, Einsum))
    # dO is read directly (no copy), and sum(f) V*dO is computed once
    dots = [nd for nd in nodes if isinstance(nd, Einsum) and nd.over == ("f",)]
    assert len(dots) <= 1
    assert not any(isinstance(nd, Einsum) and nd.expr == at("dO", "m", "f") for nd in nodes)


@pytest.mark.parametrize("make", [stick_breaking, reverse_scan_over_m])
def test_scan_adjoint_walks_the_way_the_recomputed_scan_does(make):
    """The adjoint of cumsum is a suffix sum; the backward also recomputes the forward's
    prefix sum, so the suffix sum is written total - prefix + element: one walk per rank."""
    c = make()
    forward = {nd.over[0]: nd.reduce for nd in c.nodes if nd.is_scan}
    bwd = autodiff.run(c).backward.cascade
    scans = [nd for nd in bwd.nodes if isinstance(nd, Einsum) and nd.is_scan]
    assert len(scans) == 2 and all(nd.reduce is forward[nd.over[0]] for nd in scans)
    assert any(nd.name.endswith("_total") and nd.reduce is Reduce.SUM for nd in bwd.nodes)


def test_unsupported_param_index_gives_a_reason():
    rel = """cascade rel {
  param bias[N]
  QK[m, n] = Q[m, e] * K[n, e]
  W[m, n]  = sigmoid(QK[m, n] * scale + bias[m - n + 3])
  AV[m, f] = sum(n) W[m, n] * V[n, f]
}
"""
    c = autodiff.run(from_text(rel))
    assert c.backward is None and "both m and n" in c.no_backward


def test_undefined_derivative_gives_a_reason():
    text = SIGMOID.replace("sigmoid(QK[m, n] * scale + p[h])", "log(relu(QK[m, n] + p[h]))")
    c = autodiff.run(from_text(text))
    assert c.backward is None and "undefined" in c.no_backward
