"""The sympy vocabulary shared by every IR level.

Index symbols name positions (b batch, h query head, m query, n key, e/f head-dim ranks); size
symbols name extents; `scale` is the runtime softmax scale. `sigmoid` and `softplus` are sympy
functions with derivatives so later passes (autodiff) can differentiate through them.
"""

from __future__ import annotations

import sympy

b, h, m, n = sympy.symbols("b h m n", integer=True, nonnegative=True)
e, f = sympy.symbols("e f", integer=True, nonnegative=True)
B, H, M, N = sympy.symbols("B H M N", integer=True, positive=True)
scale = sympy.Symbol("scale", positive=True)
# First and last valid query row of a query tile: the variables of key-loop bounds.
m_lo, m_hi = sympy.symbols("m_lo m_hi", integer=True, nonnegative=True)
# First and last valid key of a key tile: the variables of the backward's query-loop bounds.
n_lo, n_hi = sympy.symbols("n_lo n_hi", integer=True, nonnegative=True)
# The dot product q.k of one (query, key) pair at tile level.
qk = sympy.Symbol("qk", real=True)

INDEX = {"b": b, "h": h, "m": m, "n": n}
RANKS = {"m": m, "n": n, "e": e, "f": f}
SIZE_OF = {b: B, h: H, m: M, n: N}
SIZES = {"B": B, "H": H, "M": M, "N": N}

Q = sympy.IndexedBase("Q")
K = sympy.IndexedBase("K")
V = sympy.IndexedBase("V")
OPERANDS = {"Q": ("m", "e"), "K": ("n", "e"), "V": ("n", "f")}


class sigmoid(sympy.Function):
    """Logistic function 1 / (1 + exp(-x))."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))
        return None


class softplus(sympy.Function):
    """log(1 + exp(x))."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sympy.log(1 + sympy.exp(x))
        return None


class elu(sympy.Function):
    """x for x > 0, exp(x) - 1 otherwise (the +1 of linear attention's feature map is outside)."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sympy.Piecewise((1, x > 0), (sympy.exp(x), True))

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return x if x > 0 else sympy.exp(x) - 1
        return None


def compare(op: str, a, b) -> sympy.Expr:
    """a <op> b for op in < <= > >= == !=, in one canonical form: > and >= are written as < and
    <= with the sides swapped, so `q_idx >= kv_idx` and `n <= m` are the same IR."""
    if op in (">", ">="):
        a, b, op = b, a, op.replace(">", "<")
    return {"<": sympy.Lt, "<=": sympy.Le, "==": sympy.Eq, "!=": sympy.Ne}[op](a, b)


def access(name: str, *index) -> sympy.Indexed:
    return sympy.IndexedBase(name)[tuple(index)]
