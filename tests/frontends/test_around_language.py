"""The statements around the score (operands, prologues, several dots, the value, gate, kv_head,
premix / postmix, gathered keys): what they lower to (attnc.ir.around), that a plain spec lowers
exactly as before, and every refusal with its line, column, caret and hint."""

from __future__ import annotations

import pytest
import sympy

from attnc.errors import SpecError
from attnc.expr import symbols as S
from attnc.ir.around import (Around, DotTerm, Gather, L2Norm, OperandDecl, Prologue, Rope,
                             RopeStyle, RowScale, Side, g)
from attnc.ir.cascade import QK
from attnc.pipeline import frontend, read_spec, run_passes

QK_MN = S.access(QK, S.m, S.n)


def lowered(text: str):
    return frontend(read_spec(text))[1]


def acc(name, *index):
    return S.access(name, *index)


def test_a_plain_spec_lowers_as_before():
    spec = lowered("attention a {\n  score = dot(q, k) * scale\n  mask = n <= m\n}\n")
    assert spec.around == Around() and spec.around.plain
    assert spec.score == QK_MN * S.scale
    assert [o.tensor for o in spec.origins] == ["", "score", "mask"]


def test_prologues_compose_in_order_with_d_sized_gains():
    spec = lowered("""\
attention rope_qknorm {
  option theta = 10000.0, rot = 4
  input pos_q[b, m], pos_k[b, n], vs[b, h, n]
  param gq[d], gk[h, d], temp[h]
  q = rope(l2norm(q, gq[d]), pos_q[b, m], theta, rot)
  k = rope_interleaved(k, pos_k[b, n], theta)
  k = l2norm(k, gk[h, d]) / 2
  q = temp[h] * q
  v = v * vs[b, h, n]
}
""")
    a = spec.around
    assert [d.dims for d in spec.decls if d.name in ("gq", "gk")] == [(S.D,), (S.H, S.D)]
    assert a.prologues == (
        Prologue("q", (L2Norm(acc("gq", S.d)), Rope(acc("pos_q", S.b, S.m), 10000.0, 4),
                       RowScale(acc("temp", S.h)))),
        Prologue("k", (Rope(acc("pos_k", S.b, S.n), 10000.0, None, RopeStyle.INTERLEAVED),
                       L2Norm(acc("gk", S.h, S.d)), RowScale(sympy.Rational(1, 2)))),
        Prologue("v", (RowScale(acc("vs", S.b, S.h, S.n)),)))
    assert a.dots == Around().dots and a.value == "v"
    assert {"prologue q", "prologue k", "prologue v"} <= {o.tensor for o in spec.origins}


def test_several_dots_become_one_weighted_sum():
    spec = lowered("""\
attention mla {
  operand qr[m], kr[n], c[n]
  let rope_part = dot(qr, kr)
  score = tanh(dot(q, c) * 0.5 + rope_part) * scale
  v = c
}
""")
    a = spec.around
    assert a.operands == (OperandDecl("qr", Side.QUERY), OperandDecl("kr", Side.KEY),
                          OperandDecl("c", Side.KEY))
    # no dot(q, k): weights relative to the first dot read (the let's)
    assert a.dots == (DotTerm("qr", "kr"), DotTerm("q", "c", sympy.Float(0.5)))
    assert spec.score == sympy.tanh(QK_MN) * S.scale
    assert a.value == "c"


def test_dot_q_k_is_the_reference_of_the_weights():
    spec = lowered("attention a {\n  operand qr[m], kr[n]\n"
                   "  score = (3 * dot(qr, kr) + dot(q, k)) * scale\n}\n")
    assert spec.around.dots == (DotTerm("q", "k"), DotTerm("qr", "kr", sympy.Integer(3)))
    assert spec.score == QK_MN * S.scale
    one = lowered("attention a {\n  operand qr[m], kr[n]\n  score = dot(qr, kr) * scale\n}\n")
    assert one.around.dots == (DotTerm("qr", "kr"),) and one.score == QK_MN * S.scale


def test_gate_head_map_mixing_and_gathered_keys():
    spec = lowered("""\
attention heads {
  input hmap[h], idx[b, h, m, 8]
  param gt[b, h, m], w[h, h], a[b, m, h]
  gate = sigmoid(gt[b, h, m])
  kv_head = hmap[h] // 2
  premix = w[h, g] + a[b, m, h] * a[b, m, g]
  postmix = w[g, h]
  mask = n <= m and n in idx[b, h, m, :] and m - n < 100
}
""")
    a = spec.around
    assert str(a.gate) == "sigmoid(gt[b, h, m])"
    assert a.kv_head == sympy.floor(acc("hmap", S.h) / 2)
    assert a.premix == acc("w", S.h, g) + acc("a", S.b, S.m, S.h) * acc("a", S.b, S.m, g)
    assert a.postmix == acc("w", g, S.h)
    assert a.gather == Gather("idx", (S.b, S.h, S.m), 1)
    assert spec.mask == sympy.And(sympy.Le(S.n, S.m), sympy.Lt(S.m - S.n, 100))
    assert {"gate", "kv_head", "premix", "postmix", "gather"} <= {o.tensor
                                                                  for o in spec.origins}


def test_block_lists_and_a_mask_that_is_only_a_gather():
    spec = lowered("attention nsa {\n  option C = 64\n  input blk[b, h, M // C + 1, 4]\n"
                   "  mask = n // C in blk[b, h, m // C, :]\n}\n")
    assert spec.mask is None
    assert spec.around.gather == Gather("blk", (S.b, S.h, sympy.floor(S.m / 64)), 64)


def test_the_around_reaches_the_kernel_unchanged():
    spec = lowered("attention a {\n  input pos[b, m]\n  param gt[b, h, m]\n"
                   "  q = rope(q, pos[b, m], 500.0)\n  gate = gt[b, h, m]\n}\n")
    kernel = run_passes(spec)[-1][1]
    assert kernel.around == spec.around and not kernel.around.plain


# (id, spec, message substring, line, text at the column, hint substring or None)
CASES = [
    ("operand_two_dims", "attention a {\n  operand x[m, n]\n  score = dot(x, k)\n}\n",
     "operand x has one dimension, m or n", 2, "x[m, n]", "laid out like q"),
    ("operand_batch_dim", "attention a {\n  operand x[b]\n  score = dot(x, k)\n}\n",
     "operand x has one dimension, m or n", 2, "x[b]", None),
    ("operand_reserved", "attention a {\n  operand q[m]\n}\n",
     "operand name 'q' is reserved", 2, "q[m]", None),
    ("operand_declared", "attention a {\n  param x[h]\n  operand x[m]\n}\n",
     "operand name 'x' is already declared", 3, "x[m]", None),
    ("operand_unused", "attention a {\n  operand qr[m], kr[n]\n  score = dot(qr, k)\n}\n",
     "operand kr is declared but never used", 2, "kr[n]", "v = kr"),
    ("assign_unknown", "attention a {\n  foo = q\n}\n",
     "cannot assign to 'foo'", 2, "foo", "let"),
    ("assign_rename", "attention a {\n  operand c[n]\n  k = c\n  v = c\n}\n",
     "k cannot be renamed to c", 3, "k = c", "v = c"),
    ("assign_itself", "attention a {\n  q = q\n}\n",
     "`q = q` changes nothing", 2, "q\n", "rope"),
    ("prologue_other_operand", "attention a {\n  q = l2norm(k)\n}\n",
     "a prologue of q transforms q itself, not k", 2, "k)", None),
    ("prologue_not_a_chain", "attention a {\n  q = q + 1\n}\n",
     "this is no prologue of q", 2, "q + 1", "x * f"),
    ("rope_arity", "attention a {\n  input p[b, m]\n  q = rope(q, p[b, m])\n}\n",
     "rope takes (x, position, theta[, dims]), got 2", 3, "rope(", None),
    ("rope_param_position", "attention a {\n  param p[b, m]\n  q = rope(q, p[b, m], 10.0)\n}\n",
     "a rope position cannot read param p", 3, "p[b, m], 10", "never differentiated"),
    ("rope_query_position_n", "attention a {\n  q = rope(q, n, 10.0)\n}\n",
     "a rope position cannot use n", 2, "n, 10", "b, h, m"),
    ("rope_odd_dims", "attention a {\n  q = rope(q, m, 10.0, 3)\n}\n",
     "rope's dims must be a positive even integer, got 3", 2, "3)", None),
    ("rope_theta", "attention a {\n  option t = -1.0\n  q = rope(q, m, t)\n}\n",
     "rope's theta must be a positive number", 3, "t)", None),
    ("gain_not_access", "attention a {\n  q = l2norm(q, 2)\n}\n",
     "l2norm's gain must be a param access", 2, "2)", "g[h, d]"),
    ("gain_input", "attention a {\n  input w[d]\n  q = l2norm(q, w[d])\n}\n",
     "l2norm's gain must be a param, w is an input", 3, "w[d])", None),
    ("gain_without_d", "attention a {\n  param w[h]\n  q = l2norm(q, w[h])\n}\n",
     "l2norm's gain is indexed by d", 3, "w[h])", None),
    ("d_in_score", "attention a {\n  score = dot(q, k) * d\n}\n",
     "'d' (the feature index) is only allowed", 2, "d\n", "head dim D"),
    ("key_factor_uses_m", "attention a {\n  param t[b, h, m]\n  k = k * t[b, h, m]\n}\n",
     "a row factor cannot use m", 3, "t[b", "b, h, n"),
    ("rope_outside_prologue", "attention a {\n  score = rope(q, m, 1.0)\n}\n",
     "rope is only allowed in a prologue", 2, "rope", "q = rope(q"),
    ("dot_swapped", "attention a {\n  score = dot(k, q)\n}\n",
     "dot(k, q) must dot a query-side operand with a key-side one", 2, "dot", "dot(q, k)"),
    ("dot_value", "attention a {\n  score = dot(q, v)\n}\n",
     "dot cannot read v", 2, "v)", "v = k"),
    ("dot_unknown", "attention a {\n  score = dot(q, x)\n}\n",
     "unknown operand 'x'", 2, "x)", "operand x[n]"),
    ("dot_expression", "attention a {\n  score = dot(q, k + 1)\n}\n",
     "dot takes two operand names", 2, "dot", None),
    ("dots_product", "attention a {\n  operand qr[m], kr[n]\n"
                     "  score = dot(q, k) * dot(qr, kr)\n}\n",
     "only through one sum of them with number weights", 3, "dot(q", "(dot(q, k) + dot(qr"),
    ("dots_row_weight", "attention a {\n  operand qr[m], kr[n]\n"
                        "  score = dot(q, k) + m * dot(qr, kr)\n}\n",
     "a relative weight is m", 3, "dot(q", None),
    ("mask_reads_dot", "attention a {\n  operand qr[m], kr[n]\n  let t = dot(qr, kr)\n"
                       "  mask = t > 0\n}\n",
     "a mask cannot read dot(qr, kr)", 4, "t > 0", None),
    ("weight_reads_dot", "attention a {\n  operand qr[m], kr[n]\n  weight = dot(qr, kr)\n"
                         "  normalize = sigmoid\n}\n",
     "a weight cannot read dot(qr, kr)", 3, "dot", None),
    ("value_query_side", "attention a {\n  operand qr[m]\n  v = qr\n}\n",
     "the value must be a key-side operand, qr is query-side", 3, "qr\n", None),
    ("value_twice", "attention a {\n  operand c[n]\n  v = c\n  v = k\n}\n",
     "'v' is given twice", 4, "v = k", "line 3"),
    ("value_and_prologue", "attention a {\n  operand c[n]\n  v = c\n  v = v * 2\n}\n",
     "v is c here: it cannot also be transformed", 4, "v = v", "c = ..."),
    ("prologue_then_value", "attention a {\n  operand c[n]\n  v = v * 2\n  v = c\n}\n",
     "v is transformed by a prologue: it cannot also be c", 4, "v = c", None),
    ("gate_uses_n", "attention a {\n  gate = n\n}\n",
     "gate cannot use n", 2, "n\n", "one value per query row"),
    ("gate_reads_qk", "attention a {\n  let s = dot(q, k)\n  gate = s\n  score = s\n}\n",
     "gate cannot read dot(q, k)", 3, "s\n", None),
    ("kv_head_param", "attention a {\n  param hm[h]\n  kv_head = hm[h]\n}\n",
     "kv_head cannot read param hm", 3, "hm[h]", "integer expression of h"),
    ("kv_head_fraction", "attention a {\n  kv_head = h / 2\n}\n",
     "kv_head must be an integer expression", 2, "h / 2", "h // 2"),
    ("kv_head_batch", "attention a {\n  input hm[b]\n  kv_head = hm[b]\n}\n",
     "kv_head cannot use b", 3, "hm[b]", None),
    ("premix_uses_n", "attention a {\n  param w[h, h]\n  premix = w[h, g] * n\n}\n",
     "premix cannot use n", 3, "w[h, g] * n", "w[h, g]"),
    ("g_outside_mixing", "attention a {\n  param w[h, h]\n  gate = w[h, g]\n}\n",
     "unknown name 'g'", 3, "g]", None),
    ("member_in_or", "attention a {\n  input idx[b, h, m, 4]\n"
                     "  mask = n <= m or n in idx[b, h, m, :]\n}\n",
     "`in` (gathered keys) is only allowed as a top-level `and` conjunct", 3,
     "n in", "n <= m and n in"),
    ("member_param", "attention a {\n  param idx[b, h, m, 4]\n"
                     "  mask = n in idx[b, h, m, :]\n}\n",
     "gathered keys are listed in an input, idx is a param", 3, "idx[", "input idx"),
    ("member_dims", "attention a {\n  input idx[b, h, m, 4]\n  mask = n in idx[b, h, :]\n}\n",
     "idx has 4 dimensions: index all but its last", 3, "n in", None),
    ("member_left", "attention a {\n  input idx[b, h, m, 4]\n  mask = m in idx[b, h, m, :]\n}\n",
     "the left side of `in` is n or n // C", 3, "m in", "n // C"),
    ("member_index_n", "attention a {\n  input idx[b, h, n, 4]\n"
                       "  mask = n in idx[b, h, n, :]\n}\n",
     "an index of idx cannot use n", 3, "n, :", None),
    ("member_twice", "attention a {\n  input i1[b, h, m, 4], i2[b, h, m, 4]\n"
                     "  mask = n in i1[b, h, m, :] and n in i2[b, h, m, :]\n}\n",
     "a mask lists gathered keys once", 3, "n in i2", None),
    ("gate_twice", "attention a {\n  gate = 1\n  gate = 2\n}\n",
     "'gate' is given twice", 3, "gate", "line 2"),
    ("let_named_operand", "attention a {\n  operand c[n]\n  let c = 1\n  v = c\n}\n",
     "'c' is already defined", 3, "c = 1", None),
    ("operand_as_number", "attention a {\n  operand c[n]\n  score = c * 2\n  v = c\n}\n",
     "'c' is not a number here", 3, "c * 2", "dot(q, k)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refusals_point_at_the_culprit(case):
    _, text, message, line, anchor, hint = case
    with pytest.raises(SpecError) as exc:
        frontend(read_spec(text))
    err = exc.value
    assert message in err.message
    assert err.line == line
    source_line = text.splitlines(keepends=True)[line - 1]
    assert err.column == source_line.index(anchor) + 1, (err.column, source_line)
    rendered = str(err).splitlines()
    assert rendered[0] == f"<spec>:{line}:{err.column}: {err.message}"
    assert rendered[2] == "    " + " " * (err.column - 1) + "^"
    if hint is None:
        return
    assert hint in err.hint
