"""desugar: an `attention` block into a cascade (cascades pass through).

Plain softmax (no weight, no sink) becomes FuseMax's 3-pass softmax cascade, which
online_softmax turns into one pass:

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

The masking einsum is recorded in `Cascade.mask_node`, where mask_bounds finds it.

Every other normalizer becomes a general cascade: QK and S as above, the mask as
`Cascade.mask` (every sum, max and scan over n or m sees only the visible pairs; a sum over
none is 0, a max -oo), `W[m, n] = <weight>` when there is one (w below; 1 without), and (s the
score S[m, n]):

    pointwise f (sigmoid, softplus, relu, relu2 = relu**2, none = identity):
        P[m, n] = f(s)  (omitted for none);  O[m, f] = sum(n) P*w*V[n, f]
    l1(f):   P = f(s);  Z[m] = sum(n) P;  NV[m, f] = sum(n) P*w*V
             O = where(Z == 0, 0, NV / Z)
    mean(f): P = f(s);  CNT[m] = sum(n) 1;  NV[m, f] = sum(n) P*w*V
             O = where(CNT == 0, 0, NV / CNT)
    softmax with a weight or a sink:
        GM[m] = max(n) s;  SN[m, n] = exp(s - GM);  SD[m] = sum(n) SN;  NV[m, f] = sum(n) SN*w*V
        no sink: O = where(GM == -oo, 0, NV / SD);  LSE = where(GM == -oo, -oo, GM + log(SD))
        sink:    SK[m] = <sink>;  MX[m] = max(GM, SK);  Z[m] = SD*exp(GM - MX) + exp(SK - MX)
                 O = where(GM == -oo, 0, NV*exp(GM - MX) / Z)
                 LSE = where(GM == -oo, SK, MX + log(Z))      (MX keeps every exp <= 1)
    standardize (mean and biased variance of s over the visible keys; one pass of sums):
        CNT[m] = sum(n) 1;  S1[m] = sum(n) s;  S2[m] = sum(n) s**2
        SV[m, f] = sum(n) V;  SSV[m, f] = sum(n) s*V;  RC[m] = where(CNT == 0, 0, 1 / CNT)
        MU = S1*RC;  VAR = relu(S2*RC - MU**2)   (relu: rounding may make it negative)
        O = (SSV - MU*SV) / sqrt(VAR + 1e-6)      (= sum(n) (s - MU) / sqrt(VAR + 1e-6) * V)
    sinkhorn(k), in the log domain, for t = 1..k (LC0 = 0, omitted):
        GR_t[m] = max(n) (s + LC_{t-1}[n]);  RS_t[m] = sum(n) exp(s + LC_{t-1}[n] - GR_t)
        LR_t[m] = where(GR_t == -oo, 0, -(GR_t + log(RS_t)))          rows divided by their sums
        GC_t[n] = max(m) (s + LR_t[m]);      CS_t[n] = sum(m) exp(s + LR_t[m] - GC_t)
        LC_t[n] = where(GC_t == -oo, 0, -(GC_t + log(CS_t)))          then columns
        P[m, n] = exp(s + LR_k[m] + LC_k[n]);  O[m, f] = sum(n) P*V

Every division is late (the sum of w*V over n divided once per row), so each of these but
sinkhorn (2k + 1 passes) and standardize (one pass of plain sums) is one pass over the keys
with a running max where there is one. A row that sees no key gives O = 0 (and lse = -inf, or
the sink), never NaN. The outputs are ("out", O), plus ("lse", LSE) for softmax.

New names are the first free ones (a param called GM makes the max GM_1). The score and weight
read q.k as the access QK[m, n]; it is renamed to the q.k einsum. The statements' origins move
to the nodes that now compute them: "score" to S, "weight" to W, "sink" to SK, "normalize" to
every node of the normalizer; a general cascade keeps "mask" for `Cascade.mask`.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.expr.functions import BY_NAME
from attnc.ir.cascade import (OPERAND_DECLS, QK, AttentionSpec, BlockKind, Cascade, Einsum,
                              Normalizer, Origin, Reduce, fresh_name)
from attnc.passes import Pass, PassKind

m, n, f = S.m, S.n, S.f
EPS = sympy.Float("1e-6")  # standardize's variance floor


def softmax_cascade(x: sympy.Expr, names: set[str]) -> tuple[list[Einsum], str, str]:
    """The FuseMax 3-pass softmax over n of the scores x[m, n], plus output guards; returns
    the einsums and the names of the output and the lse (new names are taken from `names`)."""
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


class _Nodes:
    """Einsums appended in order under fresh names; each call returns the new tensor's access."""

    def __init__(self, names: set[str]):
        self.names = names
        self.list: list[Einsum] = []

    def map(self, base: str, ranks: tuple[str, ...], expr) -> sympy.Indexed:
        return self._add(Einsum(fresh_name(base, self.names), ranks, sympy.sympify(expr)))

    def reduce(self, base: str, ranks: tuple[str, ...], expr, op: Reduce = Reduce.SUM,
               over: str = "n") -> sympy.Indexed:
        return self._add(Einsum(fresh_name(base, self.names), ranks, sympy.sympify(expr), op,
                                (over,)))

    def _add(self, nd: Einsum) -> sympy.Indexed:
        self.list.append(nd)
        return S.at(nd.name, *nd.ranks)


def pointwise(nz: Normalizer, x: sympy.Expr) -> sympy.Expr:
    """f(x) for a pointwise normalizer f."""
    if nz is Normalizer.NONE:
        return x
    if nz is Normalizer.RELU2:
        return BY_NAME["relu"].build(x) ** 2
    return BY_NAME[nz.value].build(x)


def run(spec: AttentionSpec | Cascade) -> Cascade:
    if isinstance(spec, Cascade):
        return spec
    if not spec.around.plain and (spec.normalize is not Normalizer.SOFTMAX
                                  or spec.weight is not None or spec.sink is not None):
        raise CompileError(f"{spec.name}: operands, prologues, gates, head maps and gathered keys "
                           "are fused into softmax kernels only", tensor="",
                           hint="use normalize = softmax without weight or sink, or apply the "
                                "prologue in torch before the call")
    if spec.normalize is Normalizer.SOFTMAX and spec.weight is None and spec.sink is None:
        return _softmax(spec)
    return _general(spec)


def _softmax(spec: AttentionSpec) -> Cascade:
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
    # the statements around the score (lowered by frontends/lower_around.py) keep their names,
    # which passes refusing them cite
    origins = tuple(replace(o, tensor=renamed.get(o.tensor) or o.tensor) for o in spec.origins
                    if o.tensor == "" or renamed.get(o.tensor) or _around_statement(o.tensor))
    return Cascade(name=spec.name, decls=OPERAND_DECLS + spec.decls, nodes=tuple(nodes + softmax),
                   outputs=(("out", out), ("lse", lse)), options=spec.options,
                   source_kind=BlockKind.ATTENTION, block_sparse=spec.block_sparse,
                   mask_node=mask_node, origins=origins, around=spec.around)


def _around_statement(tensor: str) -> bool:
    return " " in tensor or tensor in ("value", "gate", "kv_head", "premix", "postmix", "gather")


def _general(spec: AttentionSpec) -> Cascade:
    """Any other normalizer, or softmax with a weight or a sink: a general cascade."""
    nodes = _Nodes({d.name for d in spec.decls} | {d.name for d in OPERAND_DECLS})
    qk = nodes.reduce(QK, ("m", "n"), S.access("Q", m, S.e) * S.access("K", n, S.e),
                      over="e")
    to_qk = {S.access(QK, m, n): qk}
    score = spec.score.xreplace(to_qk)
    s = qk if score == qk else nodes.map("S", ("m", "n"), score)
    moved: dict[str, list[str]] = {"score": [str(s.base)], "mask": ["mask"]}
    w = sympy.Integer(1)
    if spec.weight is not None:
        w = nodes.map("W", ("m", "n"), spec.weight.xreplace(to_qk))
        moved["weight"] = [str(w.base)]
    before = len(nodes.list)
    outputs = _normalized(spec, nodes, s, w, moved)
    moved["normalize"] = [nd.name for nd in nodes.list[before:]
                          if nd.name not in moved.get("sink", ())]
    origins = tuple(Origin(tensor, o.line, o.column) for o in spec.origins
                    for tensor in (moved.get(o.tensor, []) if o.tensor else [""]))
    return Cascade(name=spec.name, decls=OPERAND_DECLS + spec.decls, nodes=tuple(nodes.list),
                   outputs=outputs, options=spec.options, source_kind=BlockKind.ATTENTION,
                   block_sparse=spec.block_sparse, origins=origins, mask=spec.mask)


def _normalized(spec: AttentionSpec, nodes: _Nodes, s: sympy.Indexed, w: sympy.Expr,
                moved: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """The normalizer's einsums (see the module docstring); returns the cascade's outputs."""
    nz, v = spec.normalize, S.access("V", n, f)

    def out(expr, summed: bool = False) -> tuple[tuple[str, str], ...]:
        o = nodes.reduce("O", ("m", "f"), expr) if summed else nodes.map("O", ("m", "f"), expr)
        return (("out", str(o.base)),)

    if nz is Normalizer.SOFTMAX:
        return _softmax_weighted(spec, nodes, s, w, moved)
    if nz is Normalizer.STANDARDIZE:
        cnt = nodes.reduce("CNT", ("m",), 1)
        s1 = nodes.reduce("S1", ("m",), s)
        s2 = nodes.reduce("S2", ("m",), s ** 2)
        sv = nodes.reduce("SV", ("m", "f"), v)
        ssv = nodes.reduce("SSV", ("m", "f"), s * v)
        rc = nodes.map("RC", ("m",), sympy.Piecewise((0, sympy.Eq(cnt, 0)), (1 / cnt, True)))
        mu = nodes.map("MU", ("m",), s1 * rc)
        var = nodes.map("VAR", ("m",), BY_NAME["relu"].build(s2 * rc - mu ** 2))
        return out((ssv - mu * sv) / sympy.sqrt(var + EPS))
    if nz is Normalizer.SINKHORN:
        return out(_sinkhorn(spec.iterations, nodes, s) * v, summed=True)
    f_s = pointwise(spec.pointwise or nz, s)
    p = s if f_s == s else nodes.map("P", ("m", "n"), f_s)
    if nz.pointwise:
        return out(p * w * v, summed=True)
    z = nodes.reduce("Z", ("m",), p) if nz is Normalizer.L1 else nodes.reduce("CNT", ("m",), 1)
    nv = nodes.reduce("NV", ("m", "f"), p * w * v)
    return out(sympy.Piecewise((0, sympy.Eq(z, 0)), (nv / z, True)))


def _softmax_weighted(spec: AttentionSpec, nodes: _Nodes, s: sympy.Indexed, w: sympy.Expr,
                      moved: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """Softmax with a weight (after normalizing) or a sink logit, divided late."""
    v, oo = S.access("V", n, f), sympy.oo
    gm = nodes.reduce("GM", ("m",), s, Reduce.MAX)
    sn = nodes.map("SN", ("m", "n"), sympy.exp(s - gm))
    sd = nodes.reduce("SD", ("m",), sn)
    nv = nodes.reduce("NV", ("m", "f"), sn * w * v)
    empty = sympy.Eq(gm, -oo)
    if spec.sink is None:
        o = nodes.map("O", ("m", "f"), sympy.Piecewise((0, empty), (nv / sd, True)))
        lse = nodes.map("LSE", ("m",), sympy.Piecewise((-oo, empty),
                                                      (gm + sympy.log(sd), True)))
    else:
        sk = nodes.map("SK", ("m",), spec.sink)
        moved["sink"] = [str(sk.base)]
        mx = nodes.map("MX", ("m",), sympy.Max(gm, sk))
        z = nodes.map("Z", ("m",), sd * sympy.exp(gm - mx) + sympy.exp(sk - mx))
        o = nodes.map("O", ("m", "f"), sympy.Piecewise(
            (0, empty), (nv * sympy.exp(gm - mx) / z, True)))
        lse = nodes.map("LSE", ("m",), sympy.Piecewise((sk, empty), (mx + sympy.log(z), True)))
    return (("out", str(o.base)), ("lse", str(lse.base)))


def _sinkhorn(k: int, nodes: _Nodes, s: sympy.Indexed) -> sympy.Indexed:
    """k log-domain Sinkhorn iterations over the scores s; returns P[m, n], the final matrix."""
    oo = sympy.oo
    lc: sympy.Expr = sympy.Integer(0)
    lr: sympy.Expr = sympy.Integer(0)
    for t in range(1, k + 1):
        x = s + lc
        gr = nodes.reduce(f"GR{t}", ("m",), x, Reduce.MAX)
        rs = nodes.reduce(f"RS{t}", ("m",), sympy.exp(x - gr))
        lr = nodes.map(f"LR{t}", ("m",), sympy.Piecewise(
            (0, sympy.Eq(gr, -oo)), (-(gr + sympy.log(rs)), True)))
        y = s + lr
        gc = nodes.reduce(f"GC{t}", ("n",), y, Reduce.MAX, over="m")
        cs = nodes.reduce(f"CS{t}", ("n",), sympy.exp(y - gc), over="m")
        lc = nodes.map(f"LC{t}", ("n",), sympy.Piecewise(
            (0, sympy.Eq(gc, -oo)), (-(gc + sympy.log(cs)), True)))
    return nodes.map("P", ("m", "n"), sympy.exp(s + lr + lc))


PASS = Pass("desugar", PassKind.REWRITE, run,
            "attention blocks into cascades: FuseMax's 3-pass softmax, or a general cascade "
            "for the other normalizers")
