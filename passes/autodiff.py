"""autodiff: derive the backward cascade of a one-pass softmax cascade with sympy.

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

The derivative nodes (DQK, D_p_i) are what the backward kernels evaluate per element. A score
that sympy cannot differentiate to closed form (say a param under floor) gets no backward cascade
and a reason instead; the forward still compiles.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from attnc import symbols as S
from attnc.errors import CompileError
from attnc.ir import Cascade, Einsum, OnlineSoftmax, ScatterSum, TensorDecl
from attnc.passes.fuse import qk_factor

NAME = "autodiff"
SAVED = (("O", ("m", "f")), ("LSE", ("m",)), ("dO", ("m", "f")), ("dLSE", ("m",)))


def _t(name: str, *ranks: str) -> sympy.Indexed:
    return S.access(name, *(S.RANKS[r] for r in ranks))


def _step(x):
    return sympy.Piecewise((1, x > 0), (0, True))


def _sign(x):
    return sympy.Piecewise((1, x > 0), (-1, x < 0), (0, True))


def derivative(ex: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """d ex / d wrt for an access `wrt`, in closed form (Heaviside and sign as Piecewise, so
    backends need no new functions). Raises ValueError if sympy leaves a Derivative behind."""
    x = sympy.Dummy("x", real=True)
    d = sympy.diff(ex.xreplace({wrt: x}), x).xreplace({x: wrt})
    d = d.replace(sympy.Heaviside, lambda arg, *_: _step(arg)).replace(sympy.sign, _sign)
    if d.has(sympy.Derivative, sympy.Subs, sympy.DiracDelta):
        raise ValueError(f"sympy leaves d({ex})/d({wrt}) unevaluated")
    return d


def _qk_reductions(c: Cascade, score: sympy.Expr) -> dict[sympy.Indexed, sympy.Expr]:
    """The q.k reductions the score reads, with their factors c (R = c * q.k)."""
    found = {}
    for nd in c.nodes:
        if isinstance(nd, Einsum) and nd.reduce is not None:
            acc = _t(nd.name, *nd.ranks)
            if score.has(acc):
                found[acc] = qk_factor(c, nd)
    return found


def backward_cascade(c: Cascade) -> Cascade:
    """The backward cascade of a scheduled one-pass cascade (raises ValueError if the score
    cannot be differentiated, CompileError if it reads what the kernels cannot fuse)."""
    score, mask = c.bounds.score, c.bounds.mask
    reductions = _qk_reductions(c, score)
    params = {d.name for d in c.decls if d.kind == "param"}
    nodes: list = [nd for nd in c.nodes if isinstance(nd, Einsum) and nd.reduce is not None
                   and _t(nd.name, *nd.ranks) in reductions]
    s, dS, p = _t("S", "m", "n"), _t("dS", "m", "n"), _t("P", "m", "n")
    lse = _t("LSE", "m")
    nodes += [
        Einsum("S", ("m", "n"), score),
        Einsum("SM", ("m", "n"), s if mask is None else sympy.Piecewise((s, mask), (-sympy.oo, True))),
        Einsum("LSEB", ("m",), sympy.Piecewise((sympy.oo, sympy.Eq(lse, -sympy.oo)), (lse, True))),
        Einsum("P", ("m", "n"), sympy.exp(_t("SM", "m", "n") - _t("LSEB", "m"))),
        Einsum("DOO", ("m",), _t("dO", "m", "f") * _t("O", "m", "f"), "sum", ("f",)),
        Einsum("Delta", ("m",), _t("DOO", "m") - _t("dLSE", "m")),
        Einsum("dP", ("m", "n"), _t("dO", "m", "f") * _t("V", "n", "f"), "sum", ("f",)),
        Einsum("dS", ("m", "n"), p * (_t("dP", "m", "n") - _t("Delta", "m"))),
        Einsum("DQK", ("m", "n"), sympy.Add(*(factor * derivative(score, acc)
                                              for acc, factor in reductions.items()))),
        Einsum("dQK", ("m", "n"), dS * _t("DQK", "m", "n")),
        Einsum("dQ", ("m", "e"), _t("dQK", "m", "n") * _t("K", "n", "e"), "sum", ("n",)),
        Einsum("dK", ("n", "e"), _t("dQK", "m", "n") * _t("Q", "m", "e"), "sum", ("m",)),
        Einsum("dV", ("n", "f"), p * _t("dO", "m", "f"), "sum", ("m",)),
    ]
    clash = {d.name for d in c.decls} & {nd.name for nd in nodes}
    if clash:
        raise ValueError(f"the name {sorted(clash)[0]} is taken by an intermediate of the "
                         "backward cascade; rename that tensor")
    outputs = [("dq", "dQ"), ("dk", "dK"), ("dv", "dV")]
    reads = sorted((a for a in score.atoms(sympy.Indexed) if str(a.base) in params),
                   key=sympy.default_sort_key)
    for param in sorted(params):
        terms = []
        for i, acc in enumerate(a for a in reads if str(a.base) == param):
            nodes.append(Einsum(f"D_{param}_{i}", ("m", "n"), derivative(score, acc)))
            terms.append((tuple(acc.indices), dS * _t(f"D_{param}_{i}", "m", "n")))
        if terms:  # a param read only by the mask has no gradient (the mask is piecewise constant)
            nodes.append(ScatterSum(f"d_{param}", param, tuple(terms)))
            outputs.append((f"d_{param}", f"d_{param}"))
    saved = tuple(TensorDecl(name, "saved", tuple(S.RANKS[r] for r in ranks))
                  for name, ranks in SAVED)
    return Cascade(name=f"{c.name}_backward", decls=c.decls + saved, nodes=tuple(nodes),
                   outputs=tuple(outputs), options=c.options, source_kind=c.source_kind,
                   block_sparse=c.block_sparse)


def run(c: Cascade) -> Cascade:
    if c.bounds is None or not any(isinstance(nd, OnlineSoftmax) for nd in c.nodes):
        return c
    try:
        return replace(c, backward=backward_cascade(c))
    except (ValueError, CompileError) as err:
        return replace(c, no_backward=str(err))
