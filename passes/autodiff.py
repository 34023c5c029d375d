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
                              TensorDecl, TensorKind, exprs_of, fresh_name, qk_products)
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


def run(c: Cascade) -> Cascade:
    if c.bounds is None or not any(isinstance(nd, OnlineSoftmax) for nd in c.nodes):
        return c
    try:
        bwd = backward_cascade(c)
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
