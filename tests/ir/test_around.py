"""The IR around the score (attnc/ir/around.py): what verify_around refuses, how it prints, and
which row values a runtime evaluates; and that desugar refuses it with a non-softmax normalizer."""

from __future__ import annotations

import pytest
import sympy

from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.around import (Around, DotTerm, Gather, L2Norm, OperandDecl, Prologue, Rope,
                             RopeStyle, RowKind, RowScale, Side, row_values, verify_around)
from attnc.ir.cascade import AttentionSpec, Normalizer
from attnc.passes import desugar

QR, KR = OperandDecl("qr", Side.QUERY), OperandDecl("kr", Side.KEY)


def _rich() -> Around:
    return Around(
        operands=(QR, KR), dots=(DotTerm("q", "k"), DotTerm("qr", "kr", sympy.Rational(1, 2))),
        value="kr",
        prologues=(Prologue("q", (L2Norm(S.access("gq", S.d)),
                                  Rope(S.access("pos", S.b, S.m), 10000.0, 32))),
                   Prologue("v", (RowScale(S.access("vs", S.b, S.h, S.n)),))),
        gate=S.access("gt", S.b, S.h, S.m), gather=Gather("idx", (S.b, S.h, S.m), 16))


def test_plain_is_the_default_and_prints_nothing():
    assert Around().plain and Around().lines() == []
    assert not _rich().plain


def test_lines_print_every_part():
    assert _rich().lines() == [
        "operand qr[m]", "operand kr[n]", "qk = dot(q, k) + 1/2 * dot(qr, kr)", "v = kr",
        "q = rope(l2norm(q, gq[d]), pos[b, m], 10000.0, 32)", "v = v * vs[b, h, n]",
        "gate = gt[b, h, m]", "gather: n // 16 in idx[b, h, m, :]"]


def test_row_values_name_each_evaluated_expression():
    rows = row_values(_rich())
    assert [(r.key, r.kind, r.side) for r in rows] == [
        ("q_gain0", RowKind.GAIN, Side.QUERY), ("q_position1", RowKind.POSITION, Side.QUERY),
        ("v_factor0", RowKind.FACTOR, Side.KEY), ("gate", RowKind.GATE, Side.QUERY)]


def test_map_exprs_reaches_every_expression_and_may_skip_gains():
    shifted = _rich().map_exprs(lambda ex: ex + 1)
    assert shifted.gate == S.access("gt", S.b, S.h, S.m) + 1
    assert shifted.prologues[0].ops[0].gain == S.access("gq", S.d) + 1
    kept = _rich().map_exprs(lambda ex: ex + 1, gains=False)
    assert kept.prologues[0].ops[0].gain == S.access("gq", S.d)
    assert kept.prologues[0].ops[1].position == S.access("pos", S.b, S.m) + 1


@pytest.mark.parametrize("bad", [
    Around(dots=(DotTerm("k", "q"),)),                            # sides swapped
    Around(dots=(DotTerm("q", "v"),)),                            # v is never dotted
    Around(operands=(QR,), dots=(DotTerm("q", "k"), DotTerm("qr", "qr"))),
    Around(dots=(DotTerm("q", "k", S.scale),)),                   # weights are numbers
    Around(value="q"),                                            # a value is key-side
    Around(operands=(OperandDecl("k", Side.KEY),)),               # shadows k
    Around(prologues=(Prologue("q", ()), Prologue("q", ()))),     # one chain per operand
    Around(prologues=(Prologue("x", ()),)),                       # unknown operand
    Around(prologues=(Prologue("q", (Rope(S.m, 10000.0, 7),)),)),  # odd rotary dims
])
def test_verify_refuses_malformed(bad):
    with pytest.raises(AssertionError):
        verify_around(bad, "t")


def test_verify_accepts_the_rich_example():
    verify_around(_rich(), "t")
    verify_around(Around(prologues=(Prologue("k", (Rope(S.n, 500.0, None, RopeStyle.INTERLEAVED),
                                                   )),)), "t")


def test_desugar_refuses_around_with_another_normalizer():
    spec = AttentionSpec(name="x", decls=(), score=S.access("QK", S.m, S.n) * S.scale, mask=None,
                         normalize=Normalizer.SIGMOID,
                         around=Around(prologues=(Prologue("q", (L2Norm(),)),)))
    with pytest.raises(CompileError, match="softmax kernels only"):
        desugar.run(spec)
