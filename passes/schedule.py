"""schedule: a general cascade's kernels (FuseMax's pass count made into a schedule).

Runs after autodiff on a cascade without an OnlineSoftmax node (a softmax cascade is fused by
tile/fuse as one kernel and passes through) and on its backward cascade, and sets
`Cascade.stages`. First, sums over a head-dim rank r are brought into the forms a stage
evaluates (`_products`): the summand collected by its factors of r (autodiff writes
sum(f) (a - b)*X[m, f]*Y[n, f]), and a summand mixing several products of r split into one
sum per product plus a map adding them (which keeps the name). Then, from pass_count's
analysis (each traversal's pass, each node's kind):

- Every reduction over n (rank [m] / [m, r]) runs in a stage parallel over m that loops over
  n; every reduction over m in a stage parallel over n that loops over m. A param gradient
  (ScatterSum) runs in a stage whose parallel rank covers its index: parallel m when the
  index is free of n, parallel n when free of m, either when free of both.
- A stage's level is its traversals' pass: one more than the pass of any reduction of another
  stage it reads (through maps of any rank); a sum reads the max it stabilizes in the same
  stage. Traversals of the same (level, parallel rank) share a stage.
- Scans decide the walk: a stage whose traversals read a cumsum walks its loop ascending, an
  rcumsum descending. Traversals needing opposite walks at the same level get a stage each. A
  scan is, like every [m, n] node, recomputed in each stage that needs it (`nodes` lists it
  there).
- A scan X along a stage's PARALLEL rank P (dK of stick-breaking attention sums over m values
  that read scans along n) is resumed (`Stage.resumes`): the stage rebuilds X on its tile
  from X's checkpoints (its carry before each P tile, per row of the loop rank) plus the scan
  inside the tile. An earlier stage parallel over the loop rank that walks P in X's order
  computes X and stores them (`Stage.checkpoints`): one already computing X if any, else the
  earliest at a pass where X's operands are ready (X and its [m, n] operands join its
  `nodes`), else a stage of its own at X's pass with nothing to write. Each scan has one such
  stage, before every stage that resumes it (stages of one pass are ordered so; never both
  ways). Refused: a resumed scan that reads a scan along the loop rank (its tile is rebuilt
  from [m, n] nodes only), or one whose operands read a scan along P of the other direction
  (no walk computes both). Checkpoints are scratch of the kernels, not tensors of the
  cascade: `reads` and `writes` never list them.
- A traversal that reads scans of both directions along its loop L is first rewritten
  (`_one_walk_each`, before planning): each scan of the minority direction becomes the total
  minus the opposite scan plus the element,

        C = rcumsum(L) x   ->   C_total[P] = sum(L) x;  C_cumsum = cumsum(L) x;
                                C = C_total[P] - C_cumsum + x   (and the mirror for cumsum)

  (fresh names; the map keeps the scan's name, so readers are untouched; x, unless a plain
  read, becomes a map C_x, evaluated once per element). The sum sees the
  visible pairs only, as the scans do, so the identity holds at every visible pair; at an
  invisible pair C differs by x, and no reduction or scan reads an invisible pair. The total
  is a reduction, so the traversal gets one more pass before it (C_total is written to memory
  as a [P] tensor and read back). The direction kept along L is the one most of the
  traversal's scans walk (a tie: the cascade's first scan's, e.g. a recomputed forward scan
  in a backward), fixed for L once chosen, so repeated rewrites (a rewritten scan may
  conflict in another traversal) only ever remove scans of the other direction and end.
  PRECISION: C_total - C_cumsum cancels; in float32 the rewritten scan's absolute error is
  about 2^-24 * sum(L) |x| rather than 2^-24 * the scan itself, so a small suffix (prefix)
  of a long row loses relative accuracy (stick-breaking's suffix of softplus values grows
  with the row length; exp(-C) then has a relative error of about 2^-24 * C_total).
- A row node ([m] / [m, r] or [n] / [n, r]) that reads a traversal result is computed in the
  epilogue of the last stage it depends on; one that reads none is recomputed wherever it is
  needed (and, when it is an output, computed by the first stage of its parallel rank, or by
  a stage of its own with no loop when there is none).
- `reads` are the declared tensors and earlier stages' results the stage's nodes read;
  `writes` the stage's results that a later stage reads or that are outputs. Nothing of rank
  [m, n] is ever stored.

Stages are ordered by level, parallel m before n, ascending before descending (a stage storing
checkpoints before the stages of its pass that resume them). Refused with a
CompileError at the tensor (each message states the pass counts and the reason): more than
MAX_KERNELS stages; a node iterating neither m nor n; a reduction over both m and n, or over
n without m (or m without n); a node iterating m, n and a head-dim rank r that is neither a
reduction g[m, n] * Y[L, r] over L = n or m (Y a tensor of rank [L, r]) nor a dot product
X[m, r] * Y[n, r] * c (c free of r, per element); a computed tensor read at other indices than
its ranks; an output of rank [m, n]; a param gradient scattered at an index of both m and n;
the scans that cannot be resumed (above).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy

from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.cascade import (Cascade, Einsum, Node, OnlineSoftmax, Order, Reduce, ScatterSum,
                              Stage, exprs_of, fresh_name, reads)
from attnc.passes import Pass, PassKind
from attnc.passes.pass_count import Kind, Passes, analyze, kind_of, plain, scatter_ranks

MAX_KERNELS = 16  # a cascade needing more kernels than this is refused (a launch each)

_OTHER = {"m": "n", "n": "m"}
_ORDER = {Reduce.CUMSUM: Order.ASCENDING, Reduce.RCUMSUM: Order.DESCENDING}


def _refuse(c: Cascade, p: Passes, name: str, reason: str) -> CompileError:
    return CompileError(
        f"{c.name}: {name} cannot be scheduled: {reason} (the cascade needs "
        f"{p.count('n')} pass(es) over n and {p.count('m')} over m)", tensor=name)


def _needed(c: Cascade) -> list[str]:
    """The nodes the outputs depend on, in cascade order."""
    produced = c.produced()
    todo = [t for _, t in c.outputs]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in produced:
            continue
        seen.add(name)
        todo += reads(produced[name])
    return [nd.name for nd in c.nodes if nd.name in seen]


def _head_ranks(ranks) -> list[str]:
    return [r for r in ranks if r not in ("m", "n")]


def _check_form(c: Cascade, p: Passes, nd: Node) -> None:
    """Refuse a node no stage can evaluate (see the module docstring)."""
    kind = p.kind[nd.name]
    produced = c.produced()
    for ex in exprs_of(nd):
        for acc in sympy.sympify(ex).atoms(sympy.Indexed):
            src = produced.get(str(acc.base))
            if isinstance(src, Einsum) and not plain(acc, src.ranks):
                raise _refuse(c, p, nd.name, f"it reads {acc}; a computed tensor is read at "
                              f"its own ranks [{', '.join(src.ranks)}] only")
    if isinstance(nd, ScatterSum):
        if scatter_ranks(nd) == {"m", "n"}:
            raise _refuse(c, p, nd.name, f"the gradient of {nd.param} is scattered at an "
                          "index of both m and n, which no stage keeps fixed along its loop")
        return
    assert isinstance(nd, Einsum)
    if kind is Kind.OTHER:
        raise _refuse(c, p, nd.name, "it iterates neither m nor n")
    if len(_head_ranks(nd.ranks)) > 1:
        raise _refuse(c, p, nd.name, "a tensor has at most one head-dim rank (e or f)")
    if kind is Kind.SCAN:
        if set(nd.ranks) != {"m", "n"}:
            raise _refuse(c, p, nd.name, "a scan along n or m has rank [m, n]")
    elif kind is Kind.REDUCTION:
        loop = nd.over[0]
        if nd.over != (loop,) or _OTHER[loop] not in nd.ranks:
            raise _refuse(c, p, nd.name, f"a reduction over {loop} keeps {_OTHER[loop]} and "
                          "reduces nothing else")
        head = _head_ranks(nd.ranks)
        if head and not _weighted(nd.expr, loop, head[0]):
            raise _refuse(c, p, nd.name, f"a reduction over {loop} of rank "
                          f"[{', '.join(nd.ranks)}] must be g[m, n] * Y[{loop}, {head[0]}]")
    elif kind is Kind.ELEMENT:
        if set(nd.ranks) != {"m", "n"}:
            raise _refuse(c, p, nd.name, "a node of both m and n has rank [m, n]")
        if nd.reduce is not None and not _dot(nd):
            raise _refuse(c, p, nd.name, "a reduction to rank [m, n] must be a dot product "
                          "X[m, r] * Y[n, r] * c (c free of r)")


def _weighted(ex: sympy.Expr, loop: str, r: str) -> bool:
    """ex = g * Y[loop, r] with g free of r: a weighted sum of rows of Y."""
    rsym = S.RANKS[r]
    with_r = [a for a in sympy.Mul.make_args(ex) if a.has(rsym)]
    return (len(with_r) == 1 and isinstance(with_r[0], sympy.Indexed)
            and plain(with_r[0], (loop, r)))


def _dot(nd: Einsum) -> bool:
    """X[m, r] * Y[n, r] * c, c free of r (evaluated per element)."""
    if nd.reduce is not Reduce.SUM or len(nd.over) != 1:
        return False
    r = nd.over[0]
    args = sympy.Mul.make_args(nd.expr)
    with_r = [a for a in args if a.has(S.RANKS[r])]
    if len(with_r) != 2:
        return False
    return (all(isinstance(a, sympy.Indexed) for a in with_r)
            and sorted(sorted(map(str, a.indices)) for a in with_r) == [[r, "m"], [r, "n"]]
            and all(plain(a, tuple(map(str, a.indices))) for a in with_r))


class _Planner:
    def __init__(self, c: Cascade):
        self.c = c
        self.p = analyze(c)
        self.produced = c.produced()
        self.needed = _needed(c)
        self.position = {d.name: i for i, d in enumerate(c.decls)}
        self.position.update({nd.name: len(self.position) + i for i, nd in enumerate(c.nodes)})
        for name in self.needed:
            self._check(name)

    def _check(self, name: str) -> None:
        _check_form(self.c, self.p, self.produced[name])

    def recomputed(self, name: str) -> bool:
        """Evaluated wherever needed: [m, n] nodes, scans, rows that read no traversal."""
        kind = self.p.kind[name]
        return kind in (Kind.ELEMENT, Kind.SCAN) or (kind is Kind.ROW
                                                      and self.p.avail[name] <= 1)

    def closure(self, name: str) -> list[str]:
        """The recomputed nodes `name` reads, transitively."""
        out: list[str] = []
        todo = reads(self.produced[name])
        while todo:
            src = todo.pop()
            if src in self.produced and src not in out and self.recomputed(src):
                out.append(src)
                todo += reads(self.produced[src])
        return out

    def along(self, scan: str) -> str:
        return self.produced[scan].over[0]  # type: ignore[union-attr]

    def scans(self, names) -> list[str]:
        """The scans among `names`, in cascade order."""
        return sorted((s for s in set(names) if self.p.kind[s] is Kind.SCAN),
                      key=self.position.__getitem__)

    def order(self, name: str, loop: str | None
              ) -> tuple[str | None, Order | None, list[str]]:
        """The loop and walk a traversal needs from the scans it reads along its loop, and the
        scans it reads along the other rank (its parallel one): resumed from checkpoints."""
        scans = self.scans(self.closure(name))
        if loop is None and scans:  # a gradient free to walk either rank: its first scan's
            loop = self.along(scans[0])
        resumed = [s for s in scans if self.along(s) != loop]
        for s in resumed:
            inner = [x for x in self.scans(self.closure(s)) if self.along(x) == loop]
            if inner:
                raise _refuse(self.c, self.p, name, f"it walks {loop} and reads the scan {s} "
                              f"along {self.along(s)}, which reads the scan {inner[0]} along "
                              f"{loop}; a scan along the parallel rank is rebuilt per tile "
                              "from a checkpoint and [m, n] nodes only")
        orders = {_ORDER[self.produced[s].reduce]  # type: ignore[index, union-attr]
                  for s in scans if s not in resumed}
        assert len(orders) <= 1, f"{name}: _one_walk_each left scans of both directions"
        return loop, (orders.pop() if orders else None), resumed

    def stages(self) -> tuple[Stage, ...]:
        p = self.p
        traversals = [t for t in self.needed if p.kind[t] in (Kind.REDUCTION, Kind.SCATTER)]
        groups: dict[tuple[int, str, Order | None], list[str]] = {}
        free: list[tuple[str, Order | None]] = []  # gradients free to walk either rank
        resumed: dict[str, list[str]] = {}
        for t in traversals:
            loop, order, resumed[t] = self.order(t, p.walks[t])
            if loop is None:
                free.append((t, order))
                continue
            groups.setdefault((p.level[t], _OTHER[loop], order), []).append(t)
        for t, order in free:
            keys = [k for k in groups if k[0] == p.level[t] and order in (None, k[2])]
            key = min(keys, key=_rank) if keys else (p.level[t], "m", order)
            groups.setdefault(key, []).append(t)
        # a traversal that needs no particular walk joins one that does
        for key in [k for k in groups if k[2] is None]:
            walks = sorted((k for k in groups if k[:2] == key[:2] and k[2] is not None),
                           key=_rank)
            if walks:
                groups[walks[0]] = groups.pop(key) + groups[walks[0]]
        plans = [_Group(k[0], k[1], k[2], list(groups[k]),
                        resumes=self.scans(s for t in groups[k] for s in resumed[t]))
                 for k in sorted(groups, key=_rank)]
        self._checkpoint(plans)
        plans = self._sorted(plans)
        owned = [g.owned for g in plans]
        stage_of = {t: i for i, ts in enumerate(owned) for t in ts}
        parallel = [g.parallel for g in plans]
        orders = [g.order or Order.ASCENDING for g in plans]
        loops: list[str | None] = [_OTHER[g.parallel] for g in plans]
        outputs = {t for _, t in self.c.outputs}
        for name in self.needed:
            kind = p.kind[name]
            if kind is Kind.ROW and not self.recomputed(name):
                deps = [stage_of[r] for r in reads(self.produced[name]) if r in stage_of]
                i = max(deps)
                rank = "m" if "m" in self.produced[name].ranks else "n"  # type: ignore[union-attr]
                if parallel[i] != rank:
                    raise _refuse(self.c, p, name, f"its rank [{rank}] is not the parallel "
                                  f"rank of the stage that completes what it reads")
                owned[i].append(name)
                stage_of[name] = i
            elif name in outputs and kind in (Kind.ELEMENT, Kind.SCAN):
                raise _refuse(self.c, p, name, "an output of rank [m, n] is never stored")
            elif name in outputs and kind is Kind.ROW:
                rank = "m" if "m" in self.produced[name].ranks else "n"  # type: ignore[union-attr]
                found = next((j for j, par in enumerate(parallel) if par == rank), None)
                if found is None:  # no stage walks anything for this rank: one without a loop
                    owned.append([])
                    plans.append(_Group(0, rank, None, owned[-1]))
                    parallel.append(rank)
                    orders.append(Order.ASCENDING)
                    loops.append(None)
                    found = len(owned) - 1
                i = found
                owned[i].append(name)
                stage_of[name] = i
        if len(owned) > MAX_KERNELS:
            first = (owned[MAX_KERNELS] or plans[MAX_KERNELS].checkpoints)[0]
            raise _refuse(self.c, p, first, f"the schedule needs {len(owned)} kernels, more "
                          f"than {MAX_KERNELS}")
        return self._build(plans, loops, orders, outputs)

    def _checkpoint(self, plans: list[_Group]) -> None:
        """Give every scan a stage resumes a stage that stores its checkpoints: parallel over
        the other rank, walking the scan's rank in its order, at a pass where the scan's
        operands are ready and no later than its first reader's (the same pass only when that
        orders no two stages of the pass both ways, see `_sorted`). One that already computes
        the scan is preferred, then the earliest; with none, a stage of its own at the scan's
        pass (which pass_count counts: a scan is a traversal of its rank)."""
        readers: dict[str, list[_Group]] = {}
        for g in plans:
            for x in g.resumes:
                readers.setdefault(x, []).append(g)
        before: dict[_Group, set[_Group]] = {}  # a stage -> stages of its pass it precedes

        def reaches(a: _Group, b: _Group) -> bool:
            todo, seen = [a], set()
            while todo:
                g = todo.pop()
                if g is b:
                    return True
                if g not in seen:
                    seen.add(g)
                    todo += before.get(g, ())
            return False

        for x in self.scans(readers):
            along, walk = self.along(x), _ORDER[self.produced[x].reduce]  # type: ignore[index, union-attr]
            first = min(g.level for g in readers[x])
            ready = self.p.level[x]
            against = [s for s in self.scans([x] + self.closure(x)) if self.along(s) == along
                       and _ORDER[self.produced[s].reduce] is not walk]  # type: ignore[index, union-attr]
            if against:
                raise _refuse(self.c, self.p, x, f"its checkpoints need a walk over {along} "
                              f"that computes it and the scan {against[0]} of the opposite "
                              "direction")
            fits = [g for g in plans if g.parallel == _OTHER[along] and g.order in (None, walk)
                    and ready <= g.level <= first
                    and not any(r.level == g.level and reaches(r, g) for r in readers[x])]
            if fits:
                g = min(fits, key=lambda g: (x not in self.computes(g), g.level))
            else:
                g = _Group(ready, _OTHER[along], walk, [])
                plans.append(g)
            g.order = walk
            g.checkpoints.append(x)
            before.setdefault(g, set()).update(r for r in readers[x] if r.level == g.level)

    def computes(self, g: _Group) -> set[str]:
        """The nodes a stage evaluates for its traversals and checkpoints."""
        out = set(g.owned) | set(g.checkpoints)
        for name in list(out):
            out |= set(self.closure(name))
        return out

    def _sorted(self, plans: list[_Group]) -> list[_Group]:
        """Stages in `_rank` order, except that a stage storing checkpoints comes before the
        stages that resume them (stages of one pass read nothing of each other otherwise;
        `_checkpoint` never asks for a cycle)."""
        todo = sorted(plans, key=lambda g: _rank((g.level, g.parallel, g.order)))
        done: list[_Group] = []
        while todo:
            ready = next(g for g in todo if not any(x in h.checkpoints for h in todo
                                                     for x in g.resumes))
            todo.remove(ready)
            done.append(ready)
        return done

    def _build(self, plans, loops, orders, outputs) -> tuple[Stage, ...]:
        position = self.position
        stage_nodes: list[list[str]] = []
        stage_reads: list[list[str]] = []
        for g in plans:
            nodes = self.computes(g)
            srcs = {r for nd in nodes for r in reads(self.produced[nd]) if r not in nodes}
            stage_nodes.append(sorted(nodes, key=position.__getitem__))
            stage_reads.append(sorted(srcs, key=position.__getitem__))
        stages = []
        for i, g in enumerate(plans):
            later = {r for rs in stage_reads[i + 1:] for r in rs}
            writes = [t for t in stage_nodes[i]
                      if t in g.owned and (t in later or t in outputs)]
            stages.append(Stage(g.parallel, loops[i], tuple(stage_nodes[i]),
                                tuple(stage_reads[i]), tuple(writes), orders[i],
                                checkpoints=tuple(self.scans(g.checkpoints)),
                                resumes=tuple(g.resumes)))
        return tuple(stages)


@dataclass(eq=False)
class _Group:
    """A stage being planned: its pass, parallel rank and walk (None: any), the traversals and
    row nodes it owns, the scans it resumes and those whose checkpoints it stores."""

    level: int
    parallel: str
    order: Order | None
    owned: list[str]
    resumes: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def _rank(key: tuple[int, str, Order | None]) -> tuple[int, str, int]:
    """Stage order: by level, parallel m before n, ascending before descending."""
    return key[0], key[1], 1 if key[2] is Order.DESCENDING else 0


def _linear(ex: sympy.Expr, r: sympy.Symbol) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """ex as a sum of (r-part, coefficient free of r): products distribute over the sums
    that hold r; any other function of r is one opaque part."""
    if not ex.has(r):
        return [(sympy.Integer(1), ex)]
    if isinstance(ex, sympy.Add):
        return [t for a in ex.args for t in _linear(a, r)]
    if isinstance(ex, sympy.Mul):
        terms = [(sympy.Integer(1), sympy.Integer(1))]
        for a in ex.args:
            terms = [(p * p2, k * k2) for p, k in terms for p2, k2 in _linear(a, r)]
        return terms
    return [(ex, sympy.Integer(1))]


def _products(c: Cascade) -> Cascade:
    """Bring sums over a head-dim rank r (to [m, n]) and weighted sums (to [P, r]) into the
    forms a stage evaluates: the summand as (coefficient) * (its factors of r) collected by
    those factors (sum(f) (a - b)*X[m, f]*Y[n, f] -> (a - b)*X*Y); a summand that still mixes
    several products of r (sum(m) P1*dO1[m, f] + P2*dO2[m, f]) becomes one sum per product and
    a map adding them (which keeps the name). A part of a stabilized sum keeps the mark when
    it still has the form."""
    from attnc.passes.online_rescale import stabilizes
    taken = c.names()
    nodes: list[Node] = []
    for nd in c.nodes:
        kind = kind_of(nd)
        head = _head_ranks(nd.ranks if isinstance(nd, Einsum) else ())
        if kind is Kind.ELEMENT and isinstance(nd, Einsum) and len(nd.over) == 1:
            r = nd.over[0]
        elif kind is Kind.REDUCTION and isinstance(nd, Einsum) and len(head) == 1:
            r = head[0]
        else:
            nodes.append(nd)
            continue
        groups: dict[sympy.Expr, sympy.Expr] = {}
        for part, coeff in _linear(nd.expr, S.RANKS[r]):
            groups[part] = groups.get(part, sympy.Integer(0)) + coeff
        exprs = [sympy.factor_terms(k) * part for part, k in groups.items()]
        if len(exprs) == 1:
            nodes.append(replace(nd, expr=exprs[0]))
            continue
        names = [fresh_name(f"{nd.name}_part", taken) for _ in exprs]
        for name, ex in zip(names, exprs):
            part = replace(nd, name=name, expr=ex, stabilizer=None)
            stab = nd.stabilizer and c.einsum(nd.stabilizer)
            if stab and stabilizes(c, stab, part):
                part = replace(part, stabilizer=nd.stabilizer)
            nodes.append(part)
        nodes.append(Einsum(nd.name, nd.ranks, sympy.Add(*(S.at(n, *nd.ranks) for n in names))))
    return c.with_nodes(nodes)


def _conflict(c: Cascade, walk: dict[str, Reduce]) -> tuple[str, list[Einsum]] | None:
    """The first traversal (in cascade order) that reads scans of both directions along one
    rank: that rank and those scans, in cascade order (`walk` gets the rank's kept direction
    when it has none yet)."""
    planner = _Planner(c)
    for t in planner.needed:
        if planner.p.kind[t] not in (Kind.REDUCTION, Kind.SCATTER):
            continue
        closure = set(planner.closure(t))
        scans = [nd for nd in c.nodes if isinstance(nd, Einsum) and nd.name in closure
                 and planner.p.kind[nd.name] is Kind.SCAN]
        if not scans:
            continue
        # only the scans along the walk (a free gradient's: its first scan's rank, as
        # `order` picks): those along the parallel rank are resumed, each in its direction
        rank = planner.p.walks[t] or scans[0].over[0]
        scans = [nd for nd in scans if nd.over[0] == rank]
        if len({nd.reduce for nd in scans}) < 2:
            continue
        if rank not in walk:
            counts = {red: sum(nd.reduce is red for nd in scans)
                      for red in (Reduce.CUMSUM, Reduce.RCUMSUM)}
            first = scans[0].reduce
            walk[rank] = max(counts, key=lambda red: (counts[red], red is first))
        return rank, scans
    return None


def _one_walk_each(c: Cascade) -> Cascade:
    """Rewrite the scans that would make a traversal walk its loop both ways (see the module
    docstring): each becomes total - opposite scan + element."""
    walk: dict[str, Reduce] = {}
    while (found := _conflict(c, walk)) is not None:
        rank, scans = found
        keep = walk[rank]
        minority = {nd.name for nd in scans if nd.reduce is not keep}
        taken = c.names()
        nodes: list[Node] = []
        for nd in c.nodes:
            if nd.name not in minority:
                nodes.append(nd)
                continue
            assert isinstance(nd, Einsum)
            rest = tuple(r for r in nd.ranks if r != rank)
            x = nd.expr
            if not isinstance(x, sympy.Indexed):  # evaluated once per element, read thrice
                name = fresh_name(f"{nd.name}_x", taken)
                nodes.append(Einsum(name, nd.ranks, x))
                x = S.at(name, *nd.ranks)
            total = fresh_name(f"{nd.name}_total", taken)
            scan = fresh_name(f"{nd.name}_{keep.value}", taken)
            nodes += [Einsum(total, rest, x, Reduce.SUM, nd.over),
                      Einsum(scan, nd.ranks, x, keep, nd.over),
                      Einsum(nd.name, nd.ranks, S.at(total, *rest) - S.at(scan, *nd.ranks) + x)]
        c = c.with_nodes(nodes)
    return c


def scheduled(c: Cascade) -> Cascade:
    """`c` with its products in stage form, its scans in one direction per traversal and its
    stages (raises CompileError for what cannot be scheduled)."""
    c = _one_walk_each(_products(c))
    return replace(c, stages=_Planner(c).stages())


def plan(c: Cascade) -> tuple[Stage, ...]:
    """The stages of a general cascade (raises CompileError for what cannot be scheduled)."""
    return scheduled(c).stages


def run(c: Cascade) -> Cascade:
    if any(isinstance(nd, OnlineSoftmax) for nd in c.nodes):
        return c
    out = scheduled(c)
    if c.backward is not None:
        # a backward no kernel schedule can hold leaves the forward compiled, with the reason
        # (the kernel raises it when asked for gradients), as autodiff's own refusals do
        try:
            bwd = scheduled(c.backward.cascade)
        except CompileError as err:
            return replace(out, backward=None, no_backward=f"the backward cannot be scheduled: "
                           f"{err.message}")
        out = replace(out, backward=replace(c.backward, cascade=bwd))
    return out


PASS = Pass("schedule", PassKind.REWRITE, run,
            "a general cascade's kernels: a stage per (pass, parallel rank) from the dependency "
            "graph")
