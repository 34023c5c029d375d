"""mask_bounds: which keys a query tile must visit, and where the mask need not be evaluated.

The mask (from the OnlineSoftmax scores `where(mask, s, -oo)`, after inlining; for a general
cascade, its `mask` statement, which bounds both the key loops and the query loops of its
stages) is put in negation
normal form. Each comparison that is affine in n (or in floor(n/C)) with a bound monotone in m
gives, for a query tile with rows [m_lo, m_hi], a key range [lo, hi) that holds every visible key
(the hull over the tile's rows) and a range [full_lo, full_hi) visible to every row. `and`
intersects ranges; `or` keeps an ordered list of ranges when their order is provable, else merges
them. Conditions on m alone become all-or-nothing ranges; anything else (data-dependent, modulo)
is the whole key range with no full part — correct, just not pruned. The result is `exact` when
no atom fell back this way and no union was widened to its hull: then, for one row, the segments
are precisely the visible keys (what static block-mask construction relies on).

`tile_schedule` turns segments into the exact list of key tiles a kernel visits and whether each
is masked; the Triton backend emits the same arithmetic, and tests compare it with brute force.
The backward's dk/dv kernel walks the transpose, query tiles per key tile: `query_segments`
analyzes the mask with rows and keys swapped, and `query_tile_schedule` is its walk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import sympy

from attnc.expr import symbols as S
from attnc.ir.cascade import BlockKind, Cascade, Einsum, KeyBounds, KeySegment, OnlineSoftmax
from attnc.passes import Pass, PassKind

ZERO = sympy.Integer(0)


@dataclass(frozen=True)
class _Result:
    segments: tuple[KeySegment, ...]
    exact: bool


def _whole(exact: bool, full: bool) -> _Result:
    return _Result((KeySegment(ZERO, S.N, ZERO, S.N if full else ZERO),), exact)


def monotone(ex: sympy.Expr, x: sympy.Symbol) -> int | None:
    """1: non-decreasing in x, -1: non-increasing, 0: constant, None: unknown."""
    if not ex.has(x):
        return 0
    if ex == x:
        return 1
    if ex.is_Add or isinstance(ex, (sympy.Min, sympy.Max)):
        return _combine([monotone(a, x) for a in ex.args])
    if ex.is_Mul:
        with_x = [a for a in ex.args if a.has(x)]
        if len(with_x) != 1:
            return None
        rest = sympy.Mul(*[a for a in ex.args if not a.has(x)])
        inner = monotone(with_x[0], x)
        if inner is None:
            return None
        if rest.is_positive:
            return inner
        if rest.is_negative:
            return -inner
        return None
    if ex.func in (sympy.floor, sympy.ceiling):
        return monotone(ex.args[0], x)
    return None


def _combine(signs: list[int | None]) -> int | None:
    if None in signs:
        return None
    nonzero = {s for s in signs if s}
    if len(nonzero) > 1:
        return None
    return nonzero.pop() if nonzero else 0


def _at(ex: sympy.Expr, row: sympy.Symbol) -> sympy.Expr:
    return ex.xreplace({S.m: row})


def _lower(bound: sympy.Expr) -> _Result | None:
    """Keys n >= bound(m)."""
    mono = monotone(bound, S.m)
    if mono is None:
        return None
    hull, full = (S.m_lo, S.m_hi) if mono >= 0 else (S.m_hi, S.m_lo)
    return _Result((KeySegment(sympy.Max(_at(bound, hull), 0), S.N,
                               sympy.Max(_at(bound, full), 0), S.N),), True)


def _upper(bound: sympy.Expr) -> _Result | None:
    """Keys n <= bound(m)."""
    mono = monotone(bound, S.m)
    if mono is None:
        return None
    hull, full = (S.m_hi, S.m_lo) if mono >= 0 else (S.m_lo, S.m_hi)
    return _Result((KeySegment(ZERO, sympy.Min(_at(bound, hull) + 1, S.N),
                               ZERO, sympy.Min(_at(bound, full) + 1, S.N)),), True)


def _key_term(dep: sympy.Expr):
    """Split the n-dependent part into (c, C) meaning c*floor(n/C) (C=1: c*n), else None."""
    coeff, term = dep.as_coeff_Mul()
    if term == S.n:
        return coeff, 1
    if isinstance(term, sympy.floor):
        inner_c, inner = term.args[0].as_coeff_Mul()
        if inner == S.n and inner_c.is_Rational and inner_c.p == 1 and inner_c.q > 1:
            return coeff, int(inner_c.q)
    return None


def _atom(rel) -> _Result:
    if rel.atoms(sympy.Indexed):
        return _whole(False, False)
    split = _split_abs(rel)
    if split is not None:
        return split
    d = rel.lhs - rel.rhs
    if isinstance(rel, sympy.Eq):
        return _and(_atom(sympy.Ge(d, 0, evaluate=False)), _atom(sympy.Le(d, 0, evaluate=False)))
    if isinstance(rel, sympy.Ne):
        return _or(_atom(sympy.Lt(d, 0, evaluate=False)), _atom(sympy.Gt(d, 0, evaluate=False)))
    if isinstance(rel, (sympy.Le, sympy.Lt)):  # d <= 0  <=>  -d >= 0
        d, strict = -d, isinstance(rel, sympy.Lt)
    else:
        strict = isinstance(rel, sympy.Gt)
    # Now: d > 0 (strict) or d >= 0.
    if not d.has(S.n):
        return _rows(d, strict)
    g, dep = d.as_independent(S.n, as_Add=True)
    split = _key_term(dep)
    if split is None or not split[0].is_Rational:
        return _whole(False, False)
    c, chunk = split
    x = -g / c
    if c > 0:  # t >= x (or t > x)
        res = _lower(_scale_lower(sympy.floor(x) + 1 if strict else sympy.ceiling(x), chunk))
    else:  # t <= x (or t < x)
        res = _upper(_scale_upper(sympy.ceiling(x) - 1 if strict else sympy.floor(x), chunk))
    return res if res is not None else _whole(False, False)


def _split_abs(rel) -> _Result | None:
    """|x| <= y  <=>  x <= y and -x <= y;  |x| >= y  <=>  x >= y or -x >= y."""
    lhs, rhs, op = rel.lhs, rel.rhs, type(rel)
    if isinstance(rhs, sympy.Abs) and not isinstance(lhs, sympy.Abs):
        lhs, rhs = rhs, lhs
        op = {sympy.Lt: sympy.Gt, sympy.Le: sympy.Ge, sympy.Gt: sympy.Lt, sympy.Ge: sympy.Le}.get(
            type(rel), type(rel))
    if not isinstance(lhs, sympy.Abs) or op not in (sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge):
        return None
    x = lhs.args[0]
    parts = (_atom(op(x, rhs, evaluate=False)), _atom(op(-x, rhs, evaluate=False)))
    return _and(*parts) if op in (sympy.Lt, sympy.Le) else _or(*parts)


def _scale_lower(t_lo, chunk: int):
    """floor(n/C) >= L  <=>  n >= C*L."""
    return chunk * t_lo


def _scale_upper(t_hi, chunk: int):
    """floor(n/C) <= U  <=>  n <= C*U + C - 1."""
    return chunk * t_hi + chunk - 1


def _rows(d: sympy.Expr, strict: bool) -> _Result:
    """A condition on the query row alone: all keys or none, per row."""
    mono = monotone(d, S.m)
    if mono is None:
        return _whole(False, False)
    test = (lambda v: v > 0) if strict else (lambda v: v >= 0)
    some = sympy.Or(test(_at(d, S.m_lo)), test(_at(d, S.m_hi)))
    every = sympy.And(test(_at(d, S.m_lo)), test(_at(d, S.m_hi)))
    hi = sympy.Piecewise((S.N, some), (0, True))
    full = sympy.Piecewise((S.N, every), (0, True))
    return _Result((KeySegment(ZERO, hi, ZERO, full),), True)


def _intersect(a: KeySegment, b: KeySegment) -> KeySegment:
    return KeySegment(sympy.Max(a.lo, b.lo), sympy.Min(a.hi, b.hi),
                      sympy.Max(a.full_lo, b.full_lo), sympy.Min(a.full_hi, b.full_hi))


def _hull(r: _Result) -> KeySegment:
    segs = r.segments
    if len(segs) == 1:
        return segs[0]
    return KeySegment(sympy.Min(*[s.lo for s in segs]), sympy.Max(*[s.hi for s in segs]),
                      segs[0].full_lo, segs[0].full_hi)


def _and(a: _Result, b: _Result) -> _Result:
    exact = a.exact and b.exact
    if len(a.segments) > 1 and len(b.segments) > 1:
        a, b = _Result((_hull(a),), False), _Result((_hull(b),), False)
    one, many = (a, b) if len(a.segments) == 1 else (b, a)
    return _Result(tuple(_intersect(one.segments[0], s) for s in many.segments), exact)


def _le(x: sympy.Expr, y: sympy.Expr) -> bool:
    return x == y or sympy.simplify(y - x).is_nonnegative is True


def _or(a: _Result, b: _Result) -> _Result:
    exact = a.exact and b.exact
    segs: list[KeySegment] = []
    for s in a.segments + b.segments:  # insertion sort by lo, needing a proof for each step
        pos = len(segs)
        while pos and not _le(segs[pos - 1].lo, s.lo):
            pos -= 1
        segs.insert(pos, s)
    ordered = all(_le(x.lo, y.lo) for x, y in zip(segs, segs[1:]))
    if not ordered:
        return _Result((_hull(_Result(tuple(segs), exact)),), False)
    return _Result(tuple(segs), exact)


@functools.lru_cache(maxsize=256)
def analyze(mask: sympy.Expr | None) -> KeyBounds:
    """Key segments for a mask (None: every key visible). Memoized: sympy's simplification is
    the slow part, and block-mask construction asks again for the same traced mask."""
    if mask is None:
        res = _whole(True, True)
    else:
        res = _analyze(sympy.to_nnf(mask, simplify=False))
    return KeyBounds(segments=tuple(_tidy(s) for s in res.segments), exact=res.exact,
                     mask=mask, score=None)


def _analyze(cond) -> _Result:
    if cond is sympy.true:
        return _whole(True, True)
    if cond is sympy.false:
        return _Result((KeySegment(ZERO, ZERO, ZERO, ZERO),), True)
    if isinstance(cond, sympy.And):
        out = _analyze(cond.args[0])
        for arg in cond.args[1:]:
            out = _and(out, _analyze(arg))
        return out
    if isinstance(cond, sympy.Or):
        out = _analyze(cond.args[0])
        for arg in cond.args[1:]:
            out = _or(out, _analyze(arg))
        return out
    if isinstance(cond, sympy.core.relational.Relational):
        return _atom(cond)
    return _whole(False, False)


def _tidy(s: KeySegment) -> KeySegment:
    return KeySegment(*(sympy.simplify(x) if x.count_ops() < 40 else x
                        for x in (s.lo, s.hi, s.full_lo, s.full_hi)))


# --- inlining: the scores as one expression -----------------------------------------------------

def inline(c: Cascade, ex: sympy.Expr) -> sympy.Expr:
    """Substitute every map einsum (no reduction) read by `ex` by its expression."""
    maps = {nd.name: nd for nd in c.nodes if isinstance(nd, Einsum) and nd.reduce is None}
    while True:
        subs = {acc: maps[str(acc.base)].expr for acc in ex.atoms(sympy.Indexed)
                if str(acc.base) in maps}
        if not subs:
            return ex
        ex = ex.xreplace(subs)


def split_mask(scores: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr | None]:
    """where(c1, where(c2, s, -oo), -oo) -> (s, c1 & c2)."""
    conds = []
    while (isinstance(scores, sympy.Piecewise) and len(scores.args) == 2
           and scores.args[1] == (-sympy.oo, True)):
        conds.append(scores.args[0][1])
        scores = scores.args[0][0]
    return scores, (sympy.And(*conds) if conds else None)


def _split(c: Cascade, scores: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr | None]:
    """(score, mask) of the scan's scores. A block-sparse kernel skips the mask on full blocks,
    so there only the condition of desugar's masking node where(mask, S, -oo) leaves the
    score; a where(cond, s, -oo) inside the score itself (or anywhere in a cascade written by
    hand) stays in it."""
    if not c.block_sparse:
        return split_mask(inline(c, scores))
    if (c.source_kind is BlockKind.ATTENTION and c.mask_node is not None
            and scores == S.access(c.mask_node, S.m, S.n)):
        masked = c.einsum(c.mask_node).expr
        if masked == -sympy.oo:  # the mask simplified to False: no key is visible anywhere
            return masked, sympy.false
        (inner, cond), _ = masked.args
        return inline(c, inner), inline(c, cond)
    return inline(c, scores), None


def query_segments(mask: sympy.Expr | None) -> tuple[KeySegment, ...]:
    """The transpose of `analyze`: for a key tile [n_lo, n_hi], segments of the queries that may
    see one of its keys, and of those that see all of them. The mask with rows and keys swapped
    (m <-> n, M <-> N) is analyzed as usual, and the result renamed back."""
    swap = {S.m: S.n, S.n: S.m, S.M: S.N, S.N: S.M}
    res = analyze(None if mask is None else mask.xreplace(swap))
    back = {S.m_lo: S.n_lo, S.m_hi: S.n_hi, S.M: S.N, S.N: S.M}
    return tuple(KeySegment(*(x.xreplace(back) for x in (s.lo, s.hi, s.full_lo, s.full_hi)))
                 for s in res.segments)


def run(c: Cascade) -> Cascade:
    scans = [nd for nd in c.nodes if isinstance(nd, OnlineSoftmax)]
    if not scans:  # a general cascade: its `mask` statement bounds every stage's loop
        bounds = analyze(c.mask)
        return replace(c, bounds=replace(bounds, mask=c.mask, score=None,
                                         rows=query_segments(c.mask)))
    if len(scans) != 1:
        return c
    score, mask = _split(c, scans[0].scores)
    bounds = analyze(mask)
    return replace(c, bounds=replace(bounds, score=score, rows=query_segments(mask)))



# --- the schedule a kernel runs -----------------------------------------------------------------

def _numeric(ex: sympy.Expr, env: dict) -> int:
    val = sympy.sympify(ex).xreplace({k: sympy.sympify(v) for k, v in env.items()})
    return int(val) if val.is_Integer else int(sympy.floor(sympy.N(val)))


def tile_schedule(segments, M: int, N: int, block_m: int, block_n: int,
                  env: dict | None = None) -> list[list[tuple[int, bool]]]:
    """For each query tile, the key tiles visited in order as (start, masked); `segments` are
    KeySegments (a KeyBounds' or an AttentionKernel's).

    Per segment, with everything rounded out to whole key tiles and clamped to start after the
    previous segment: masked tiles up to the first full tile, full tiles, masked tiles after.
    """
    plan = []
    for i in range(math.ceil(M / block_m)):
        m_lo = i * block_m
        m_hi = min(m_lo + block_m, M) - 1
        sub = {S.m_lo: m_lo, S.m_hi: m_hi, S.M: M, S.N: N, **(env or {})}
        visits: list[tuple[int, bool]] = []
        prev_end = 0
        for seg in segments:
            lo, hi, flo, fhi = (_numeric(x, sub)
                                for x in (seg.lo, seg.hi, seg.full_lo, seg.full_hi))
            t0, t1, t2, t3 = tile_ranges(lo, hi, flo, fhi, prev_end, N, block_n)
            visits += [(s, True) for s in range(t0, t1, block_n)]
            visits += [(s, False) for s in range(t1, t2, block_n)]
            visits += [(s, True) for s in range(t2, t3, block_n)]
            prev_end = t3
        plan.append(visits)
    return plan


def query_tile_schedule(rows, M: int, N: int, block_m: int, block_n: int
                        ) -> list[list[tuple[int, bool]]]:
    """For each key tile, the query tiles the dk/dv kernel visits as (start, masked), from the
    transposed segments (`query_segments`); the same walk as `tile_schedule`, axes swapped."""
    swap = {S.n_lo: S.m_lo, S.n_hi: S.m_hi, S.M: S.N, S.N: S.M}
    segments = [KeySegment(*(x.xreplace(swap) for x in (s.lo, s.hi, s.full_lo, s.full_hi)))
                for s in rows]
    return tile_schedule(segments, N, M, block_n, block_m)


def tile_ranges(lo, hi, flo, fhi, prev_end, N, bn):  # mirrored by codegen.PRELUDE
    """[t0, t1) masked, [t1, t2) full, [t2, t3) masked: tile-aligned, after prev_end."""
    lo, hi = min(max(lo, 0), N), min(max(hi, 0), N)
    flo = min(max(flo, lo), hi)
    fhi = min(max(fhi, flo), hi)
    t0 = max(lo // bn * bn, prev_end)
    t3 = max(-(-hi // bn) * bn, t0)
    t1 = min(max(-(-flo // bn) * bn, t0), t3)
    t2 = max(min(fhi // bn * bn, t3), t1)
    return t0, t1, t2, t3


PASS = Pass("mask_bounds", PassKind.REWRITE, run,
            "sympy analysis of the mask: key-loop bounds per query tile, full tiles")
