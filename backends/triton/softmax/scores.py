"""How a kernel's score depends on q·k, so the softmax kernels can work in base 2.

exp(s) = exp2(s * log2(e)). When the score is affine in q·k, s = qk * c + r (c and r free of
qk), the base-2 score qk * (c * log2 e) + r * log2 e is one fused multiply-add per element once
c * log2 e is computed per row (or once per program), and the backward's factor dqk = c can be
applied once to the accumulated dq / dk instead of to every element. When moreover r = 0 and
c > 0 (the plain `qk * scale`), the row maximum can be taken over raw q·k: max(qk * c) =
max(qk) * c, which saves the multiply before the max.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.expr import symbols as S

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453  # 1 / LOG2E: base-2 logarithms back to natural ones


@dataclass(frozen=True)
class AffineScore:
    """score == qk * factor + rest, neither of which reads qk."""

    factor: sympy.Expr
    rest: sympy.Expr

    @property
    def plain(self) -> bool:
        """The score is q·k times a factor alone (its max over keys is the factor times q·k's,
        when the factor is positive)."""
        return self.rest == 0


def affine_score(score: sympy.Expr) -> AffineScore | None:
    """The score as qk * factor + rest, or None when it is not affine in qk (softcapping's
    tanh, a square of qk, ...)."""
    score = sympy.sympify(score)
    if not score.has(S.qk):
        return None
    factor = sympy.expand(sympy.diff(score, S.qk))
    if factor.has(S.qk):
        return None
    rest = sympy.expand(score - factor * S.qk)
    if rest.has(S.qk):
        return None
    return AffineScore(factor, rest)


def row_factor(score: sympy.Expr, varying: frozenset[sympy.Symbol]) -> sympy.Expr | None:
    """c when score == qk * c and c reads none of `varying` (the symbols that change within a
    kernel's tile: m, n and the loads indexed by them), so one c holds for a whole tile. Then a
    row's largest score is c * max(qk) for c > 0 and c * min(qk) for c < 0 (rounding is
    monotone), which the forward takes on raw q·k. None otherwise."""
    found = affine_score(score)
    if found is None or not found.plain or found.factor.free_symbols & varying:
        return None
    return found.factor
