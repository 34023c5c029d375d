"""The cascade language's additions (extra ranks, scans, masks, nested reductions) and the
attention block's normalizers, weights and sinks: how each lowers, that the lowered cascades
compute what the math says (reference interpreter, float64, against torch), and that every
malformed input is refused at its line and column with a caret.

Columns are 1-based; the `# col` comments count them.
"""

from __future__ import annotations

import pytest
import sympy
import torch

from attnc.backends.reference.cascade import interpret
from attnc.errors import SpecError
from attnc.expr import symbols as S
from attnc.ir.cascade import (AttentionSpec, Cascade, Normalizer, Reduce, format_cascade,
                              origin_of, verify)
from attnc.pipeline import frontend, read_spec

B, H, M, N, D, DV = 1, 2, 6, 6, 4, 3


def lower(text: str, options: dict | None = None) -> Cascade | AttentionSpec:
    ir = frontend(read_spec(text), options)[1]
    if isinstance(ir, Cascade):
        verify(ir)
    return ir


def spec_error(text: str, options: dict | None = None) -> SpecError:
    with pytest.raises(SpecError) as exc:
        frontend(read_spec(text), options)
    return exc.value


def assert_located(err: SpecError, message: str, line: int, column: int) -> None:
    """The message, position and the rendering `file:line:col: message`, the source line and a
    caret under the column."""
    assert message in err.message, str(err)
    assert (err.line, err.column) == (line, column), str(err)
    lines = str(err).splitlines()
    assert lines[0] == f"<spec>:{line}:{column}: {err.message}"
    assert lines[1] == "    " + err.source.splitlines()[line - 1]
    assert lines[2] == "    " + " " * (column - 1) + "^"


def einsums(c: Cascade) -> dict[str, str]:
    return {nd.name: str(nd) for nd in c.nodes}


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (M, N))
    v = torch.randn(B, H, N, DV, generator=g, dtype=torch.float64)
    return q, k, v


def _run(c: Cascade, q, k, v, **inputs):
    return interpret(c, q, k, v, scale=1.0, inputs=inputs)["out"]


def _causal(strict: bool = False) -> torch.Tensor:
    m, n = torch.arange(M)[:, None], torch.arange(N)[None, :]
    return n < m if strict else n <= m


# --- lowering ------------------------------------------------------------------------------------

STICK = """\
cascade stick {
  mask = n < m
  QK[m, n] = Q[m, e] * K[n, e]
  R[m, n] = rcumsum(n) softplus(QK[m, n])
  A[m, n] = sigmoid(QK[m, n]) * exp(softplus(QK[m, n]) - R[m, n])
  O[m, f] = sum(n) A[m, n] * V[n, f]
}
"""


def test_mask_and_scan_lower_to_the_cascade_fields():
    c = lower(STICK)
    assert c.mask == sympy.Lt(S.n, S.m)
    r = c.einsum("R")
    assert (r.reduce, r.over, r.ranks, r.iteration) == (Reduce.RCUMSUM, ("n",), ("m", "n"),
                                                         ("m", "n"))
    assert "mask n < m" in format_cascade(c)
    # the mask's statement is the origin "mask"
    assert (origin_of(c.origins, "mask").line, origin_of(c.origins, "mask").column) == (2, 3)


def test_stick_breaking_evaluates_to_its_math():
    q, k, v = _inputs()
    c = lower(STICK)
    s = q @ k.transpose(-1, -2)
    vis = _causal(strict=True)
    beta = torch.sigmoid(s)
    # w[m, n] = beta[m, n] * prod over visible j > n of (1 - beta[m, j])
    w = torch.zeros_like(s)
    for i in range(M):
        for j in range(N):
            if vis[i, j]:
                later = [jj for jj in range(j + 1, N) if vis[i, jj]]
                w[..., i, j] = beta[..., i, j] * torch.prod(1 - beta[..., i, later], dim=-1)
    torch.testing.assert_close(_run(c, q, k, v), w @ v, rtol=1e-9, atol=1e-9)


def test_cumsum_along_n_and_m():
    text = ("cascade c {\n"
            "  QK[m, n] = Q[m, e] * K[n, e]\n"
            "  C[m, n] = cumsum(n) sigmoid(QK[m, n])\n"
            "  O[m, f] = sum(n) C[m, n] * V[n, f] + cumsum(m) sum(n) QK[m, n] * V[n, f]\n"
            "}\n")
    c = lower(text)
    assert einsums(c)["O_sum_1"] == "O_sum_1[m, f] = sum(n) QK[m, n]*V[n, f]"
    assert einsums(c)["O_cumsum"] == "O_cumsum[m, f] = cumsum(m) O_sum_1[m, f]"
    q, k, v = _inputs(1)
    s = q @ k.transpose(-1, -2)
    want = torch.sigmoid(s).cumsum(-1) @ v + (s @ v).cumsum(-2)
    torch.testing.assert_close(_run(c, q, k, v), want, rtol=1e-9, atol=1e-9)


def test_masked_cumsum_skips_invisible_keys():
    text = ("cascade c {\n"
            "  mask = n <= m\n"
            "  QK[m, n] = Q[m, e] * K[n, e]\n"
            "  C[m, n] = cumsum(n) exp(QK[m, n])\n"
            "  O[m, f] = sum(n) exp(QK[m, n]) / C[m, n] * V[n, f]\n"
            "}\n")
    q, k, v = _inputs(2)
    p = torch.exp(q @ k.transpose(-1, -2)).masked_fill(~_causal(), 0)
    w = (p / p.cumsum(-1)).nan_to_num(0.0).masked_fill(~_causal(), 0)
    torch.testing.assert_close(_run(lower(text), q, k, v), w @ v, rtol=1e-9, atol=1e-9)


def test_nested_reductions_are_hoisted_and_shared():
    text = ("cascade c {\n"
            "  QK[m, n] = Q[m, e] * K[n, e]\n"
            "  O[m, f] = sum(n) exp(QK[m, n] - max(n) QK[m, n]) * V[n, f]"
            " / sum(n) exp(QK[m, n] - max(n) QK[m, n])\n"
            "}\n")
    c = lower(text)
    assert [nd.name for nd in c.nodes] == ["QK", "O_max", "O_sum", "O"]
    assert einsums(c)["O_sum"] == "O_sum[m] = sum(n) exp(-O_max[m] + QK[m, n])"
    assert c.einsum("O").over == ("n",)
    # a hoisted reduction's origin is its reduction
    assert (origin_of(c.origins, "O_max").line, origin_of(c.origins, "O_max").column) == (3, 35)
    q, k, v = _inputs(3)
    torch.testing.assert_close(_run(c, q, k, v), torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
                               rtol=1e-9, atol=1e-9)


GROUPED = """\
cascade grouped {
  option groups = 3
  param w[H, groups]
  rank c = groups
  QK[m, n] = Q[m, e] * K[n, e]
  P[m, n, c] = where(n % groups == c, exp(QK[m, n]), 0)
  Z[m, c] = sum(n) P[m, n, c]
  A[m, n] = sum(c) exp(w[h, c]) * P[m, n, c] / Z[m, c]
  O[m, f] = sum(n) (A[m, n] + P[m, n, 0] / max(c) Z[m, c]) * V[n, f]
}
"""


def test_extra_ranks_unroll():
    c = lower(GROUPED)
    names = [nd.name for nd in c.nodes]
    assert names == ["QK", "P_c0", "P_c1", "P_c2", "Z_c0", "Z_c1", "Z_c2", "A", "O"]
    assert einsums(c)["Z_c1"] == "Z_c1[m] = sum(n) P_c1[m, n]"
    assert "w[h, 2]" in einsums(c)["A"] and "Max(Z_c0[m], Z_c1[m], Z_c2[m])" in einsums(c)["O"]
    assert all(set(nd.ranks) <= set(S.RANKS) for nd in c.nodes)
    # every copy's origin is its statement
    assert {(o.tensor, o.line) for o in c.origins if o.tensor.startswith("P_")} == {
        ("P_c0", 6), ("P_c1", 6), ("P_c2", 6)}
    q, k, v = _inputs(4)
    w = torch.randn(H, 3, dtype=torch.float64)
    s = q @ k.transpose(-1, -2)
    group = torch.arange(N) % 3
    p = [torch.where(group == g, torch.exp(s), torch.zeros_like(s)) for g in range(3)]
    z = [pg.sum(-1, keepdim=True) for pg in p]
    a = sum(torch.exp(w[:, g]).view(1, H, 1, 1) * p[g] / z[g] for g in range(3))
    want = (a + p[0] / torch.maximum(torch.maximum(z[0], z[1]), z[2])) @ v
    torch.testing.assert_close(_run(c, q, k, v, w=w), want, rtol=1e-9, atol=1e-9)


def test_an_option_sizes_an_extra_rank():
    c = lower(GROUPED, {"groups": 2})
    assert [nd.name for nd in c.nodes][:3] == ["QK", "P_c0", "P_c1"]


def test_sum_over_n_and_an_extra_rank():
    text = ("cascade c {\n"
            "  rank c = 2\n"
            "  param w[2]\n"
            "  QK[m, n] = Q[m, e] * K[n, e]\n"
            "  X[m, n, c] = exp(QK[m, n] * w[c])\n"
            "  Z[m] = sum(n, c) X[m, n, c]\n"
            "  O[m, f] = sum(n) X[m, n, 1] / Z[m] * V[n, f]\n"
            "}\n")
    c = lower(text)
    assert einsums(c)["Z"] == "Z[m] = sum(n) X_c0[m, n] + X_c1[m, n]"
    q, k, v = _inputs(5)
    w = torch.tensor([0.5, -1.0], dtype=torch.float64)
    s = q @ k.transpose(-1, -2)
    x = [torch.exp(s * w[i]) for i in range(2)]
    z = (x[0] + x[1]).sum(-1, keepdim=True)
    torch.testing.assert_close(_run(c, q, k, v, w=w), x[1] / z @ v, rtol=1e-9, atol=1e-9)


def test_unread_copies_are_dropped_and_fresh_names_avoid_declared_ones():
    text = ("cascade c {\n"
            "  rank c = 3\n"
            "  param X_c0[H]\n"
            "  QK[m, n] = Q[m, e] * K[n, e] * X_c0[h]\n"
            "  X[m, n, c] = QK[m, n] * c\n"
            "  O[m, f] = sum(n) X[m, n, 2] * V[n, f]\n"
            "}\n")
    c = lower(text)
    assert [nd.name for nd in c.nodes] == ["QK", "X_c2", "O"]
    assert einsums(c)["X_c2"] == "X_c2[m, n] = 2*QK[m, n]"


def test_attention_block_fields():
    text = ("attention a {\n"
            "  option iters = 2\n"
            "  param sinks[H], g[H]\n"
            "  weight = sigmoid(dot(q, k) + g[h])\n"
            "  sink = sinks[h] * 2\n"
            "}\n")
    spec = lower(text.replace("  option iters = 2\n", ""))
    assert spec.normalize is Normalizer.SOFTMAX
    assert spec.sink == 2 * S.access("sinks", S.h)
    assert spec.weight.has(S.access("QK", S.m, S.n))
    assert {o.tensor: (o.line, o.column) for o in spec.origins} == {
        "": (1, 1), "weight": (3, 3), "sink": (4, 3)}
    for normalize, nz, f, k in (("sigmoid", Normalizer.SIGMOID, None, 0),
                                ("relu2", Normalizer.RELU2, None, 0),
                                ("none", Normalizer.NONE, None, 0),
                                ("l1(softplus)", Normalizer.L1, Normalizer.SOFTPLUS, 0),
                                ("mean(none)", Normalizer.MEAN, Normalizer.NONE, 0),
                                ("standardize", Normalizer.STANDARDIZE, None, 0),
                                ("sinkhorn(3)", Normalizer.SINKHORN, None, 3),
                                ("sinkhorn(iters)", Normalizer.SINKHORN, None, 2)):
        spec = lower(f"attention a {{\n  option iters = 2\n  normalize = {normalize}\n}}\n"
                     if "iters" in normalize else
                     f"attention a {{\n  normalize = {normalize}\n}}\n")
        assert (spec.normalize, spec.pointwise, spec.iterations) == (nz, f, k)
        assert f"normalize = {normalize}".replace("iters", "2") in str(spec)
        assert origin_of(spec.origins, "normalize").line == (3 if "iters" in normalize else 2)


# --- located errors ------------------------------------------------------------------------------

CASCADE_HEAD = "cascade c {\n  QK[m, n] = Q[m, e] * K[n, e]\n"

# (id, spec, message, line, column, options)
ERRORS = [
    # --- extra ranks -----------------------------------------------------------------------------
    ("rank_too_large",
     "cascade c {\n  rank c = 17\n" + CASCADE_HEAD[12:]
     + "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",
     "rank c has 17 values; an extra rank has 1 to 16", 2, 12, None),
    ("rank_zero_by_option",
     "cascade c {\n  option g = 2\n  rank c = g\n" + CASCADE_HEAD[12:]
     + "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",  # 'g' is column 12
     "rank c has 0 values", 3, 12, {"g": 0}),
    ("rank_not_integer",
     "cascade c {\n  rank c = 2.5\n}\n",
     "the size of rank c must be an integer", 2, 12, None),
    ("rank_name_taken",
     "cascade c {\n  option w = 2\n  rank w = 2\n}\n",   # the second 'w' is column 8
     "'w' is already defined", 3, 8, None),
    ("rank_never_used",
     "cascade c {\n  rank c = 2\n" + CASCADE_HEAD[12:]
     + "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",      # 'c' is column 8
     "rank c is declared but never used", 2, 8, None),
    ("rank_unbound",
     "cascade c {\n  rank c = 2\n" + CASCADE_HEAD[12:]
     + "  O[m, f] = sum(n) QK[m, n] * c * V[n, f]\n}\n",  # 'c' is column 31
     "rank c is not bound here", 4, 31, None),
    ("extra_rank_on_left_unused",
     "cascade c {\n  rank c = 2\n" + CASCADE_HEAD[12:]
     + "  X[m, n, c] = QK[m, n]\n"                          # 'c' is column 11
     + "  O[m, f] = sum(n) X[m, n, 0] * V[n, f]\n}\n",
     "rank c of X is not used on the right side", 4, 11, None),
    ("copy_index_out_of_range",
     "cascade c {\n  rank c = 2\n" + CASCADE_HEAD[12:]
     + "  X[m, n, c] = QK[m, n] * c\n"
     + "  O[m, f] = sum(n) X[m, n, 2] * V[n, f]\n}\n",     # '2' is column 28
     "X's index along rank c must be a constant in 0..1, got 2", 5, 28, None),
    ("extra_rank_reduced_twice",
     "cascade c {\n  rank c = 2\n" + CASCADE_HEAD[12:]
     + "  X[m, n, c] = QK[m, n] * sum(c) c\n"              # 'sum(c)' is column 27
     + "  O[m, f] = sum(n) X[m, n, 0] * V[n, f]\n}\n",
     "rank c is bound here", 4, 27, None),
    ("output_with_extra_rank",
     "cascade c {\n  rank c = 2\n" + CASCADE_HEAD[12:]
     + "  O[m, f, c] = sum(n) QK[m, n] * c * V[n, f]\n}\n",
     "the output O is indexed [m, f, c]; a cascade's output is indexed [m, f]", 4, 3, None),
    # --- scans -----------------------------------------------------------------------------------
    ("scan_over_two_ranks",
     CASCADE_HEAD + "  C[m, n] = cumsum(m, n) QK[m, n]\n"   # 'cumsum' is column 13
     "  O[m, f] = sum(n) C[m, n] * V[n, f]\n}\n",
     "cumsum scans one rank, m or n", 3, 13, None),
    ("scan_over_e",
     CASCADE_HEAD + "  C[m, e] = rcumsum(e) Q[m, e]\n"
     "  O[m, f] = sum(n) QK[m, n] * V[n, f] * sum(e) C[m, e]\n}\n",
     "rcumsum scans one rank, m or n", 3, 13, None),
    ("scan_rank_not_on_left",
     CASCADE_HEAD + "  C[m] = cumsum(n) QK[m, n]\n"       # 'cumsum' is column 10
     "  O[m, f] = sum(n) C[m] * QK[m, n] * V[n, f]\n}\n",
     "cumsum(n) keeps rank n: it must be on the left", 3, 10, None),
    ("scan_operand_lacks_rank",
     CASCADE_HEAD + "  GM[m] = max(n) QK[m, n]\n"
     "  O[m, f] = sum(n) QK[m, n] * V[n, f] * cumsum(n) GM[m]\n}\n",  # 'cumsum' is column 41
     "cumsum(n) reduces rank n, which its operand does not have", 4, 41, None),
    # --- reductions and ranks ---------------------------------------------------------------------
    ("nested_reduction_over_missing_rank",
     CASCADE_HEAD + "  GM[m] = max(n) QK[m, n]\n"
     "  O[m, f] = sum(n) QK[m, n] * V[n, f] / sum(n) GM[m]\n}\n",     # 'sum' is column 41
     "sum(n) reduces rank n, which its operand does not have", 4, 41, None),
    ("top_reduction_over_missing_rank",
     CASCADE_HEAD + "  GM[m] = max(n) QK[m, n]\n"
     "  X[m] = sum(n) GM[m]\n"                               # 'sum(n)' is column 10
     "  O[m, f] = sum(n) X[m] * QK[m, n] * V[n, f]\n}\n",
     "sum(n) reduces rank n, which its operand does not have", 4, 10, None),
    ("left_rank_not_produced",
     CASCADE_HEAD + "  GM[m] = max(n) QK[m, n]\n"
     "  X[m, n] = GM[m]\n"                                    # 'n' is column 8
     "  O[m, f] = sum(n) X[m, n] * V[n, f]\n}\n",
     "rank n of X is not used on the right side", 4, 8, None),
    ("output_not_m_f",
     CASCADE_HEAD + "  GM[m] = max(n) QK[m, n]\n}\n",
     "the output GM is indexed [m]; a cascade's output is indexed [m, f]", 3, 3, None),
    ("output_transposed",
     CASCADE_HEAD + "  O[f, m] = sum(n) QK[m, n] * V[n, f]\n}\n",
     "the output O is indexed [f, m]", 3, 3, None),
    ("read_before_defined",
     CASCADE_HEAD + "  GM[m] = max(n) SN[m, n]\n"      # 'SN' is column 18
     "  SN[m, n] = exp(QK[m, n])\n"
     "  O[m, f] = sum(n) SN[m, n] / GM[m] * V[n, f]\n}\n",
     "SN is read before it is defined", 3, 18, None),
    ("self_reference",
     CASCADE_HEAD + "  O[m, f] = sum(n) QK[m, n] * V[n, f] + O[m, f]\n}\n",  # 'O' at column 41
     "O is read before it is defined", 3, 41, None),
    ("unused_statement",
     CASCADE_HEAD + "  X[m] = sum(n) QK[m, n]\n"
     "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",
     "X is computed but never used", 3, 3, None),
    # --- masks -----------------------------------------------------------------------------------
    ("mask_twice",
     "cascade c {\n  mask = n <= m\n  mask = n < m\n" + CASCADE_HEAD[12:]
     + "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",
     "'mask' is given twice", 3, 3, None),
    ("mask_reads_an_einsum",
     "cascade c {\n" + CASCADE_HEAD[12:] + "  mask = QK[m, n] > 0\n"   # 'QK' is column 10
     "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",
     "a mask cannot read QK", 3, 10, None),
    ("mask_uses_e",
     "cascade c {\n  mask = n <= m + e\n" + CASCADE_HEAD[12:]   # the condition is column 10
     + "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",
     "it cannot use rank e", 2, 10, None),
    ("mask_reduces",
     "cascade c {\n  mask = n <= sum(e) m\n" + CASCADE_HEAD[12:]   # 'sum(e)' is column 15
     + "  O[m, f] = sum(n) QK[m, n] * V[n, f]\n}\n",
     "a mask cannot reduce", 2, 15, None),
    ("mask_without_effect",
     "cascade c {\n  mask = n <= m\n  O[m, f] = sum(e) Q[m, e] * f\n}\n",
     "the mask has no effect", 2, 3, None),
    ("reduction_in_attention",
     "attention a {\n  score = sum(n) dot(q, k)\n}\n",   # 'sum(n)' is column 11
     "a reduction is only allowed in a cascade block", 2, 11, None),
    # --- normalizers, weights, sinks --------------------------------------------------------------
    ("unknown_normalizer",
     "attention a {\n  normalize = sparsemax\n}\n",
     "normalizer 'sparsemax' is not supported", 2, 15, None),
    ("l1_without_function",
     "attention a {\n  normalize = l1\n}\n",
     "l1 takes the function it normalizes: l1(f)", 2, 15, None),
    ("mean_of_exp",
     "attention a {\n  normalize = mean(exp)\n}\n",         # 'exp' is column 20
     "mean(exp): the function must be one of sigmoid, softplus, relu, relu2, none", 2, 20, None),
    ("sinkhorn_without_iterations",
     "attention a {\n  normalize = sinkhorn\n}\n",
     "sinkhorn takes its number of iterations: sinkhorn(k)", 2, 15, None),
    ("sinkhorn_zero",
     "attention a {\n  normalize = sinkhorn(0)\n}\n",       # '0' is column 24
     "sinkhorn takes 1 to 32 iterations, got 0", 2, 24, None),
    ("sinkhorn_too_many_by_option",
     "attention a {\n  option it = 2\n  normalize = sinkhorn(it)\n}\n",
     "sinkhorn takes 1 to 32 iterations, got 40 (with it = 40 given by the caller)", 3, 24,
     {"it": 40}),
    ("sinkhorn_unknown_name",
     "attention a {\n  normalize = sinkhorn(iters)\n}\n",
     "unknown name 'iters'", 2, 24, None),
    ("softmax_with_argument",
     "attention a {\n  normalize = softmax(2)\n}\n",        # '2' is column 23
     "normalizer softmax takes no argument", 2, 23, None),
    ("sink_with_sigmoid",
     "attention a {\n  param s0[H]\n  sink = s0[h]\n  normalize = sigmoid\n}\n",
     "a sink needs normalize = softmax, this block normalizes with sigmoid", 3, 3, None),
    ("weight_with_standardize",
     "attention a {\n  normalize = standardize\n  weight = n\n}\n",
     "a weight cannot follow normalize = standardize", 3, 3, None),
    ("weight_with_sinkhorn",
     "attention a {\n  weight = n\n  normalize = sinkhorn(2)\n}\n",
     "a weight cannot follow normalize = sinkhorn", 2, 3, None),
    ("sink_depends_on_n",
     "attention a {\n  sink = n * 0.5\n}\n",                # the expression is column 10
     "a sink is one logit per row: it cannot depend on n", 2, 10, None),
    ("sink_reads_qk",
     "attention a {\n  sink = dot(q, k)\n}\n",
     "dot(q, k) is only allowed in a score", 2, 10, None),
    ("weight_twice",
     "attention a {\n  weight = 2\n  weight = 3\n}\n",
     "'weight' is given twice", 3, 3, None),
    ("weight_is_a_condition",
     "attention a {\n  weight = n <= m\n}\n",
     "weight must be a number expression, this is a boolean", 2, 12, None),
]


@pytest.mark.parametrize("text, message, line, column, options",
                         [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_located_error(text, message, line, column, options):
    assert_located(spec_error(text, options), message, line, column)


def test_an_unrolling_past_the_limit_is_refused_at_its_statement():
    text = ("cascade c {\n  rank c = 16\n  rank d = 16\n" + CASCADE_HEAD[12:]
            + "  X[m, n, c, d] = QK[m, n] * c * d\n"
            + "  O[m, f] = sum(n, c, d) X[m, n, c, d] * V[n, f]\n}\n")
    assert_located(spec_error(text), "the cascade unrolls into more than 256 einsums", 5, 3)


def test_every_error_case_is_distinct():
    assert len({case[0] for case in ERRORS}) == len(ERRORS)
