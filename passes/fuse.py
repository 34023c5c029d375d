"""fuse: a scheduled one-pass cascade into one AttentionKernel.

Map einsums are inlined into the score (mask_bounds already did this), the q.k reduction
QK[m, n] = sum(e) Q[m, e]*K[n, e]*c becomes c*qk (qk is the tile's dot product), and every read of
a `param`/`input` becomes a Load placed at the outermost loop level its index allows: per program
when it depends on (b, h) only, per query row, per key, or per (row, key) element. autodiff's
derivatives (of the score in q.k and in each param load) are carried over in the same symbols
for the backward kernels.
"""

from __future__ import annotations

import sympy

from attnc import symbols as S
from attnc.errors import CompileError
from attnc.ir import Cascade, Einsum, OnlineSoftmax, ScatterSum
from attnc.kernel_ir import AttentionKernel, Gradient, Load

NAME = "fuse"


def qk_factor(c: Cascade, einsum: Einsum) -> sympy.Expr:
    """For sum(e) Q[m, e]*K[n, e]*c return c (which must not depend on e)."""
    core = S.access("Q", S.m, S.e) * S.access("K", S.n, S.e)
    factor = sympy.simplify(einsum.expr / core)
    if (einsum.reduce != "sum" or einsum.over != ("e",) or factor.has(S.e)
            or factor.atoms(sympy.Indexed)):
        raise CompileError(f"{c.name}: {einsum.name} must be the q.k product "
                           "sum(e) Q[m, e]*K[n, e] (times a factor free of e)")
    return factor


def _level(index: tuple[sympy.Expr, ...]) -> str:
    free = set().union(*(sympy.sympify(i).free_symbols for i in index)) if index else set()
    has_m, has_n = S.m in free, S.n in free
    return {(False, False): "program", (True, False): "row",
            (False, True): "key", (True, True): "tile"}[(has_m, has_n)]


def _extract_loads(c: Cascade, exprs, loads: dict):
    external = {d.name for d in c.extra_inputs}
    out = []
    for ex in exprs:
        if ex is None:
            out.append(None)
            continue
        subs = {}
        for acc in sorted(ex.atoms(sympy.Indexed), key=sympy.default_sort_key):
            name = str(acc.base)
            if name not in external:
                raise CompileError(f"{c.name}: the score reads {name}, which would have to be "
                                   "materialized; only q.k, params and inputs can be fused")
            if acc not in loads:
                loads[acc] = Load(f"{name}_{sum(l.tensor == name for l in loads.values())}",
                                  name, tuple(acc.indices), _level(acc.indices))
            subs[acc] = sympy.Symbol(loads[acc].name, real=True)
        out.append(ex.xreplace(subs))
    return out


def _gradient(c: Cascade, qk_subs: dict, loads: dict) -> Gradient:
    """autodiff's per-element derivatives in the kernel's symbols (qk and the loads)."""
    bwd = c.backward
    dqk, = _extract_loads(c, [bwd.node("DQK").expr.xreplace(qk_subs)], loads)
    dloads = []
    for nd in bwd.nodes:
        if isinstance(nd, ScatterSum):
            for i, (index, _) in enumerate(nd.terms):
                deriv, = _extract_loads(c, [bwd.node(f"D_{nd.param}_{i}").expr.xreplace(qk_subs)],
                                        loads)
                dloads.append((loads[S.access(nd.param, *index)].name, deriv))
    return Gradient(dqk=dqk, dloads=tuple(dloads), rows=c.bounds.rows)


def run(c: Cascade) -> AttentionKernel:
    scan = next(nd for nd in c.nodes if isinstance(nd, OnlineSoftmax))
    if scan.value != S.access("V", S.n, S.f):
        raise CompileError(f"{c.name}: the softmax must weight V[n, f] directly, got {scan.value}")
    bounds = c.bounds
    qk_subs = {}
    for nd in c.nodes:
        if isinstance(nd, Einsum) and nd.reduce is not None:
            acc = S.access(nd.name, *(S.RANKS[r] for r in nd.ranks))
            if bounds.score.has(acc) or (bounds.mask is not None and bounds.mask.has(acc)):
                qk_subs[acc] = S.qk * qk_factor(c, nd)
    score = bounds.score.xreplace(qk_subs)
    mask = bounds.mask.xreplace(qk_subs) if bounds.mask is not None else None
    loads: dict = {}
    score, mask = _extract_loads(c, [score, mask], loads)
    if mask is not None and mask.has(S.qk):
        raise CompileError(f"{c.name}: a mask may not depend on q.k (use the score instead)")
    grad = _gradient(c, qk_subs, loads) if c.backward is not None else None
    return AttentionKernel(name=c.name, inputs=c.extra_inputs, loads=tuple(loads.values()),
                           score=score, mask=mask, segments=bounds.segments,
                           exact_bounds=bounds.exact, schedule=c.schedule, grad=grad,
                           no_backward=c.no_backward)
