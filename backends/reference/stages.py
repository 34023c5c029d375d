"""Stage-by-stage interpreter of a scheduled general cascade: `schedule`'s oracle.

`run_stages` runs `Cascade.stages` in order against a memory of named tensors: the declared
ones (q, k, v, params, inputs, saved) and what earlier stages wrote. Each stage is a cascade
of its own that declares only its `reads` and evaluates only its `nodes`, with the reference
interpreter's semantics (masks, scans, scatters); only its `writes` reach memory. Before it
runs, a stage is checked against what a stage kernel relies on (the Scheduler section of the
issue's contract): its nodes iterate only its parallel rank, its loop rank and head-dim ranks;
its traversals walk its loop (scans in its order); nothing of rank [m, n] is read or written;
no node of the loop reads a reduction of the same loop before it is complete (except a sum
its stabilizing max); a scan along the parallel rank is one the stage resumes, whose
checkpoints an earlier stage stored while scanning it along its own loop, and it reads no scan
along the stage's loop. A resumed scan is recomputed here in full from the stage's inputs (the
reference materializes; a kernel adds the stored carry to the scan inside its tile). So a
schedule that forgets a read, a write or a checkpoint, orders its stages wrongly or reads a
loop's result inside the loop fails here, or gives a wrong result.

Slow and exact (use float64 inputs): an oracle for tests, never used by kernels.
"""

from __future__ import annotations

import sympy

from attnc.expr import symbols as S
from attnc.backends.reference.cascade import _sum_groups, intermediates
from attnc.ir.cascade import (Cascade, Einsum, Order, Reduce, ScatterSum, Stage, TensorDecl,
                              TensorKind, reads, verify)

_ORDER = {Reduce.CUMSUM: Order.ASCENDING, Reduce.RCUMSUM: Order.DESCENDING}


def _ranks(c: Cascade, name: str) -> tuple[str, ...]:
    for d in c.decls:
        if d.name == name:
            return tuple(str(x) for x in d.dims)
    nd = c.node(name)
    return nd.ranks if isinstance(nd, Einsum) else ()


def check_stage(c: Cascade, i: int, stage: Stage) -> None:
    """Raise AssertionError where `stage` breaks the stage contract."""
    where = f"{c.name} kernel {i + 1}"
    P, L = stage.parallel, stage.loop
    allowed = {P, "e", "f"} | ({L} if L else set())
    produced = c.produced()
    for name in stage.reads + stage.writes:
        assert not {"m", "n"} <= set(_ranks(c, name)), f"{where}: {name} [m, n] in memory"
    for name in stage.writes:
        nd = produced[name]
        assert isinstance(nd, ScatterSum) or P in nd.ranks, f"{where}: writes {name} of no {P}"
    mine = set(stage.nodes)
    for name in stage.checkpoints:
        nd = produced[name]
        assert name in mine and isinstance(nd, Einsum) and nd.is_scan and nd.over == (L,), (
            f"{where}: stores the carry of {name}, which it does not scan along its loop")
    for name in stage.nodes:
        nd = produced[name]
        if isinstance(nd, ScatterSum):
            free = {str(s) for ix, _ in nd.terms for x in ix
                    for s in sympy.sympify(x).free_symbols}
            assert L is not None and L not in free, f"{where}: {name} scattered along {L}"
            walks = True
        else:
            assert isinstance(nd, Einsum), f"{where}: {name} is no einsum"
            assert set(nd.iteration) <= allowed, f"{where}: {name} iterates {nd.iteration}"
            if name in stage.resumes:  # rebuilt per tile of P: no walk of this stage
                assert nd.is_scan and nd.over == (P,), f"{where}: resumes {name}, no scan of {P}"
                inner = _loop_results(c, name, mine, L, scans=True) if L else set()
                assert not inner, f"{where}: resumes {name}, which reads the scans {inner}"
                continue
            walks = nd.reduce is not None and bool({"m", "n"} & set(nd.over))
            if walks:
                assert nd.over == (L,), f"{where}: {name} reduces {nd.over}, the loop is {L}"
            if nd.is_scan:
                assert stage.order is _ORDER[nd.reduce], (  # type: ignore[index]
                    f"{where}: {name} against the order")
        if walks:
            assert L is not None
            early = _loop_results(c, name, mine, L)
            stab = {nd.stabilizer} if isinstance(nd, Einsum) and nd.stabilizer else set()
            assert early <= stab, f"{where}: {name} reads {sorted(early - stab)} in their loop"


def _loop_results(c: Cascade, name: str, mine: set[str], L: str, scans: bool = False
                  ) -> set[str]:
    """The reductions over L of this stage that `name` reads through the stage's [m, n]
    nodes: complete only after the loop (with `scans`, the scans along L instead)."""
    produced = c.produced()
    found: set[str] = set()
    todo = reads(produced[name])
    seen: set[str] = set()
    while todo:
        src = todo.pop()
        if src in seen or src not in mine:
            continue
        seen.add(src)
        nd = produced[src]
        if isinstance(nd, Einsum) and nd.is_scan == scans and nd.over == (L,):
            found.add(src)
        elif isinstance(nd, Einsum) and L in nd.iteration:
            todo += reads(nd)
    return found


def _stage_cascade(c: Cascade, i: int, stage: Stage) -> Cascade:
    """The stage as a cascade: its reads declared (memory tensors as saved ones), its nodes."""
    declared = {d.name: d for d in c.decls}
    decls = tuple(declared[r] if r in declared else
                  TensorDecl(r, TensorKind.SAVED, tuple(S.RANKS[x] for x in _ranks(c, r)))
                  for r in stage.reads)
    nodes = tuple(c.node(name) for name in stage.nodes)
    return Cascade(name=f"{c.name}_kernel{i + 1}", decls=decls, nodes=nodes,
                   outputs=tuple((w, w) for w in stage.writes), options=c.options, mask=c.mask)


def run_stages(c: Cascade, q, k, v, *, scale: float | None = None, inputs: dict | None = None,
               saved: dict | None = None) -> dict:
    """Run a scheduled cascade stage by stage; returns {role: tensor} for its outputs, as
    `interpret` does (dk, dv summed over GQA groups). `saved`: its saved tensors by name."""
    assert c.stages, f"{c.name} has no schedule"
    inputs = inputs or {}
    memory = dict(saved or {})
    kinds = {d.name: d.kind for d in c.decls}
    stored: set[str] = set()  # the scans whose checkpoints earlier stages stored
    for i, stage in enumerate(c.stages):
        check_stage(c, i, stage)
        missing = set(stage.resumes) - stored
        assert not missing, f"{c.name} kernel {i + 1}: resumes {sorted(missing)} unstored"
        stored |= set(stage.checkpoints)
        sub = _stage_cascade(c, i, stage)
        verify(sub)
        given = {r: inputs[r] for r in stage.reads
                 if kinds.get(r) in (TensorKind.PARAM, TensorKind.INPUT)}
        # a param gradient has the param's shape: the stage is given its output buffer
        given.update({nd.param: inputs[nd.param] for nd in sub.nodes
                      if isinstance(nd, ScatterSum)})
        env = intermediates(sub, q, k, v, scale=scale, inputs=given,
                            saved={r: memory[r] for r in stage.reads if r in memory})
        memory.update({w: env[w] for w in stage.writes})
    return _sum_groups({role: memory[name] for role, name in c.outputs}, k.shape[1])
