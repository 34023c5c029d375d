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

from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.cascade import Backward, Cascade, OnlineSoftmax, qk_products
from attnc.ir.kernel import AttentionKernel, Gradient, Load, LoadLevel
from attnc.passes import Pass, PassKind


def _extract_loads(c: Cascade, exprs, loads: dict[sympy.Indexed, Load]):
    """Each expression with its param/input reads replaced by load symbols (new loads are
    added to `loads`)."""
    external = {d.name for d in c.extra_inputs}
    out: list[sympy.Expr | None] = []
    for ex in exprs:
        if ex is None:
            out.append(None)
            continue
        subs = {}
        for acc in sorted(ex.atoms(sympy.Indexed), key=sympy.default_sort_key):
            name = str(acc.base)
            if name not in external:
                raise CompileError(f"{c.name}: the score reads {name}, which would have to be "
                                   "materialized; only q.k, params and inputs can be fused",
                                   tensor=name)
            if acc not in loads:
                ordinal = sum(ld.tensor == name for ld in loads.values())
                loads[acc] = Load(name, ordinal, tuple(acc.indices), LoadLevel.of(acc.indices))
            subs[acc] = loads[acc].symbol
        out.append(ex.xreplace(subs))
    return out


def _gradient(c: Cascade, bwd: Backward, qk_subs: dict, loads: dict) -> Gradient:
    """autodiff's per-element derivatives in the kernel's symbols (qk and the loads)."""
    dqk, = _extract_loads(c, [bwd.cascade.einsum(bwd.dqk).expr.xreplace(qk_subs)], loads)
    dloads = []
    for acc, node in bwd.dparams:
        deriv, = _extract_loads(c, [bwd.cascade.einsum(node).expr.xreplace(qk_subs)], loads)
        dloads.append((loads[acc].name, deriv))
    assert c.bounds is not None
    return Gradient(dqk=dqk, dloads=tuple(dloads), rows=c.bounds.rows)


def _check_outputs(c: Cascade, scan: OnlineSoftmax) -> None:
    """The kernel writes the softmax's weighted sum and its lse, nothing else: a cascade whose
    output is computed from them (an epilogue) is refused at that statement, never dropped."""
    for role, produced in (("out", scan.name), ("lse", scan.lse)):
        wanted = c.output(role)
        if wanted not in (None, produced):
            raise CompileError(
                f"{c.name}: the output {wanted} is computed from the softmax's result "
                f"{produced}; attnc fuses a cascade whose output is that weighted sum itself, not "
                "an epilogue of it (yet)", tensor=wanted,
                hint=f"end the cascade at {produced} and apply the rest in torch")


def run(c: Cascade) -> AttentionKernel:
    scan = next(nd for nd in c.nodes if isinstance(nd, OnlineSoftmax))
    _check_outputs(c, scan)
    if scan.value != S.access("V", S.n, S.f):
        raise CompileError(f"{c.name}: the softmax must weight V[n, f] directly, got {scan.value}",
                           tensor=scan.name)
    bounds, schedule = c.bounds, c.schedule
    assert bounds is not None and bounds.score is not None and schedule is not None
    reads = bounds.score if bounds.mask is None else sympy.Tuple(bounds.score, bounds.mask)
    qk_subs = {acc: S.qk * factor for acc, factor in qk_products(c, reads).items()}
    score = bounds.score.xreplace(qk_subs)
    mask = bounds.mask.xreplace(qk_subs) if bounds.mask is not None else None
    loads: dict[sympy.Indexed, Load] = {}
    score, mask = _extract_loads(c, [score, mask], loads)
    if mask is not None and mask.has(S.qk):
        raise CompileError(f"{c.name}: a mask may not depend on q.k (use the score instead)",
                           tensor=c.mask_node)
    grad = _gradient(c, c.backward, qk_subs, loads) if c.backward is not None else None
    return AttentionKernel(name=c.name, inputs=c.extra_inputs, loads=tuple(loads.values()),
                           score=score, mask=mask, segments=bounds.segments,
                           exact_bounds=bounds.exact, schedule=schedule, grad=grad,
                           no_backward=c.no_backward)


PASS = Pass("fuse", PassKind.REWRITE, run,
            "inline everything into one kernel; place param/input loads")
