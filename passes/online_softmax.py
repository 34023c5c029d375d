"""online_softmax: FuseMax's 3-pass softmax chain into one pass (FlashAttention's running max).

Matches, for a score tensor x[m, n]:
    GM[m] = max(n) x;  SN = exp(x - GM);  SD = sum(n) SN
and then either  A = SN / SD; AV = sum(n) A*v  or  AV = sum(n) SN*v; O = AV / SD,
optionally followed by desugar's guards (0 / -inf for rows that see no key) and LSE = GM + log(SD).
The whole chain becomes one OnlineSoftmax node, unless an output is computed from it (an
epilogue); a cascade's `mask` statement moves into its
scores as where(mask, x, -oo) (a hidden pair is a key of weight 0). Intermediates read outside
the chain block the rewrite (they would need materializing), and the cascade is returned
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.expr import symbols as S
from attnc.ir.cascade import Cascade, Einsum, Node, OnlineSoftmax, Reduce, fresh_name, reads
from attnc.passes import Pass, PassKind


@dataclass
class _Match:
    chain: list[str]
    scores: sympy.Expr
    value: sympy.Expr
    out: str
    lse: str | None


def _einsums(c: Cascade) -> dict[str, Einsum]:
    return {nd.name: nd for nd in c.nodes if isinstance(nd, Einsum)}


def _readers(c: Cascade, name: str) -> list[str]:
    return [nd.name for nd in c.nodes if name in reads(nd)]


def _only(c: Cascade, rule) -> Einsum | None:
    found = [nd for nd in c.nodes if isinstance(nd, Einsum) and rule(nd)]
    return found[0] if len(found) == 1 else None


def _match(c: Cascade, gm: Einsum) -> _Match | None:
    m, n, f = S.m, S.n, S.f
    x = gm.expr
    GM = S.access(gm.name, m)
    sn = _only(c, lambda e: e.reduce is None and e.ranks == ("m", "n")
               and e.expr == sympy.exp(x - GM))
    if sn is None:
        return None
    SN = S.access(sn.name, m, n)
    sd = _only(c, lambda e: e.reduce is Reduce.SUM and e.over == ("n",) and e.ranks == ("m",)
               and e.expr == SN)
    if sd is None:
        return None
    SD = S.access(sd.name, m)
    chain = [gm.name, sn.name, sd.name]
    a = _only(c, lambda e: e.reduce is None and e.ranks == ("m", "n") and e.expr == SN / SD)
    weights, late_divide = (S.access(a.name, m, n), False) if a else (SN, True)
    if a:
        chain.append(a.name)
    av = _only(c, lambda e: e.reduce is Reduce.SUM and e.over == ("n",)
               and e.ranks == ("m", "f") and e.expr.has(weights))
    if av is None:
        return None
    value = sympy.simplify(av.expr / weights)
    if value.has(m) or any(str(t.base) in chain for t in value.atoms(sympy.Indexed)):
        return None
    chain.append(av.name)
    out = av.name
    if late_divide:
        o = _only(c, lambda e: e.reduce is None and e.ranks == ("m", "f")
                  and e.expr == S.access(av.name, m, f) / SD)
        if o is None:
            return None
        chain.append(o.name)
        out = o.name
    empty = sympy.Eq(GM, -sympy.oo)
    guard = _only(c, lambda e: e.ranks == ("m", "f") and e.expr == sympy.Piecewise(
        (0, empty), (S.access(out, m, f), True)))
    if guard is not None:
        chain.append(guard.name)
        out = guard.name
    lse_forms = (GM + sympy.log(SD),
                 sympy.Piecewise((-sympy.oo, empty), (GM + sympy.log(SD), True)))
    lse = _only(c, lambda e: e.ranks == ("m",) and e.reduce is None and e.expr in lse_forms)
    if lse is not None:
        chain.append(lse.name)
    return _Match(chain, x, value, out, lse.name if lse else None)


def run(c: Cascade) -> Cascade:
    outputs = dict(c.outputs)
    for gm in c.nodes:
        if not (isinstance(gm, Einsum) and gm.reduce is Reduce.MAX and gm.over == ("n",)
                and gm.ranks == ("m",)):
            continue
        found = _match(c, gm)
        if found is None:
            continue
        inner = set(found.chain)
        leaks = [t for t in found.chain if t not in (found.out, found.lse)
                 and (any(r not in inner for r in _readers(c, t)) or t in outputs.values())]
        epilogue = outputs.get("out") != found.out or outputs.get("lse") not in (None,
                                                                                  found.lse)
        if leaks or epilogue:
            # an output computed from the softmax's result (a gate, say) is left to the
            # general path (online_rescale fuses the same single pass, epilogue included)
            continue
        lse = found.lse or fresh_name("LSE", c.names())
        scores = found.scores
        if c.mask is not None:
            # a cascade's mask hides pairs from the max and the sums: a score of -oo does the
            # same, and that is the form mask_bounds and the softmax kernel understand
            scores = sympy.Piecewise((scores, c.mask), (-sympy.oo, True))
        node = OnlineSoftmax(found.out, lse, scores, found.value)
        nodes: list[Node] = []
        for nd in c.nodes:
            if nd.name == gm.name:
                nodes.append(node)
            elif nd.name not in inner:
                nodes.append(nd)
        new_outputs = dict(outputs)
        new_outputs.setdefault("lse", lse)
        return c.with_nodes(nodes, outputs=tuple(new_outputs.items()), mask=None)
    return c


PASS = Pass("online_softmax", PassKind.REWRITE, run,
            "max/exp/sum/divide chain into one pass with running max and sum")
