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


def access(name: str, *index) -> sympy.Indexed:
    """name[index...]: a tensor access."""
    return sympy.IndexedBase(name)[tuple(index)]


def at(name: str, *ranks: str) -> sympy.Indexed:
    """name[ranks...] for rank names ("m", "n", "e", "f")."""
    return access(name, *(RANKS[r] for r in ranks))
