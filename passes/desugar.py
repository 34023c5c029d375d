"""desugar: an `attention` block into FuseMax's 3-pass softmax cascade (cascades pass through).

    QK[m, n] = sum(e) Q[m, e]*K[n, e]
    S[m, n]  = <score>                      (omitted when the score is plain QK)
    SM[m, n] = where(<mask>, S, -oo)        (omitted without a mask)
    GM[m]    = max(n) SM[m, n]
    SN[m, n] = exp(SM[m, n] - GM[m])
    SD[m]    = sum(n) SN[m, n]
    A[m, n]  = SN[m, n] / SD[m]
    AV[m, f] = sum(n) A[m, n]*V[n, f]
    O[m, f]  = where(GM[m] == -oo, 0, AV[m, f])           rows that see no key give 0 ...
    LSE[m]   = where(GM[m] == -oo, -oo, GM[m] + log(SD[m]))   ... and lse = -inf

The names are the first free ones (a param called GM makes the max GM_1). The score reads q.k
as the access QK[m, n]; it is renamed to the q.k einsum. The masking einsum is recorded in
`Cascade.mask_node`, where mask_bounds finds it.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from attnc.expr import symbols as S
from attnc.ir.cascade import (OPERAND_DECLS, QK, AttentionSpec, BlockKind, Cascade, Einsum, Reduce,
                              fresh_name)
from attnc.passes import Pass, PassKind


def softmax_cascade(x: sympy.Expr, names: set[str]) -> tuple[list[Einsum], str, str]:
    """The FuseMax 3-pass softmax over n of the scores x[m, n], plus output guards; returns
    the einsums and the names of the output and the lse (new names are taken from `names`)."""
    m, n, f = S.m, S.n, S.f
    gm_, sn_, sd_, a_, av_, o_, lse_ = (fresh_name(base, names)
                                        for base in ("GM", "SN", "SD", "A", "AV", "O", "LSE"))
    gm, sd, sn = S.access(gm_, m), S.access(sd_, m), S.access(sn_, m, n)
    empty = sympy.Eq(gm, -sympy.oo)
    nodes = [
        Einsum(gm_, ("m",), x, Reduce.MAX, ("n",)),
        Einsum(sn_, ("m", "n"), sympy.exp(x - gm)),
        Einsum(sd_, ("m",), sn, Reduce.SUM, ("n",)),
        Einsum(a_, ("m", "n"), sn / sd),
        Einsum(av_, ("m", "f"), S.access(a_, m, n) * S.access("V", n, f), Reduce.SUM, ("n",)),
        Einsum(o_, ("m", "f"), sympy.Piecewise((0, empty), (S.access(av_, m, f), True))),
        Einsum(lse_, ("m",), sympy.Piecewise((-sympy.oo, empty), (gm + sympy.log(sd), True))),
    ]
    return nodes, o_, lse_


def run(spec: AttentionSpec | Cascade) -> Cascade:
    if isinstance(spec, Cascade):
        return spec
    m, n = S.m, S.n
    names = {d.name for d in spec.decls} | {d.name for d in OPERAND_DECLS}
    qk = fresh_name(QK, names)
    nodes = [Einsum(qk, ("m", "n"), S.access("Q", m, S.e) * S.access("K", n, S.e), Reduce.SUM,
                    ("e",))]
    current = qk
    score = spec.score.xreplace({S.access(QK, m, n): S.access(qk, m, n)})
    if score != S.access(qk, m, n):
        current = fresh_name("S", names)
        nodes.append(Einsum(current, ("m", "n"), score))
    score_node = current
    mask_node = None
    if spec.mask is not None:
        mask_node = fresh_name("SM", names)
        nodes.append(Einsum(mask_node, ("m", "n"), sympy.Piecewise(
            (S.access(current, m, n), spec.mask), (-sympy.oo, True))))
        current = mask_node
    softmax, out, lse = softmax_cascade(S.access(current, m, n), names)
    # the score and mask statements' positions move to the nodes that now compute them
    renamed = {"score": score_node, "mask": mask_node}
    origins = tuple(replace(o, tensor=renamed.get(o.tensor) or o.tensor) for o in spec.origins
                    if o.tensor == "" or renamed.get(o.tensor))
    return Cascade(name=spec.name, decls=OPERAND_DECLS + spec.decls, nodes=tuple(nodes + softmax),
                   outputs=(("out", out), ("lse", lse)), options=spec.options,
                   source_kind=BlockKind.ATTENTION, block_sparse=spec.block_sparse,
                   mask_node=mask_node, origins=origins)


PASS = Pass("desugar", PassKind.REWRITE, run,
            "score/mask/normalize blocks into FuseMax's 3-pass softmax cascade")
