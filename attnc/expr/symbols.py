"""The sympy vocabulary shared by every IR level.

Softmax family: index symbols name positions (b batch, h query head, m query, n key, e/f
head-dim ranks); size symbols name extents; `scale` is the runtime softmax scale; m_lo/m_hi and
n_lo/n_hi bound a tile's rows or keys; `qk` is one (query, key) pair's dot product.

Linear family (a scan over time t): feature axes i (key features, extent DK) and j (value
features, extent DV), the length T and q's head dim D before any feature map.
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
# The feature (head-dim) index of a prologue's gain, `l2norm(q, g[h, d])`; as a declared
# dimension, the head dim D of q and k.
d = sympy.Symbol("d", integer=True, nonnegative=True)

INDEX = {"b": b, "h": h, "m": m, "n": n}
RANKS = {"m": m, "n": n, "e": e, "f": f}
SIZE_OF = {b: B, h: H, m: M, n: N}
SIZES = {"B": B, "H": H, "M": M, "N": N}

Q = sympy.IndexedBase("Q")
K = sympy.IndexedBase("K")
V = sympy.IndexedBase("V")
OPERANDS = {"Q": ("m", "e"), "K": ("n", "e"), "V": ("n", "f")}

# --- scans (`linear` blocks) -------------------------------------------------------------------
i, j = sympy.symbols("i j", integer=True, nonnegative=True)
t = sympy.Symbol("t", integer=True, nonnegative=True)
T, DK, DV, D = sympy.symbols("T DK DV D", integer=True, positive=True)
AXES = {"i": i, "j": j}
EXTENT = {i: DK, j: DV}


def compare(op: str, a, b) -> sympy.Expr:
    """a <op> b for op in < <= > >= == !=, in one canonical form: > and >= are written as < and
    <= with the sides swapped, so `q_idx >= kv_idx` and `n <= m` are the same IR."""
    if op in (">", ">="):
        a, b, op = b, a, op.replace(">", "<")
    return {"<": sympy.Lt, "<=": sympy.Le, "==": sympy.Eq, "!=": sympy.Ne}[op](a, b)


def integral_relation(rel: sympy.Expr) -> sympy.Expr:
    """A comparison of integer-valued sides with its denominators cleared. sympy canonicalizes
    `m - n <= 6*h + 2` to `h >= m/6 - n/6 - 1/3`, whose sides are no longer integers; evaluated
    in floating point the two sides of a tie can round apart (1/6 * 8 - 1/3 is not exactly 1),
    so both sides are multiplied by the least common denominator: `6*h >= m - n - 2`."""
    lhs, rhs = rel.args
    free = lhs.free_symbols | rhs.free_symbols
    if not free or not all(x.is_integer for x in free) or not (
            lhs.is_polynomial(*free) and rhs.is_polynomial(*free)):
        return rel
    coeffs = sympy.Poly(lhs - rhs, *free).coeffs()
    if not all(c.is_Rational for c in coeffs):
        return rel
    den = sympy.ilcm(1, *(sympy.Rational(c).q for c in coeffs))
    return rel if den == 1 else rel.func(sympy.expand(den * lhs), sympy.expand(den * rhs),
                                         evaluate=False)


def access(name: str, *index) -> sympy.Indexed:
    """name[index...]: a tensor access."""
    return sympy.IndexedBase(name)[tuple(index)]


def at(name: str, *ranks: str) -> sympy.Indexed:
    """name[ranks...] for rank names ("m", "n", "e", "f")."""
    return access(name, *(RANKS[r] for r in ranks))
