"""fuse: a scheduled cascade into kernel IR: a one-pass softmax cascade into one
AttentionKernel, a general cascade (schedule's stages) into a CascadePlan of stage kernels.

The softmax case:

Map einsums are inlined into the score (mask_bounds already did this), the q.k reduction
QK[m, n] = sum(e) Q[m, e]*K[n, e]*c becomes c*qk (qk is the tile's dot product), and every read of
a `param`/`input` becomes a Load placed at the outermost loop level its index allows: per program
when it depends on (b, h) only, per query row, per key, or per (row, key) element. autodiff's
derivatives (of the score in q.k and in each param load) are carried over in the same symbols
for the backward kernels.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.cascade import (Backward, Cascade, Einsum, OnlineSoftmax, ScatterSum, exprs_of,
                              qk_products)
from attnc.ir.kernel import AttentionKernel, Gradient, Load, LoadLevel
from attnc.ir.stage_kernel import CascadePlan, StageKernel
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
    assert bwd.dqk is not None  # a softmax cascade's backward names its q.k derivative
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


def _ranks(c: Cascade, name: str) -> tuple[str, ...]:
    """A tensor's ranks: a node's own, or a declared operand's or saved tensor's (whose dims
    are the rank symbols)."""
    for d in c.decls:
        if d.name == name:
            return tuple(str(x) for x in d.dims)
    nd = c.node(name)
    return nd.ranks if isinstance(nd, Einsum) else ()


def _stage_kernels(c: Cascade, keep: tuple[str, ...] = ()) -> tuple[StageKernel, ...]:
    """The stage kernels of a scheduled general cascade: each stage's nodes, what it reads
    whole from memory, its param/input loads, and the L range per program from the bounds.
    `keep`: results the backward reads, stored by the stage that computes them."""
    external = {d.name for d in c.extra_inputs}
    kernels = []
    for i, stage in enumerate(c.stages):
        kept = [t for t in keep if t in stage.nodes and t not in stage.writes]
        stage = replace(stage, writes=stage.writes + tuple(kept))
        nodes = tuple(c.node(name) for name in stage.nodes)
        assert all(isinstance(nd, (Einsum, ScatterSum)) for nd in nodes)
        loads: dict[sympy.Indexed, Load] = {}
        for nd in nodes:
            for ex in exprs_of(nd):
                for acc in sorted(sympy.sympify(ex).atoms(sympy.Indexed),
                                  key=sympy.default_sort_key):
                    name = str(acc.base)
                    if name in external and acc not in loads:
                        ordinal = sum(ld.tensor == name for ld in loads.values())
                        loads[acc] = Load(name, ordinal, tuple(acc.indices),
                                          LoadLevel.of(acc.indices))
        memory = tuple((name, _ranks(c, name)) for name in stage.reads if name not in external)
        # a param gradient leaves as per-row partial sums (the stage kernel's own buffers)
        writes = tuple((name, _ranks(c, name)) for name in stage.writes
                       if not isinstance(c.node(name), ScatterSum))
        if c.bounds is None:
            segments: tuple = ()
        else:
            segments = c.bounds.segments if stage.parallel == "m" else c.bounds.rows
        kernels.append(StageKernel(i, stage, nodes, memory, tuple(loads.values()), writes,  # type: ignore[arg-type]
                                   c.mask, segments, saves=tuple(kept)))
    return tuple(kernels)


def _plan(c: Cascade) -> CascadePlan:
    if not c.stages:
        raise CompileError(f"{c.name}: the cascade has no schedule", tensor=c.output("out"))
    out = c.output("out")
    assert out is not None
    backward: tuple[StageKernel, ...] = ()
    saved: tuple[tuple[str, str], ...] = ()
    grads: tuple[tuple[str, str], ...] = ()
    bdecls: tuple = ()
    if c.backward is not None:
        bwd = c.backward.cascade
        backward = _stage_kernels(bwd)
        saved = tuple((name, role.value) for role, name in c.backward.saved) + tuple(
            (name, fwd) for fwd, name in c.backward.residuals)
        grads, bdecls = bwd.outputs, bwd.decls
    residuals = tuple(fwd for fwd, _ in c.backward.residuals) if c.backward else ()
    return CascadePlan(name=c.name, inputs=c.extra_inputs, decls=c.decls,
                       forward=_stage_kernels(c, residuals), out=out, lse=c.output("lse"),
                       backward=backward, saved=saved, grads=grads, backward_decls=bdecls,
                       no_backward=c.no_backward)


def run(c: Cascade) -> AttentionKernel | CascadePlan:
    scan = next((nd for nd in c.nodes if isinstance(nd, OnlineSoftmax)), None)
    if scan is None:
        return _plan(c)
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
    # the expressions around the score stay in the spec's accesses: the runtime evaluates them
    # into row vectors (attnc.ir.around.row_values) that the kernels read
    return AttentionKernel(name=c.name, inputs=c.extra_inputs, loads=tuple(loads.values()),
                           score=score, mask=mask, segments=bounds.segments,
                           exact_bounds=bounds.exact, schedule=schedule, grad=grad,
                           no_backward=c.no_backward, around=c.around)


PASS = Pass("fuse", PassKind.REWRITE, run,
            "inline everything into one kernel; place param/input loads")
