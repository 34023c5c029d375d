"""schedule: general cascades become stages (kernels), and running the stages one by one, each
seeing only its reads, gives the cascade's meaning (backends/reference/stages.py is the
oracle). Also the stage counts the pass analysis promises, scan orders, and refusals."""

from __future__ import annotations

import pytest
import sympy
import torch

from attnc.backends.reference.cascade import intermediates, interpret
from attnc.backends.reference.stages import run_stages
from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.cascade import (OPERAND_DECLS, Cascade, Einsum, Order, Reduce, Saved, ScatterSum,
                              TensorDecl, TensorKind)
from attnc.passes import schedule
from attnc.pipeline import run_passes
from tests.specs import make_inputs

QK = "  QK[m, n] = Q[m, e] * K[n, e]\n  S[m, n] = scale * QK[m, n]\n"

SIGMOID = "cascade sig {\n" + QK + """  W[m, n] = 1 / (1 + exp(-S[m, n]))
  O[m, f] = sum(n) W[m, n] * V[n, f]
}
"""
L1 = "cascade l1 {\n" + QK + """  W[m, n] = 1 / (1 + exp(-S[m, n]))
  D[m] = sum(n) W[m, n]
  A[m, n] = W[m, n] / D[m]
  O[m, f] = sum(n) A[m, n] * V[n, f]
}
"""
STANDARDIZE_NAIVE = "cascade std_naive {\n" + QK + """  MU[m] = sum(n) S[m, n] / N
  VAR[m] = sum(n) (S[m, n] - MU[m]) ** 2 / N
  A[m, n] = (S[m, n] - MU[m]) / sqrt(VAR[m] + 0.000001)
  O[m, f] = sum(n) A[m, n] * V[n, f]
}
"""
STANDARDIZE_RUNNING = "cascade std_running {\n" + QK + """  S1[m] = sum(n) S[m, n]
  S2[m] = sum(n) S[m, n] ** 2
  SV[m, f] = sum(n) S[m, n] * V[n, f]
  TV[m, f] = sum(n) where(m < M, 1, 0) * V[n, f]
  MU[m] = S1[m] / N
  VAR[m] = S2[m] / N - MU[m] ** 2
  O[m, f] = (SV[m, f] - MU[m] * TV[m, f]) / sqrt(VAR[m] + 0.000001)
}
"""
SINKHORN = "cascade sinkhorn2 {\n" + QK + """  E[m, n] = exp(S[m, n])
  R1[m] = sum(n) E[m, n]
  E1[m, n] = E[m, n] / R1[m]
  C1[n] = sum(m) E1[m, n]
  E2[m, n] = E1[m, n] / C1[n]
  R2[m] = sum(n) E2[m, n]
  E3[m, n] = E2[m, n] / R2[m]
  C2[n] = sum(m) E3[m, n]
  E4[m, n] = E3[m, n] / C2[n]
  O[m, f] = sum(n) E4[m, n] * V[n, f]
}
"""
SINK = """cascade sink {
  param sinks[H]
""" + QK + """  GM[m] = max(n) S[m, n]
  SN[m, n] = exp(S[m, n] - GM[m])
  SD[m] = sum(n) SN[m, n]
  DEN[m] = SD[m] + exp(sinks[h] - GM[m])
  A[m, n] = SN[m, n] / DEN[m]
  O[m, f] = sum(n) A[m, n] * V[n, f]
}
"""
GROUPED = "cascade grouped2 {\n  param w[H, 2]\n" + QK + """  GM[m] = max(n) S[m, n]
  P0[m, n] = where(2 * n < N, exp(S[m, n] - GM[m]), 0)
  P1[m, n] = where(2 * n >= N, exp(S[m, n] - GM[m]), 0)
  Z0[m] = sum(n) P0[m, n]
  Z1[m] = sum(n) P1[m, n]
  A[m, n] = exp(w[h, 0]) * P0[m, n] / Z0[m] + exp(w[h, 1]) * P1[m, n] / Z1[m]
  O[m, f] = sum(n) A[m, n] * V[n, f]
}
"""


def _trail(src):
    return run_passes(lower(parse(src), src), upto="schedule")


def _data(c: Cascade, shape=(2, 4, 2, 13, 11, 8, 8), seed=0):
    B, H, Hkv, M, N, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, Dv, generator=g, dtype=torch.float64)
    return q, k, v, make_inputs(c.extra_inputs, B, H, M, N, g)


def _check(src, kernels, walks=None):
    trail = _trail(src)
    before, after = trail[0][1], trail[-1][1]
    assert len(after.stages) == kernels, after.stages
    if walks is not None:
        assert [st.parallel for st in after.stages] == walks
    q, k, v, inputs = _data(before)
    want = interpret(before, q, k, v, inputs=inputs)
    got = run_stages(after, q, k, v, inputs=inputs)
    assert torch.isfinite(want["out"]).all()
    torch.testing.assert_close(got["out"], want["out"], rtol=1e-9, atol=1e-9)
    return after


@pytest.mark.parametrize("src, kernels, walks", [
    (SIGMOID, 1, ["m"]),
    (L1, 1, ["m"]),
    (STANDARDIZE_NAIVE, 2, ["m", "m"]),
    (STANDARDIZE_RUNNING, 1, ["m"]),
    (SINKHORN, 5, ["m", "n", "m", "n", "m"]),
    (SINK, 1, ["m"]),
    (GROUPED, 1, ["m"]),
], ids=["sigmoid", "l1", "standardize-naive", "standardize-running", "sinkhorn2", "sink",
        "grouped"])
def test_stages_compute_the_cascade(src, kernels, walks):
    _check(src, kernels, walks)


def test_stage_reads_and_writes_are_minimal():
    c = _check(STANDARDIZE_NAIVE, 2)
    first, second = c.stages
    assert "MU" in first.writes and "MU" in second.reads and second.writes == ("O",)
    assert not {"QK", "S", "A"} & set(first.reads + first.writes + second.reads + second.writes)
    assert {"QK", "S"} <= set(second.nodes)  # [m, n] nodes are recomputed, never stored


def test_sinkhorn_alternates_row_and_column_stages():
    c = _check(SINKHORN, 5)
    assert [st.loop for st in c.stages] == ["n", "m", "n", "m", "n"]
    assert [st.writes for st in c.stages[:4]] == [("R1",), ("C1",), ("R2",), ("C2",)]


def test_the_backward_cascade_is_scheduled_and_its_stages_compute_it():
    trail = _trail(L1)
    fwd, c = trail[0][1], trail[-1][1]
    bwd = c.backward
    assert bwd is not None and bwd.cascade.stages
    assert {st.parallel for st in bwd.cascade.stages} == {"m", "n"}
    q, k, v, inputs = _data(fwd)
    g = torch.Generator().manual_seed(3)
    forward = intermediates(c, q, k, v, inputs=inputs)
    saved = {bwd.saved_name(Saved.DOUT): torch.randn(forward[c.output("out")].shape,
                                                     generator=g, dtype=torch.float64)}
    saved.update({decl: forward[t] for t, decl in bwd.residuals})
    want = interpret(bwd.cascade, q, k, v, inputs=inputs, saved=saved)
    got = run_stages(bwd.cascade, q, k, v, inputs=inputs, saved=saved)
    for role in ("dq", "dk", "dv"):
        torch.testing.assert_close(got[role], want[role], rtol=1e-9, atol=1e-9)


def _softmax_backward_style() -> Cascade:
    """A FlashAttention-2 backward written as a cascade over saved LSE, dO and Delta, with a
    param gradient: dq in a stage over query tiles, dk, dv over key tiles."""
    m, f = S.m, S.f
    at = S.at
    decls = OPERAND_DECLS + (
        TensorDecl("bias", TensorKind.PARAM, (S.H,)),
        TensorDecl("LSE", TensorKind.SAVED, (m,)), TensorDecl("dO", TensorKind.SAVED, (m, f)),
        TensorDecl("Delta", TensorKind.SAVED, (m,)))
    bias = S.access("bias", S.h)
    nodes = (
        Einsum("QK", ("m", "n"), at("Q", "m", "e") * at("K", "n", "e") * S.scale, Reduce.SUM,
               ("e",)),
        Einsum("P", ("m", "n"), sympy.exp(at("QK", "m", "n") + bias - at("LSE", "m"))),
        Einsum("dP", ("m", "n"), at("dO", "m", "f") * at("V", "n", "f"), Reduce.SUM, ("f",)),
        Einsum("dS", ("m", "n"), at("P", "m", "n") * (at("dP", "m", "n") - at("Delta", "m"))),
        Einsum("dQ", ("m", "e"), at("dS", "m", "n") * at("K", "n", "e") * S.scale, Reduce.SUM,
               ("n",)),
        Einsum("dK", ("n", "e"), at("dS", "m", "n") * at("Q", "m", "e") * S.scale, Reduce.SUM,
               ("m",)),
        Einsum("dV", ("n", "f"), at("P", "m", "n") * at("dO", "m", "f"), Reduce.SUM, ("m",)),
        ScatterSum("d_bias", "bias", (((S.h,), at("dS", "m", "n")),)),
    )
    return Cascade("fa2_backward", decls, nodes,
                   (("dq", "dQ"), ("dk", "dK"), ("dv", "dV"), ("d_bias", "d_bias")))


def test_a_softmax_backward_style_cascade_with_dq_dk_dv():
    c = _softmax_backward_style()
    out = schedule.run(c)
    assert [(st.parallel, st.writes) for st in out.stages] == [
        ("m", ("dQ", "d_bias")), ("n", ("dK", "dV"))]
    q, k, v, inputs = _data(c)
    B, H, M = q.shape[:3]
    g = torch.Generator().manual_seed(1)
    saved = {"LSE": torch.randn(B, H, M, generator=g, dtype=torch.float64) + 3,
             "dO": torch.randn(B, H, M, v.shape[-1], generator=g, dtype=torch.float64),
             "Delta": torch.randn(B, H, M, generator=g, dtype=torch.float64)}
    want = interpret(c, q, k, v, inputs=inputs, saved=saved)
    got = run_stages(out, q, k, v, inputs=inputs, saved=saved)
    for role in want:
        torch.testing.assert_close(got[role], want[role], rtol=1e-9, atol=1e-9)


def test_a_param_gradient_goes_where_its_index_is_fixed():
    c = _softmax_backward_style()
    scatter = c.node("d_bias")
    by_key = c.with_nodes([nd for nd in c.nodes if nd.name != "d_bias"] + [
        ScatterSum("d_bias", "bias", (((S.n,), scatter.terms[0][1]),))])
    stages = schedule.run(by_key).stages
    assert next(st for st in stages if "d_bias" in st.writes).parallel == "n"
    both = c.with_nodes([nd for nd in c.nodes if nd.name != "d_bias"] + [
        ScatterSum("d_bias", "bias", (((S.n - S.m,), scatter.terms[0][1]),))])
    with pytest.raises(CompileError, match="index of both m and n") as caught:
        schedule.run(both)
    assert caught.value.tensor == "d_bias"


def _scan_cascade(*scans: Reduce) -> Cascade:
    """Sums over n of exp(-scan(n) x): one scan (and sum) per direction asked for."""
    at = S.at
    nodes = [Einsum("QK", ("m", "n"), at("Q", "m", "e") * at("K", "n", "e"), Reduce.SUM,
                    ("e",)),
             Einsum("X", ("m", "n"), sympy.log(1 + sympy.exp(at("QK", "m", "n"))))]
    outs = []
    for i, red in enumerate(scans):
        nodes += [Einsum(f"C{i}", ("m", "n"), at("X", "m", "n"), red, ("n",)),
                  Einsum(f"O{i}", ("m", "f"), sympy.exp(-at(f"C{i}", "m", "n"))
                         * at("V", "n", "f"), Reduce.SUM, ("n",))]
        outs.append(S.at(f"O{i}", "m", "f"))
    nodes.append(Einsum("O", ("m", "f"), sympy.Add(*outs)))
    return Cascade("scans", OPERAND_DECLS, tuple(nodes), (("out", "O"),),
                   mask=sympy.Le(S.n, S.m))


@pytest.mark.parametrize("scans, orders", [
    ((Reduce.CUMSUM,), [Order.ASCENDING]),
    ((Reduce.RCUMSUM,), [Order.DESCENDING]),
    ((Reduce.CUMSUM, Reduce.RCUMSUM), [Order.ASCENDING, Order.DESCENDING]),
], ids=["cumsum", "rcumsum", "both-split"])
def test_scans_decide_the_walk_and_opposite_walks_get_a_stage_each(scans, orders):
    c = _scan_cascade(*scans)
    out = schedule.run(c)
    assert [st.order for st in out.stages] == orders
    assert all("C0" in st.nodes or "C1" in st.nodes for st in out.stages)
    q, k, v, inputs = _data(c)
    torch.testing.assert_close(run_stages(out, q, k, v)["out"], interpret(c, q, k, v)["out"],
                               rtol=1e-9, atol=1e-9)


def _chain(k: int) -> str:
    """k row sums, each reading the last, then the output: k + 1 passes over n."""
    lines = ["cascade chain {", QK.rstrip("\n"), "  R0[m] = sum(n) S[m, n]"]
    for i in range(1, k):
        lines.append(f"  R{i}[m] = sum(n) S[m, n] * R{i - 1}[m] + exp(S[m, n] - R{i - 1}[m])")
    lines += [f"  O[m, f] = sum(n) exp(S[m, n] - R{k - 1}[m]) * V[n, f]", "}", ""]
    return "\n".join(lines)


def test_too_many_kernels_are_refused_at_the_first_one_over_the_limit():
    def forward(k):
        src = _chain(k)
        return run_passes(lower(parse(src), src), upto="online_rescale")[-1][1]

    assert len(schedule.run(forward(schedule.MAX_KERNELS - 1)).stages) == schedule.MAX_KERNELS
    with pytest.raises(CompileError, match=r"needs 17 kernels, more than 16") as caught:
        schedule.run(forward(schedule.MAX_KERNELS))
    assert "17 pass(es) over n" in caught.value.message
    assert caught.value.tensor == "O"


@pytest.mark.parametrize("node, reason", [
    (Einsum("T", ("e",), S.at("Q", "m", "e"), Reduce.SUM, ("m",)), "keeps n"),
    (Einsum("T", ("m", "n", "f"), S.at("V", "n", "f") * S.at("QK", "m", "n")),
     "has rank \\[m, n\\]"),
    (Einsum("T", ("m", "n"), S.at("Q", "m", "e") ** 2 * S.at("K", "n", "e"), Reduce.SUM,
            ("e",)), "dot product"),
    (Einsum("T", ("m", "f"), S.at("V", "n", "f") ** 2 * S.at("QK", "m", "n"), Reduce.SUM,
            ("n",)), "g\\[m, n\\] \\* Y\\[n, f\\]"),
    (Einsum("T", ("m",), S.access("QK", S.m, S.n - 1), Reduce.SUM, ("n",)), "its own ranks"),
], ids=["no-m", "mnf-map", "not-a-dot", "not-weighted", "shifted-read"])
def test_unschedulable_nodes_are_refused_with_the_pass_count(node, reason):
    at = S.at
    qk = Einsum("QK", ("m", "n"), at("Q", "m", "e") * at("K", "n", "e"), Reduce.SUM, ("e",))
    out = Einsum("O", ("m", "f"), at("QK", "m", "n") * at("V", "n", "f"), Reduce.SUM, ("n",))
    # P reads T (at 0 where T has a rank other than m) so that the output needs T
    probe = Einsum("P", ("m",), S.access(node.name, *[S.m if r == "m" else 0
                                                        for r in node.ranks]))
    c = Cascade("bad", OPERAND_DECLS, (qk, node, out, probe, Einsum(
        "R", ("m", "f"), at("O", "m", "f") * at("P", "m"))), (("out", "R"),))
    with pytest.raises(CompileError, match=reason) as caught:
        schedule.run(c)
    assert caught.value.tensor == "T" and "pass(es) over n" in caught.value.message
