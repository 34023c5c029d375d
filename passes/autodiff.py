"""autodiff: derive the backward cascade of a cascade with sympy.

Two paths. A cascade with an OnlineSoftmax node (plain softmax attention) gets the
FlashAttention-2 backward below. Any other cascade gets `general_backward`: reverse mode over
its einsum DAG (the adjoint of each read is an einsum; maxima that only stabilize are constants,
see `stabilizers`; scans transpose to the opposite scan; params get ScatterSum terms), a
backward cascade that carries the forward's mask, recomputes the forward's [m, n] nodes and
reads its other results as SAVED residuals (`Backward.residuals`).

The softmax path:

For out = softmax_n(s) @ V with s[m, n] = score(QK, params), masked to -oo, and the saved
O[m, f] and LSE[m], the incoming gradients dO[m, f] and dLSE[m] give (FlashAttention-2's
recomputation: the probabilities come back from the saved LSE, nothing is stored per (m, n)):

    P[m, n]   = exp(SM[m, n] - LSEB[m])           LSEB = +oo on rows that saw no key: P = 0
    Delta[m]  = sum(f) dO[m, f]*O[m, f] - dLSE[m]
    dP[m, n]  = sum(f) dO[m, f]*V[n, f]
    dS[m, n]  = P[m, n]*(dP[m, n] - Delta[m])     d loss / d s  (lse's gradient is P*dLSE)
    DQK[m, n] = d score / d (q.k)                 sympy.diff, summed over the q.k reductions
    dQ[m, e]  = sum(n) dS*DQK*K[n, e];  dK[n, e] = sum(m) dS*DQK*Q[m, e]
    dV[n, f]  = sum(m) P[m, n]*dO[m, f]
    per read i of a param p at index I_i(b, h, m, n):
    D_p_i[m, n] = d score / d p[I_i];   d_p[I_i] += scatter_sum(b, h, m, n) dS*D_p_i

The derivative nodes (DQK, D_p_i) are what the backward kernels evaluate per element; the
`Backward` record names them. Every name above is the first free one among the spec's tensors
and the forward's nodes. A score that sympy cannot differentiate to closed form (say a param
under floor) gets no backward cascade and a reason instead; the forward still compiles.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.expr.derivatives import derivative
from attnc.ir.cascade import (Backward, Cascade, Einsum, OnlineSoftmax, Reduce, Saved, ScatterSum,
                              TensorDecl, TensorKind, exprs_of, fresh_name, qk_products, reads)
from attnc.passes import Pass, PassKind


def backward_cascade(c: Cascade) -> Backward:
    """The backward of a scheduled one-pass cascade (raises ValueError if the score cannot be
    differentiated, CompileError if it reads what the kernels cannot fuse)."""
    assert c.bounds is not None and c.bounds.score is not None
    score, mask = c.bounds.score, c.bounds.mask
    reductions = qk_products(c, score)
    params = {d.name for d in c.decls if d.kind is TensorKind.PARAM}
    nodes: list = [nd for nd in c.nodes if isinstance(nd, Einsum) and nd.reduce is not None
                   and S.at(nd.name, *nd.ranks) in reductions]
    taken = {d.name for d in c.decls} | {nd.name for nd in nodes}
    saved = tuple((role, fresh_name(role.value, taken)) for role in Saved)
    o, lse_, do, dlse = (name for _, name in saved)
    (s_, sm_, lseb_, p_, doo_, delta_, dp_, ds_, dqk_, dqk2_, dq_, dk_, dv_) = (
        fresh_name(base, taken) for base in ("S", "SM", "LSEB", "P", "DOO", "Delta", "dP", "dS",
                                             "DQK", "dQK", "dQ", "dK", "dV"))
    s, ds, p, lse = S.at(s_, "m", "n"), S.at(ds_, "m", "n"), S.at(p_, "m", "n"), S.at(lse_, "m")
    nodes += [
        Einsum(s_, ("m", "n"), score),
        Einsum(sm_, ("m", "n"), s if mask is None else sympy.Piecewise((s, mask),
                                                                        (-sympy.oo, True))),
        Einsum(lseb_, ("m",), sympy.Piecewise((sympy.oo, sympy.Eq(lse, -sympy.oo)), (lse, True))),
        Einsum(p_, ("m", "n"), sympy.exp(S.at(sm_, "m", "n") - S.at(lseb_, "m"))),
        Einsum(doo_, ("m",), S.at(do, "m", "f") * S.at(o, "m", "f"), Reduce.SUM, ("f",)),
        Einsum(delta_, ("m",), S.at(doo_, "m") - S.at(dlse, "m")),
        Einsum(dp_, ("m", "n"), S.at(do, "m", "f") * S.at("V", "n", "f"), Reduce.SUM, ("f",)),
        Einsum(ds_, ("m", "n"), p * (S.at(dp_, "m", "n") - S.at(delta_, "m"))),
        Einsum(dqk_, ("m", "n"), sympy.Add(*(factor * derivative(score, acc)
                                             for acc, factor in reductions.items()))),
        Einsum(dqk2_, ("m", "n"), ds * S.at(dqk_, "m", "n")),
        Einsum(dq_, ("m", "e"), S.at(dqk2_, "m", "n") * S.at("K", "n", "e"), Reduce.SUM, ("n",)),
        Einsum(dk_, ("n", "e"), S.at(dqk2_, "m", "n") * S.at("Q", "m", "e"), Reduce.SUM, ("m",)),
        Einsum(dv_, ("n", "f"), p * S.at(do, "m", "f"), Reduce.SUM, ("m",)),
    ]
    outputs = [("dq", dq_), ("dk", dk_), ("dv", dv_)]
    reads = sorted((a for a in score.atoms(sympy.Indexed) if str(a.base) in params),
                   key=sympy.default_sort_key)
    dparams = []
    for param in sorted(params):
        terms = []
        for i, acc in enumerate(a for a in reads if str(a.base) == param):
            name = fresh_name(f"D_{param}_{i}", taken)
            nodes.append(Einsum(name, ("m", "n"), derivative(score, acc)))
            terms.append((tuple(acc.indices), ds * S.at(name, "m", "n")))
            dparams.append((acc, name))
        if terms:  # a param read only by the mask has no gradient (the mask is piecewise constant)
            grad = fresh_name(f"d_{param}", taken)
            nodes.append(ScatterSum(grad, param, tuple(terms)))
            outputs.append((f"d_{param}", grad))
    decls = c.decls + tuple(TensorDecl(name, TensorKind.SAVED, tuple(S.RANKS[r]
                                                                     for r in role.ranks))
                            for role, name in saved)
    cascade = Cascade(name=f"{c.name}_backward", decls=decls, nodes=tuple(nodes),
                      outputs=tuple(outputs), options=c.options, source_kind=c.source_kind,
                      block_sparse=c.block_sparse)
    return Backward(cascade, saved, dqk_, tuple(dparams))


# ---- general cascades: reverse mode over the einsum DAG ---------------------------------------

_SEQUENCE = ("m", "n")
_RANK_ORDER = ("m", "n", "e", "f")


def _canonical(ranks) -> tuple[str, ...]:
    return tuple(r for r in _RANK_ORDER if r in ranks)


class _Shift:
    """How a value changes when a max X[r] is shifted by t[r]: `kind` is "inv" (unchanged),
    "shift" (plus coef*t), "scale" (times exp(coef*t)), "zero" / "inf" (the constants 0 and
    +-oo, unchanged by every shift and positive scale), "any" (a branch taken only where X is
    infinite, which a finite shift leaves as it is) or "var" (anything else)."""

    def __init__(self, kind: str, coef=sympy.S.Zero):
        if kind in ("shift", "scale") and sympy.simplify(coef) == 0:
            kind, coef = "inv", sympy.S.Zero
        self.kind, self.coef = kind, sympy.sympify(coef)

    def __eq__(self, other) -> bool:
        return (self.kind == other.kind
                and (self.kind not in ("shift", "scale")
                     or sympy.simplify(self.coef - other.coef) == 0))

    def __hash__(self) -> int:
        return hash(self.kind)

    @property
    def constant(self) -> bool:
        """Unchanged by the shift (the outputs of a pure stabilizer are)."""
        return self.kind in ("inv", "zero", "inf", "any")


_INV, _ZERO, _INF, _ANY, _VAR = (_Shift(k) for k in ("inv", "zero", "inf", "any", "var"))


def _join(a: _Shift, b: _Shift) -> _Shift:
    """The class of a value that is a or b depending on an unchanged condition (or a
    comparison of a with b: it is unchanged when both sides move alike)."""
    if a == b or b.kind == "any":
        return a
    if a.kind == "any":
        return b
    if "var" in (a.kind, b.kind):
        return _VAR
    for x, y in ((a, b), (b, a)):
        if x.kind == "zero":  # 0 is a multiple of anything
            return y if y.kind in ("inv", "scale", "inf") else _VAR
        if x.kind == "inf":  # +-oo plus a finite shift, times a positive factor
            return y if y.kind in ("inv", "shift", "scale") else _VAR
    return _VAR


def _scalar(ex: sympy.Expr) -> bool:
    """Constant over a row: reads no tensor and no rank (options, scale, b, h)."""
    return not ex.atoms(sympy.Indexed) and not ex.free_symbols & set(S.RANKS.values())


class _ShiftAnalysis:
    """Propagates the shift of one node X through the cascade (see `_Shift`); the nodes in
    `constant` (stabilizers found already) are held fixed."""

    def __init__(self, x: Einsum, constant: set[str]):
        self.x = x
        self.at_x = S.at(x.name, *x.ranks)
        self.cls: dict[str, _Shift] = {x.name: _Shift("shift", 1)}
        self.constant = constant

    def stabilizes(self, c: Cascade) -> bool:
        later = list(c.nodes)[list(c.nodes).index(self.x) + 1:]
        for nd in later:
            if (isinstance(nd, Einsum) and nd.name not in self.constant
                    and any(str(a.base) in self.cls for a in nd.expr.atoms(sympy.Indexed))):
                k = self.node(nd)
                if not k.constant:
                    self.cls[nd.name] = k
        return all(name not in self.cls for _, name in c.outputs)

    def node(self, nd: Einsum) -> _Shift:
        k = self.of(nd.expr)
        if k.kind == "any":
            k = _INV
        if nd.reduce is not None and not k.constant:
            along_x = set(nd.over) & set(self.x.ranks)
            if along_x or (k.kind == "shift" and nd.reduce not in (Reduce.MAX, Reduce.MIN)):
                return _VAR  # t varies along the reduction, or a sum of shifted values
        if k.kind in ("shift", "scale") and not set(self.x.ranks) <= set(nd.ranks):
            return _VAR
        return k

    def infinite_x(self, cond) -> bool:
        """`cond` holds only where X is +-oo."""
        parts = cond.args if isinstance(cond, sympy.And) else (cond,)
        return any(isinstance(p, sympy.Eq) and self.at_x in p.args
                   and any(a in (sympy.oo, -sympy.oo) for a in p.args) for p in parts)

    def of(self, ex) -> _Shift:
        if isinstance(ex, sympy.Indexed):
            return self.cls.get(str(ex.base), _INV)
        if ex.is_Number or ex in (sympy.zoo, sympy.oo, -sympy.oo):
            return _ZERO if ex == 0 else _INF if ex.is_infinite else _INV
        if not any(str(a.base) in self.cls for a in ex.atoms(sympy.Indexed)):
            return _INV
        if isinstance(ex, sympy.Piecewise):
            k = _ANY
            for value, cond in ex.args:
                if self.infinite_x(cond):
                    continue
                k = _join(k, self.of(value) if self.of(cond).kind == "inv" else _VAR)
            return _INV if k.kind == "any" else k
        if isinstance(ex, sympy.core.relational.Relational):
            return _INV if _join(self.of(ex.lhs), self.of(ex.rhs)).kind != "var" else _VAR
        args = [self.of(a) for a in ex.args]
        if any(a.kind == "var" for a in args):
            return _VAR
        if ex.is_Add:
            return self._add(args)
        if ex.is_Mul:
            return self._mul(ex, args)
        if ex.is_Pow:
            base, power = args
            if base.kind == "scale" and power.kind == "inv" and _scalar(ex.exp):
                return _Shift("scale", base.coef * ex.exp)
        elif isinstance(ex, (sympy.Max, sympy.Min)):
            k = args[0]
            for a in args[1:]:
                k = _join(k, a)
            return k
        elif ex.func is sympy.exp and args[0].kind == "shift":
            return _Shift("scale", args[0].coef)
        elif ex.func is sympy.log and args[0].kind == "scale":
            return _Shift("shift", args[0].coef)
        elif isinstance(ex, sympy.Abs) and args[0].kind == "scale":
            return args[0]
        return _INV if all(a.kind == "inv" for a in args) else _VAR

    @staticmethod
    def _add(args: list[_Shift]) -> _Shift:
        if any(a.kind == "inf" for a in args):
            return _INF
        scales = [a for a in args if a.kind == "scale"]
        if scales:
            ok = all(a == scales[0] or a.kind == "zero" for a in args)
            return scales[0] if ok else _VAR
        return _Shift("shift", sympy.Add(*(a.coef for a in args if a.kind == "shift")))

    @staticmethod
    def _mul(ex: sympy.Mul, args: list[_Shift]) -> _Shift:
        if any(a.kind == "zero" for a in args):
            return _ZERO
        shifts = [i for i, a in enumerate(args) if a.kind == "shift"]
        if shifts:
            (i,) = shifts if len(shifts) == 1 else (None,)
            rest = [x for j, x in enumerate(ex.args) if j != i]
            if i is None or not all(_scalar(x) for x in rest):
                return _VAR
            return _Shift("shift", args[i].coef * sympy.Mul(*rest))
        if any(a.kind == "inf" for a in args):
            return _INF if all(a.kind in ("inv", "inf") for a in args) else _VAR
        return _Shift("scale", sympy.Add(*(a.coef for a in args if a.kind == "scale")))


def stabilizers(c: Cascade) -> set[str]:
    """The maxima (reductions, or maps taking a Max or Min such as max(GM, sink)) whose shift
    leaves every output unchanged: constants for differentiation (their derivative is zero).
    The argument, per node X[r]: shift X by t[r] and follow the change through the nodes after
    it (`_Shift`): exp turns a shift into a scale, log back, sums and maxima over ranks other
    than r keep a scale, a Piecewise keeps a class when its conditions are unchanged
    (comparisons with 0 or +-oo of scaled values, of values shifted alike) and its branches
    agree; a branch taken only where X is infinite is ignored (a finite shift leaves -oo as it
    is). X is a stabilizer when every output is unchanged. Nodes are tried last first, with
    the stabilizers after them held fixed: the outputs' derivative in a later stabilizer is
    zero, so the chain through it adds nothing (max(GM, sink) stabilizes, then GM does)."""
    found: set[str] = set()
    for nd in reversed(c.nodes):
        if isinstance(nd, Einsum) and (nd.reduce in (Reduce.MAX, Reduce.MIN) or (
                nd.reduce is None and nd.expr.has(sympy.Max, sympy.Min))):
            if _ShiftAnalysis(nd, found).stabilizes(c):
                found.add(nd.name)
    return found


class _Reverse:
    """The state of one reverse sweep: the backward's nodes so far, the pending adjoint terms
    per tensor (summed-over ranks, expression) and the names taken."""

    def __init__(self, c: Cascade):
        self.c = c
        self.taken = c.names()
        self.nodes: list = []
        # per tensor: (ranks summed over, expression, the node whose read it differentiates)
        self.pending: dict[str, list[tuple[tuple[str, ...], sympy.Expr, str]]] = {}
        # feature contractions already emitted, by (ranks, expression, summed ranks): the
        # adjoints of several reads in one node often share one
        self.dots: dict[tuple, str] = {}

    def emit(self, base: str, ranks: tuple[str, ...], expr, reduce=None, over=()) -> str:
        name = fresh_name(base, self.taken)
        self.nodes.append(Einsum(name, ranks, expr, reduce, over))
        return name

    def add(self, target: str, over, expr, reader: str) -> None:
        self.pending.setdefault(target, []).append((_canonical(over), expr, reader))

    def contract(self, base: str, ranks, over, expr) -> sympy.Expr:
        """sum(over) expr, the feature ranks summed first: per distinct product of the factors
        that depend on e or f, an einsum summing it (a dot product, shared by equal ones), times
        the other factors. Returns the expression still to be summed over the sequence ranks of
        `over`, so no einsum sums over m or n and e or f at once."""
        feature = tuple(r for r in over if r not in _SEQUENCE)
        sequence = tuple(r for r in over if r in _SEQUENCE)
        if not feature:
            return expr
        inner_ranks = _canonical(ranks + sequence)
        out = sympy.S.Zero
        for inner, outer in _by_factor(expr, feature).items():
            key = (inner_ranks, inner, feature)
            if key not in self.dots:
                self.dots[key] = self.emit(base, inner_ranks, inner, Reduce.SUM, feature)
            out += outer * S.at(self.dots[key], *inner_ranks)
        return out

    def adjoint(self, target: str, ranks: tuple[str, ...]) -> str | None:
        """Emit the adjoint of `target` from its pending terms: an einsum per set of summed
        ranks (and, for a target with rank e or f, per distinct factor that has it: each
        accumulator is then g[m, n] * Y[., r]), plus a map adding them and the unsummed terms
        when there are several; None when every term is zero."""
        groups: dict[tuple[str, ...], sympy.Expr] = {}
        for over, expr, reader in self.pending.pop(target, []):
            if expr == 0:
                continue
            expr = self.contract(f"d{reader}_dot", ranks, over, expr)
            sequence = tuple(r for r in over if r in _SEQUENCE)
            groups[sequence] = groups.get(sequence, sympy.S.Zero) + expr
        local = groups.pop((), sympy.S.Zero)
        feature = tuple(r for r in ranks if r not in _SEQUENCE)
        sums = [(over, part * outer) for over, expr in groups.items()
                for part, outer in (_by_factor(expr, feature) if feature else {1: expr}).items()]
        if not sums and local == 0:
            return None
        if not sums and local == S.at(str(getattr(local, "base", "")), *ranks):
            return str(local.base)  # the adjoint is a tensor already there (dO): no copy
        if local == 0 and len(sums) == 1:
            (over, expr), = sums
            return self.emit(f"d{target}", ranks, expr, Reduce.SUM, over)
        parts = [S.at(self.emit(f"d{target}_part", ranks, expr, Reduce.SUM, over), *ranks)
                 for over, expr in sums]
        return self.emit(f"d{target}", ranks, local + sympy.Add(*parts))


def _by_factor(expr: sympy.Expr, ranks: tuple[str, ...]) -> dict[sympy.Expr, sympy.Expr]:
    """expr as a sum of key * value, one key per distinct product of the factors that use
    `ranks` (the factors free of them stay unexpanded in the values)."""
    syms = {S.RANKS[r] for r in ranks}
    factors = sympy.Mul.make_args(expr)
    outer = sympy.Mul(*(x for x in factors if not x.free_symbols & syms))
    inner = sympy.Mul(*(x for x in factors if x.free_symbols & syms))
    groups: dict[sympy.Expr, sympy.Expr] = {}
    for term in sympy.Add.make_args(sympy.expand_mul(inner, deep=False)):
        parts = sympy.Mul.make_args(term)
        key = sympy.Mul(*(x for x in parts if x.free_symbols & syms))
        rest = sympy.Mul(*(x for x in parts if not x.free_symbols & syms))
        groups[key] = groups.get(key, sympy.S.Zero) + outer * rest
    return {k: v for k, v in groups.items() if v != 0}


def _check_reads(forward: list[Einsum]) -> None:
    """Every node and operand is read at its own ranks (X[m, n], not X[n, m] or X[m - 1, n]):
    the adjoint of a read is then an einsum over the reader's other ranks."""
    ranks = {nd.name: nd.ranks for nd in forward} | S.OPERANDS
    for nd in forward:
        for acc in nd.expr.atoms(sympy.Indexed):
            own = ranks.get(str(acc.base))
            if own is not None and tuple(acc.indices) != tuple(S.RANKS[r] for r in own):
                raise ValueError(f"{nd.name} reads {acc}: autodiff differentiates reads of a "
                                 f"node or operand at its own ranks only")


def general_backward(c: Cascade) -> Backward:
    """The backward cascade of a cascade without an OnlineSoftmax node, by reverse mode over
    its einsums (raises ValueError where that is undefined or unsupported):

        seeds: d<out>[m, f] = dO[m, f];  d<lse>[m] = dLSE[m]
        per node Y = reduce(over) x, last first, with the adjoint dY of rank Y.ranks, the
        adjoint of x per point of Y's iteration is
            dY                               map or sum
            dY * [x == Y] / #ties            max or min (#ties = sum(over) [x == Y]),
                                             nothing for a stabilizer (see `stabilizers`)
            rcumsum(L) dY / cumsum(L) dY     cumsum(L) / rcumsum(L): the transposed scan
        and every read X[ranks of X] in x gets sum(Y's iteration ranks not X's) of that
        adjoint times dx/dX (sympy); a param read p[I] gets a ScatterSum term at I.

    The backward carries the forward's mask, so its reductions and scans over m or n see the
    same pairs; adjoints of [m, n] nodes at invisible pairs are never read. The backward reads
    [m, n] forward nodes by recomputing them (copied, under their own names) and other forward
    results as SAVED residuals (under their own names)."""
    forward = [nd for nd in c.nodes if isinstance(nd, Einsum)]
    if len(forward) != len(c.nodes):
        raise ValueError("the forward has nodes other than einsums")
    _check_reads(forward)
    decls = {d.name: d for d in c.decls}
    params = {n for n, d in decls.items() if d.kind is TensorKind.PARAM}
    stable = stabilizers(c)
    live = {"Q", "K", "V"} | params
    for nd in forward:
        if nd.name not in stable and any(src in live for src in reads(nd)):
            live.add(nd.name)
    rev = _Reverse(c)
    seeds = {"out": (Saved.DOUT, ("m", "f")), "lse": (Saved.DLSE, ("m",))}
    saved = []
    for role, tensor in c.outputs:
        if role not in seeds:
            raise ValueError(f"no incoming gradient for the output {role}")
        kind, ranks = seeds[role]
        if c.einsum(tensor).ranks != ranks:
            raise ValueError(f"the output {role} = {tensor} must have ranks [{', '.join(ranks)}]")
        name = fresh_name(kind.value, rev.taken)
        saved.append((kind, name))
        rev.add(tensor, (), S.at(name, *ranks), tensor)
    terms: dict[str, list] = {}
    for y in reversed(forward):
        dy = rev.adjoint(y.name, y.ranks)
        if dy is None or y.name in stable:
            continue
        seed = S.at(dy, *y.ranks)
        if y.is_scan:
            back = Reduce.RCUMSUM if y.reduce is Reduce.CUMSUM else Reduce.CUMSUM
            seed = S.at(rev.emit(f"{dy}_scan", y.ranks, seed, back, y.over), *y.ranks)
        elif y.reduce in (Reduce.MAX, Reduce.MIN):
            hit = sympy.Eq(y.expr, S.at(y.name, *y.ranks))
            ties = rev.emit(f"ties_{y.name}", y.ranks, sympy.Piecewise((1, hit), (0, True)),
                            Reduce.SUM, y.over)
            seed = seed * sympy.Piecewise((1 / S.at(ties, *y.ranks), hit), (0, True))
        for acc in sorted(y.expr.atoms(sympy.Indexed), key=sympy.default_sort_key):
            src = str(acc.base)
            if src not in live or src in stable:
                continue
            d = derivative(y.expr, acc)
            if d == 0:
                continue
            if y.reduce is None:  # exp(x)' = exp(x), sigmoid(x)' = sigmoid(x)*(1 - ...): reread y
                d = d.subs(y.expr, S.at(y.name, *y.ranks))
            if src in params:
                terms.setdefault(src, []).append(_param_term(rev, y, acc, seed * d))
            else:
                own = S.OPERANDS.get(src) or c.einsum(src).ranks
                rev.add(src, tuple(r for r in y.iteration if r not in own), seed * d, y.name)
    outputs = []
    for op, role in (("Q", "dq"), ("K", "dk"), ("V", "dv")):
        ranks = S.OPERANDS[op]
        # an operand the outputs do not depend on: its gradient is a zero map
        outputs.append((role, rev.adjoint(op, ranks) or rev.emit(f"d{op}", ranks, sympy.S.Zero)))
    for param in sorted(terms):
        grad = fresh_name(f"d_{param}", rev.taken)
        rev.nodes.append(ScatterSum(grad, param, _merge_terms(terms[param])))
        outputs.append((f"d_{param}", grad))
    copies, residuals = _forward_reads(forward, rev.nodes)
    rev.nodes = _one_walk(copies, rev.nodes, rev.taken)
    saved_decls = [TensorDecl(name, TensorKind.SAVED, tuple(S.RANKS[r] for r in kind.ranks))
                   for kind, name in saved]
    saved_decls += [TensorDecl(name, TensorKind.SAVED, tuple(S.RANKS[r]
                                                             for r in c.einsum(name).ranks))
                    for name, _ in residuals]
    cascade = Cascade(name=f"{c.name}_backward", decls=c.decls + tuple(saved_decls),
                      nodes=tuple(copies + rev.nodes), outputs=tuple(outputs), options=c.options,
                      source_kind=c.source_kind, mask=c.mask)
    return Backward(cascade, tuple(saved), None, residuals=tuple(residuals))


def _param_term(rev: _Reverse, y: Einsum, acc: sympy.Indexed, value: sympy.Expr):
    """The ScatterSum term of a param read `acc` in node y: its value summed over y's
    iteration ranks e and f first (the scatter sums over b, h, m and n). The index may use b,
    h, options and at most one of m, n (a kernel's parallel rank)."""
    used = set().union(*(sympy.sympify(i).free_symbols for i in acc.indices))
    if used & {S.e, S.f} or {S.m, S.n} <= used:
        raise ValueError(f"{y.name} reads the param {acc} at an index that depends on "
                         f"{'e or f' if used & {S.e, S.f} else 'both m and n'}: its gradient "
                         "cannot be scattered by one program per row or key")
    sequence = _canonical(r for r in y.iteration if r in _SEQUENCE)
    feature = tuple(r for r in y.iteration if r not in _SEQUENCE)
    return tuple(acc.indices), rev.contract(f"d{y.name}_dot", sequence, feature, value)


def _merge_terms(terms: list) -> tuple:
    """One ScatterSum term per index and set of ranks (m, n) summed: the values added."""
    merged: dict[tuple, sympy.Expr] = {}
    for index, value in terms:
        key = (index, frozenset(value.free_symbols | set().union(
            *(sympy.sympify(i).free_symbols for i in index))) & {S.m, S.n})
        merged[key] = merged.get(key, sympy.S.Zero) + value
    return tuple((index, value) for (index, _), value in merged.items())


def _one_walk(copies: list[Einsum], nodes: list, taken: set[str]) -> list:
    """A transposed scan along a rank the backward also recomputes a forward scan along, in
    the forward's direction: a kernel walks a rank one way (both scans feed the same [m, n]
    values, which are never stored). The suffix sum is the total minus the prefix sum plus the
    element (rcumsum(L) x = sum(L) x - cumsum(L) x + x, and the mirror), over visible pairs."""
    walk = {nd.over[0]: nd.reduce for nd in copies if nd.is_scan}
    out: list = []
    for nd in nodes:
        forward = walk.get(nd.over[0]) if isinstance(nd, Einsum) and nd.is_scan else None
        if forward is None or forward is nd.reduce:
            out.append(nd)
            continue
        rest = tuple(r for r in nd.ranks if r != nd.over[0])
        total = fresh_name(f"{nd.name}_total", taken)
        scan = fresh_name(f"{nd.name}_{forward.value}", taken)
        out += [Einsum(total, rest, nd.expr, Reduce.SUM, nd.over),
                Einsum(scan, nd.ranks, nd.expr, forward, nd.over),
                Einsum(nd.name, nd.ranks, S.at(total, *rest) - S.at(scan, *nd.ranks) + nd.expr)]
    return out


def _forward_reads(einsums: list[Einsum], nodes: list
                   ) -> tuple[list[Einsum], list[tuple[str, str]]]:
    """The forward nodes the backward `nodes` read: those of rank [m, n] recomputed (copied
    with what they read; stabilizer marks dropped, since the backward has no running max), the
    others as residuals (forward name, SAVED name: the same)."""
    forward = {nd.name: nd for nd in einsums}
    need: set[str] = set()
    todo = [src for nd in nodes for src in reads(nd) if src in forward]
    while todo:
        name = todo.pop()
        if name in need:
            continue
        need.add(name)
        if {"m", "n"} <= set(forward[name].ranks):
            todo += [src for src in reads(forward[name]) if src in forward]
    copies = [replace(nd, stabilizer=None) for nd in einsums
              if nd.name in need and {"m", "n"} <= set(nd.ranks)]
    residuals = [(nd.name, nd.name) for nd in einsums
                 if nd.name in need and not {"m", "n"} <= set(nd.ranks)]
    return copies, residuals


def run(c: Cascade) -> Cascade:
    softmax = any(isinstance(nd, OnlineSoftmax) for nd in c.nodes)
    if softmax and c.bounds is None:
        return c
    try:
        bwd = backward_cascade(c) if softmax else general_backward(c)
    except (ValueError, CompileError) as err:
        return replace(c, no_backward=str(err))
    undefined = [nd.name for nd in bwd.cascade.nodes
                 if any(ex.has(sympy.zoo, sympy.nan) for ex in exprs_of(nd))]
    if undefined:
        # e.g. log(relu(s)): the derivative divides by zero where the score is -inf; the
        # forward still runs, the backward raises with this reason
        return replace(c, no_backward=f"the derivative {undefined[0]} of the score is infinite "
                       "or undefined at some points (a division by zero, or log of 0)")
    return replace(c, backward=bwd)


PASS = Pass("autodiff", PassKind.REWRITE, run,
            "sympy derivatives of the score: the backward cascade (dq, dk, dv, d<param>)")
