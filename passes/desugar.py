"""desugar: an `attention` block into FuseMax's 3-pass softmax cascade (cascades pass through).

    QK[m, n] = sum(e) Q[m, e]*K[n, e]
    S[m, n]  = <score>                      (omitted when the score is plain QK)
    SM[m, n] = where(<mask>, S, -oo)        (omitted without a mask)
    GM[m]    = max(n) SM[m, n]
    SN[m, n] = exp(SM[m, n] - GM[m])
    SD[m]    = sum(n) SN[m, n]
    A[m, n]  = SN[m, n] / SD[m]
    AV[m, f] = sum(n) A[m, n]*V[n, f]
    O[m, f]  = where(GM[m] == -oo, 0, AV[m, f])           rows that see no key give 0 ...
    LSE[m]   = where(GM[m] == -oo, -oo, GM[m] + log(SD[m]))   ... and lse = -inf
"""

from __future__ import annotations

import sympy

from attnc import symbols as S
from attnc.ir import AttentionSpec, Cascade, Einsum, TensorDecl

NAME = "desugar"
MASK_NODE = "SM"  # the masking einsum; mask_bounds finds a block-sparse kernel's mask here


def _t(name: str, *ranks) -> sympy.Indexed:
    return S.access(name, *ranks)


def softmax_cascade(score_tensor: str) -> list[Einsum]:
    """The FuseMax 3-pass softmax over n of `score_tensor[m, n]`, plus output guards."""
    m, n, f = S.m, S.n, S.f
    x = _t(score_tensor, m, n)
    gm, sd = _t("GM", m), _t("SD", m)
    empty = sympy.Eq(gm, -sympy.oo)
    return [
        Einsum("GM", ("m",), x, "max", ("n",)),
        Einsum("SN", ("m", "n"), sympy.exp(x - gm)),
        Einsum("SD", ("m",), _t("SN", m, n), "sum", ("n",)),
        Einsum("A", ("m", "n"), _t("SN", m, n) / sd),
        Einsum("AV", ("m", "f"), _t("A", m, n) * _t("V", n, f), "sum", ("n",)),
        Einsum("O", ("m", "f"), sympy.Piecewise((0, empty), (_t("AV", m, f), True))),
        Einsum("LSE", ("m",), sympy.Piecewise((-sympy.oo, empty), (gm + sympy.log(sd), True))),
    ]


def run(spec: AttentionSpec | Cascade) -> Cascade:
    if isinstance(spec, Cascade):
        return spec
    m, n = S.m, S.n
    nodes = [Einsum("QK", ("m", "n"), _t("Q", m, S.e) * _t("K", n, S.e), "sum", ("e",))]
    current = "QK"
    if spec.score != _t("QK", m, n):
        nodes.append(Einsum("S", ("m", "n"), spec.score))
        current = "S"
    if spec.mask is not None:
        nodes.append(Einsum(MASK_NODE, ("m", "n"),
                            sympy.Piecewise((_t(current, m, n), spec.mask), (-sympy.oo, True))))
        current = MASK_NODE
    nodes += softmax_cascade(current)
    operands = tuple(TensorDecl(t, "operand", tuple(S.RANKS[r] for r in rk))
                     for t, rk in S.OPERANDS.items())
    return Cascade(name=spec.name, decls=operands + spec.decls, nodes=tuple(nodes),
                   outputs=(("out", "O"), ("lse", "LSE")), options=spec.options,
                   source_kind="attention", block_sparse=spec.block_sparse)
