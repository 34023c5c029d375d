"""schedule: a traversal that reads scans of both directions along its loop is rewritten
(total - opposite scan + element) so that its stage walks one way, and the stages still
compute the cascade (backends/reference/stages.py against the reference interpreter, float64,
under a mask)."""

from __future__ import annotations

import sympy
import torch

from attnc.backends.reference.cascade import interpret
from attnc.backends.reference.stages import run_stages
from attnc.expr import symbols as S
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.cascade import OPERAND_DECLS, Cascade, Einsum, Order, Reduce, TensorDecl, TensorKind
from attnc.passes import pass_count, schedule
from attnc.pipeline import run_passes
from tests.normalizer_reference import stick_breaking
from tests.passes.test_schedule import _data

HEAD = """  mask = n <= m
  QK[m, n] = Q[m, e] * K[n, e]
  X[m, n] = softplus(scale * QK[m, n])
"""
TIE = "cascade tie {\n" + HEAD + """  C[m, n] = cumsum(n) X[m, n]
  R[m, n] = rcumsum(n) X[m, n]
  O[m, f] = sum(n) exp(C[m, n] - 2 * R[m, n]) * V[n, f]
}
"""
MAJORITY = "cascade majority {\n" + HEAD + """  C[m, n] = cumsum(n) sigmoid(X[m, n])
  R1[m, n] = rcumsum(n) X[m, n]
  R2[m, n] = rcumsum(n) X[m, n] * X[m, n]
  O[m, f] = sum(n) exp(-C[m, n] - R1[m, n]) * R2[m, n] * V[n, f]
}
"""
# T1 reads one cumsum and two rcumsums: A is rewritten into an rcumsum; T2 read A and the
# cumsum D in one direction, and now reads both: D is rewritten too (rcumsum stays kept)
CHAIN = "cascade chain {\n" + HEAD + """  A[m, n] = cumsum(n) X[m, n]
  BB[m, n] = rcumsum(n) X[m, n]
  X2[m, n] = X[m, n] * X[m, n]
  C[m, n] = rcumsum(n) X2[m, n]
  D[m, n] = cumsum(n) X2[m, n]
  T1[m] = sum(n) exp(-A[m, n] - BB[m, n] - C[m, n])
  T2[m] = sum(n) exp(-A[m, n] - D[m, n])
  OV[m, f] = sum(n) exp(-BB[m, n]) * V[n, f]
  O[m, f] = OV[m, f] * T1[m] / (1 + T2[m])
}
"""
# along m: a key-side sum (stage parallel over n, walking m) reads both scans along m
ALONG_M = "cascade along_m {\n" + HEAD + """  C[m, n] = cumsum(m) X[m, n]
  R[m, n] = rcumsum(m) X[m, n]
  Y[n] = sum(m) exp(-C[m, n]) * R[m, n]
  O[m, f] = sum(n) sigmoid(QK[m, n]) * Y[n] * V[n, f]
}
"""


def _schedule(src):
    trail = run_passes(lower(parse(src), src), upto="schedule")
    return trail[0][1], trail[-1][1]


def _same_out(before, after):
    q, k, v, inputs = _data(before)
    want = interpret(before, q, k, v, inputs=inputs)["out"]
    assert torch.isfinite(want).all() and want.abs().max() > 0
    torch.testing.assert_close(run_stages(after, q, k, v, inputs=inputs)["out"], want,
                               rtol=1e-9, atol=1e-9)


def _scans(c: Cascade) -> dict[str, Reduce]:
    return {nd.name: nd.reduce for nd in c.nodes if isinstance(nd, Einsum) and nd.is_scan}


def test_a_tie_keeps_the_first_scans_direction_and_adds_a_pass_for_the_total():
    before, after = _schedule(TIE)
    assert _scans(after) == {"C": Reduce.CUMSUM, "R_cumsum": Reduce.CUMSUM}
    assert after.node("R").expr == S.at("R_total", "m") - S.at("R_cumsum", "m", "n") + S.at(
        "X", "m", "n")
    first, second = after.stages
    assert first.writes == ("R_total",) and "R_total" in second.reads
    assert {"C", "R_cumsum", "R"} <= set(second.nodes)
    assert [st.order for st in after.stages] == [Order.ASCENDING, Order.ASCENDING]
    _same_out(before, after)


def test_the_majority_direction_is_kept_and_an_expression_is_evaluated_once():
    before, after = _schedule(MAJORITY)
    assert set(_scans(after).values()) == {Reduce.RCUMSUM}
    x = S.at("C_x", "m", "n")
    assert after.node("C_x").expr == sympy.sympify(before.node("C").expr)
    assert after.node("C").expr == S.at("C_total", "m") - S.at("C_rcumsum", "m", "n") + x
    assert all(st.order is Order.DESCENDING for st in after.stages if "C" in st.nodes)
    _same_out(before, after)


def test_a_rewrite_that_makes_another_conflict_is_resolved_in_the_kept_direction():
    before, after = _schedule(CHAIN)
    assert set(_scans(after).values()) == {Reduce.RCUMSUM}
    written = {w for st in after.stages for w in st.writes}
    assert {"A_total", "D_total"} <= written
    assert all(st.order is Order.DESCENDING for st in after.stages if st.loop == "n"
               and {"A", "D"} & set(st.nodes))
    _same_out(before, after)


def test_scans_along_m_in_a_key_side_stage():
    before, after = _schedule(ALONG_M)
    assert _scans(after) == {"C": Reduce.CUMSUM, "R_cumsum": Reduce.CUMSUM}
    stage = next(st for st in after.stages if "Y" in st.writes)
    assert (stage.parallel, stage.loop, stage.order) == ("n", "m", Order.ASCENDING)
    _same_out(before, after)


def _stick_breaking_dq() -> Cascade:
    """Stick-breaking's backward for dq, written by hand (the forward's suffix scan R is
    recomputed; the adjoint of R is a prefix scan in the same sum)."""
    at = S.at
    s = at("S", "m", "n")
    decls = OPERAND_DECLS + (TensorDecl("dO", TensorKind.SAVED, (S.m, S.f)),)
    nodes = (
        Einsum("QK", ("m", "n"), at("Q", "m", "e") * at("K", "n", "e"), Reduce.SUM, ("e",)),
        Einsum("S", ("m", "n"), S.scale * at("QK", "m", "n")),
        Einsum("R", ("m", "n"), sympy.log(1 + sympy.exp(s)), Reduce.RCUMSUM, ("n",)),
        Einsum("A", ("m", "n"), sympy.exp(sympy.log(1 + sympy.exp(s)) - at("R", "m", "n"))
               / (1 + sympy.exp(-s))),
        Einsum("dP", ("m", "n"), at("dO", "m", "f") * at("V", "n", "f"), Reduce.SUM, ("f",)),
        Einsum("dR", ("m", "n"), -at("A", "m", "n") * at("dP", "m", "n")),
        Einsum("dRc", ("m", "n"), at("dR", "m", "n"), Reduce.CUMSUM, ("n",)),
        Einsum("dS", ("m", "n"), at("A", "m", "n") * at("dP", "m", "n")
               + at("dRc", "m", "n") / (1 + sympy.exp(-s))),
        Einsum("dQ", ("m", "e"), S.scale * at("dS", "m", "n") * at("K", "n", "e"), Reduce.SUM,
               ("n",)),
    )
    return Cascade("stick_breaking_dq", decls, nodes, (("dq", "dQ"),), mask=sympy.Lt(S.n, S.m))


def test_stick_breaking_dq_reads_both_directions_and_matches_autograd():
    c = _stick_breaking_dq()
    out = schedule.run(c)
    assert _scans(out) == {"R": Reduce.RCUMSUM, "dRc_rcumsum": Reduce.RCUMSUM}
    assert [st.writes for st in out.stages] == [("dRc_total",), ("dQ",)]
    assert all(st.order is Order.DESCENDING for st in out.stages)
    q, k, v, _ = _data(c)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(*q.shape[:3], v.shape[-1], generator=g, dtype=torch.float64)
    got = run_stages(out, q, k, v, saved={"dO": dout})["dq"]
    torch.testing.assert_close(got, interpret(c, q, k, v, saved={"dO": dout})["dq"],
                               rtol=1e-9, atol=1e-9)
    q = q.clone().requires_grad_(True)
    ref, _ = stick_breaking(q, k, v)
    (ref * dout).sum().backward()
    torch.testing.assert_close(got, q.grad, rtol=1e-9, atol=1e-9)


def test_the_pass_count_summary_shows_the_pass_the_rewrite_costs():
    before, _ = _schedule(TIE)
    assert pass_count.summary(before) == (
        "1 pass(es) over n, 0 over m (2 over n, 0 over m once scans read in both directions "
        "are rewritten); 2 kernel(s)")
