"""online_rescale: a general cascade's sums rewritten so that their divisions and stabilizing
maxima cost no extra pass (FuseMax's late division and running max, for any cascade).

Runs on a general cascade (one without an OnlineSoftmax node; a softmax cascade is returned
as it is). A sum over L (n or m) reads its operands through [m, n] maps, which are inlined
where they matter; two rewrites follow, each keeping the cascade's value:

(i) late division: when the inlined expression is a product with a factor free of L that
    reads a reduction over L (directly or through row maps: 1/SD[m], 1/sqrt(VAR[m] + eps),
    where(SD == 0, 0, 1/SD)), the sum drops the factor and a map multiplies it back:

        AV[m, f] = sum(n) A[m, n]*V[n, f],  A = SN/SD,  SD = sum(n) SN
    ->  AV_acc[m, f] = sum(n) SN[m, n]*V[n, f];   AV[m, f] = AV_acc[m, f] / SD[m]

    The map keeps the sum's name (what the user called AV still means AV), so outputs and
    readers are untouched. A map is inlined only when it holds such a factor, so the new sum
    still reads the user's tensors (SN) by name. A piecewise factor whose conditions are free
    of L splits branch by branch (where(SD == 0, 0, SN/SD) = SN * where(SD == 0, 0, 1/SD)).
    Products distribute over sums, so a mix of groups each normalized by its own sum,
    sum(n) (sum(c) w_c P_c / Z_c) * V, becomes one accumulator per group, O = sum(c) O_c / Z_c;
    terms that move nothing stay together in one accumulator.
    exp() factors are never moved: sum(n) exp(x - GM) is the stable form of exp(-GM)*sum(n)
    exp(x), which overflows.
(ii) stabilizer: a sum over L whose expression, with the [m, n] maps that read X inlined, is
    exp(-X) times a factor free of X, X an earlier max over L, is marked `stabilizer = X`
    (sympy: simplify(expr * exp(X)) is free of X). The value is unchanged; the mark tells
    pass_count and schedule that the sum may run in X's pass with a running X, rescaling its
    accumulator by exp(X_old - X_new).
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from attnc.expr import symbols as S
from attnc.ir.cascade import Cascade, Einsum, OnlineSoftmax, Reduce, fresh_name
from attnc.passes import Pass, PassKind
from attnc.passes.pass_count import plain

_LOOPS = ("m", "n")


def _maps(c: Cascade) -> dict[str, Einsum]:
    """The [m, n] maps: what a traversal evaluates per element, so what may be inlined."""
    return {nd.name: nd for nd in c.nodes if isinstance(nd, Einsum) and nd.reduce is None
            and set(_LOOPS) <= set(nd.ranks)}


def _reads_reduction(c: Cascade, ex: sympy.Expr, rank: str) -> bool:
    """`ex` reads a reduction over `rank`, directly or through maps."""
    produced = c.produced()
    todo = [str(a.base) for a in ex.atoms(sympy.Indexed)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        nd = produced.get(name)
        if name in seen or not isinstance(nd, Einsum):
            continue
        seen.add(name)
        if nd.reduce is not None and not nd.is_scan and rank in nd.over:
            return True
        if nd.reduce is None:
            todo += [str(a.base) for a in nd.expr.atoms(sympy.Indexed)]
    return False


Terms = list[tuple[sympy.Expr, sympy.Expr]]  # sum of dependent * free
_MAX_TERMS = 32  # distributing products over sums stops here (the expression stays whole)


class _Splitter:
    """ex = sum over terms of dependent * free, each free part free of the summed rank L;
    [m, n] maps are inlined only where that exposes a free factor, and products distribute
    over sums (a sum of groups, each normalized by its own reduction, splits by group)."""

    def __init__(self, c: Cascade, rank: str):
        self.maps = _maps(c)
        self.rank = S.RANKS[rank]

    def split(self, ex: sympy.Expr) -> Terms:
        one = sympy.Integer(1)
        if not ex.has(self.rank) and not self._reads_map(ex):
            return [(one, ex)]
        if isinstance(ex, sympy.Add):
            parts = [t for a in ex.args for t in self.split(a)]
            return parts if len(parts) <= _MAX_TERMS else [(ex, one)]
        if isinstance(ex, sympy.Mul):
            terms: Terms = [(one, one)]
            for a in ex.args:
                terms = [(d * d2, f * f2) for d, f in terms for d2, f2 in self.split(a)]
                if len(terms) > _MAX_TERMS:
                    return [(ex, one)]
            return terms
        if isinstance(ex, sympy.Pow) and ex.exp.is_integer:
            base = self.split(ex.base)
            if len(base) == 1:
                return [(base[0][0] ** ex.exp, base[0][1] ** ex.exp)]
        if isinstance(ex, sympy.Indexed) and str(ex.base) in self.maps:
            node = self.maps[str(ex.base)]
            if plain(ex, node.ranks):
                terms = self.split(node.expr)
                if any(f != 1 for _, f in terms):
                    return terms
        if isinstance(ex, sympy.Piecewise):
            return [self._piecewise(ex)]
        return [(ex, one)]

    def _reads_map(self, ex: sympy.Expr) -> bool:
        return any(str(a.base) in self.maps for a in ex.atoms(sympy.Indexed))

    def _piecewise(self, ex: sympy.Piecewise) -> tuple[sympy.Expr, sympy.Expr]:
        """A piecewise with conditions free of L whose nonzero branches share their dependent
        part d: d * piecewise of the free parts."""
        whole = (ex, sympy.Integer(1))
        if any(cond.has(self.rank) or self._reads_map(cond) for _, cond in ex.args):
            return whole
        parts = [(self.split(v) if v != 0 else None, cond) for v, cond in ex.args]
        if any(p is not None and len(p) != 1 for p, _ in parts):
            return whole
        dependents = {p[0][0] for p, _ in parts if p is not None}
        if len(dependents) != 1:
            return whole
        return dependents.pop(), sympy.Piecewise(
            *((p[0][1] if p is not None else 0, cond) for p, cond in parts))


def _movable(c: Cascade, factor: sympy.Expr, rank: str) -> bool:
    base = factor.base if isinstance(factor, sympy.Pow) else factor
    return not isinstance(base, sympy.exp) and _reads_reduction(c, factor, rank)


def _groups(c: Cascade, terms: Terms, rank: str) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """The terms as (summand, factor moved out of the sum): terms with the same dependent part
    merge; a group's factors that read a reduction over `rank` move out; the groups that move
    nothing form one summand with factor 1."""
    merged: dict[sympy.Expr, sympy.Expr] = {}
    for d, f in terms:
        merged[d] = merged.get(d, sympy.Integer(0)) + f
    out, rest = [], []
    for d, f in merged.items():
        factors = sympy.Mul.make_args(f)
        moved = [x for x in factors if _movable(c, x, rank)]
        kept = sympy.Mul(*(x for x in factors if x not in moved))
        if moved:
            out.append((d * kept, sympy.Mul(*moved)))
        else:
            rest.append(d * kept)
    if rest:
        out.append((sympy.Add(*rest), sympy.Integer(1)))
    return out


def late_division(c: Cascade) -> Cascade:
    """Rewrite (i) on every sum over n or m, in order."""
    taken = c.names()
    nodes = []
    origins = list(c.origins)
    for nd in c.nodes:
        if not (isinstance(nd, Einsum) and nd.reduce is Reduce.SUM and len(nd.over) == 1
                and nd.over[0] in _LOOPS):
            nodes.append(nd)
            continue
        groups = _groups(c, _Splitter(c, nd.over[0]).split(nd.expr), nd.over[0])
        if all(moved == 1 for _, moved in groups):
            nodes.append(nd)
            continue
        total = []
        for summand, moved in groups:
            acc = fresh_name(f"{nd.name}_acc", taken)
            nodes.append(replace(nd, name=acc, expr=summand))
            total.append(S.at(acc, *nd.ranks) * moved)
            origins += [replace(o, tensor=acc) for o in c.origins if o.tensor == nd.name]
        nodes.append(Einsum(nd.name, nd.ranks, sympy.Add(*total)))
    return c.with_nodes(nodes, origins=tuple(origins))


def stabilizes(c: Cascade, x: Einsum, nd: Einsum) -> bool:
    """The max `x` is over nd's rank and exp(-x) factors out of nd's expression (with the
    [m, n] maps of `c` that read x inlined)."""
    access = S.at(x.name, *x.ranks)
    ex = _inline_readers(nd.expr, x.name, _maps(c))
    return (x.over == nd.over and ex.has(access)
            and not sympy.simplify(ex * sympy.exp(access)).has(access))


def _stabilizer(c: Cascade, nd: Einsum, maxima: list[Einsum]) -> str | None:
    """The latest earlier max over nd's rank whose exp(-X) factors out of nd's expression."""
    return next((x.name for x in reversed(maxima) if stabilizes(c, x, nd)), None)


def _inline_readers(ex: sympy.Expr, name: str, maps: dict[str, Einsum]) -> sympy.Expr:
    """`ex` with every [m, n] map that (transitively) reads `name` inlined."""
    def reads_name(node: Einsum, seen=()) -> bool:
        srcs = {str(a.base) for a in node.expr.atoms(sympy.Indexed)}
        return name in srcs or any(s in maps and s not in seen and reads_name(maps[s], seen + (s,))
                                   for s in srcs)

    for _ in range(len(maps) + 1):
        subs = {a: maps[str(a.base)].expr for a in ex.atoms(sympy.Indexed)
                if str(a.base) in maps and plain(a, maps[str(a.base)].ranks)
                and reads_name(maps[str(a.base)])}
        if not subs:
            return ex
        ex = ex.xreplace(subs)
    return ex


def mark_stabilizers(c: Cascade) -> Cascade:
    """Rewrite (ii): the stabilizer mark on every sum over n or m that has one."""
    nodes = []
    maxima: list[Einsum] = []
    for nd in c.nodes:
        if isinstance(nd, Einsum) and nd.reduce is Reduce.MAX and len(nd.over) == 1 \
                and nd.over[0] in _LOOPS:
            maxima.append(nd)
        if (isinstance(nd, Einsum) and nd.reduce is Reduce.SUM and len(nd.over) == 1
                and nd.over[0] in _LOOPS and nd.stabilizer is None):
            x = _stabilizer(c, nd, maxima)
            if x is not None:
                nd = replace(nd, stabilizer=x)
        nodes.append(nd)
    return c.with_nodes(nodes)


def run(c: Cascade) -> Cascade:
    if any(isinstance(nd, OnlineSoftmax) for nd in c.nodes):
        return c
    out = mark_stabilizers(late_division(c))
    return c if out == c else out


PASS = Pass("online_rescale", PassKind.REWRITE, run,
            "late division and running-max marks: a general cascade's sums in fewer passes")
