"""pass_count (analysis): FuseMax's count of passes, over the key rank n and the query rank m.

A traversal is a node that must walk a rank to its end before its result is complete: a
reduction over n or m, a scan along n or m (its prefix is complete when the walk reaches it),
a param gradient (a ScatterSum sums over both; it walks the rank its index leaves free, see
`scatter_loop`) and an OnlineSoftmax node (one walk over n). Every other node is evaluated
wherever it is needed: a node of rank [m, n] (a map or a dot product over e/f) per element, a
row node of rank [m] / [m, r] or [n] / [n, r] once what it reads is complete.

A traversal's pass is one more than the pass of any traversal result it reads (through maps
of any rank), and at least 1; a read of a max by a sum the max stabilizes (`stabilizer`,
through [m, n] maps) does not count: the sum keeps a running max in the same pass. A tensor
read by a traversal is `avail`able from the pass after its producer's (a declared tensor from
pass 1; a map from the latest of what it reads). The number of passes over n (or m) is the
number of distinct passes that hold a traversal of n (of m); for a cascade over n only, the
passes are 1..k and this is FuseMax's count. `schedule` makes each (pass, traversed rank) a
kernel (after rewriting the scans of a traversal that reads both directions along its loop,
which costs a pass: `summary` then shows the counts before and after); `report` shows both
counts and the kernel count, before and after each later rewrite. A scan along n read by a
traversal over m (parallel over n) costs no pass of its own there: it is resumed from the
checkpoints that a pass over n computing it stores (the scan's own pass over n, counted above,
which is a kernel of its own when no other traversal of n needs it); `summary` names such
scans.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy

from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.cascade import Cascade, Einsum, Node, OnlineSoftmax, ScatterSum, reads
from attnc.passes import Pass, PassKind


class Kind(enum.Enum):
    ELEMENT = "element"      # rank [m, n] (a map or a sum over e/f): evaluated per element
    SCAN = "scan"            # a scan along m or n: a traversal whose result is per element
    REDUCTION = "reduction"  # a sum/max/min over m or n
    ROW = "row"              # rank [m] / [m, r] or [n] / [n, r], nothing of m, n reduced
    SCATTER = "scatter"      # a param gradient: a sum over (m, n) scattered into the param
    ONLINE = "online"        # an OnlineSoftmax node: one pass over n
    OTHER = "other"          # iterates neither m nor n (schedule refuses it)

    @property
    def traversal(self) -> bool:
        return self in (Kind.SCAN, Kind.REDUCTION, Kind.SCATTER, Kind.ONLINE)


def kind_of(nd: Node) -> Kind:
    if isinstance(nd, OnlineSoftmax):
        return Kind.ONLINE
    if isinstance(nd, ScatterSum):
        return Kind.SCATTER
    walked = {"m", "n"} & set(nd.iteration)
    if nd.is_scan and nd.over[0] in ("m", "n"):
        return Kind.SCAN
    if {"m", "n"} & set(nd.over):
        return Kind.REDUCTION
    if walked == {"m", "n"}:
        return Kind.ELEMENT
    return Kind.ROW if walked else Kind.OTHER


def plain(acc: sympy.Indexed, ranks: tuple[str, ...]) -> bool:
    """`acc` reads a tensor of `ranks` at exactly its ranks (X[m, n], not X[m, n - 1]): the
    only way a computed tensor is read (by name: X[n, m] is X[m, n])."""
    return sorted(map(str, acc.indices)) == sorted(ranks) and all(
        i == S.RANKS[str(i)] for i in acc.indices)


def scatter_ranks(nd: ScatterSum) -> set[str]:
    """Which of m, n a param gradient's scatter index reads."""
    free: set[str] = set()
    for index, _ in nd.terms:
        for x in index:
            free |= {str(s) for s in sympy.sympify(x).free_symbols}
    return free & {"m", "n"}


def walked(nd: Node) -> str | None:
    """The rank a traversal walks. A param gradient's index must stay fixed along the walk: it
    walks n when its index is free of n (the stage is parallel over m), m when it is free of m,
    and None when free of both (either works) or when it reads both (schedule refuses it)."""
    if isinstance(nd, OnlineSoftmax):
        return "n"
    if isinstance(nd, ScatterSum):
        free = scatter_ranks(nd)
        return None if len(free) != 1 else "n" if free == {"m"} else "m"
    return next(r for r in nd.over if r in ("m", "n"))


@dataclass(frozen=True)
class Passes:
    """The analysis of one cascade: each node's kind, each traversal's pass (`level`) and the
    first pass that can read each tensor (`avail`)."""

    kind: dict[str, Kind]
    level: dict[str, int]
    avail: dict[str, int]
    walks: dict[str, str | None]

    def count(self, rank: str) -> int:
        return len({self.level[t] for t, r in self.walks.items() if r == rank})


def analyze(c: Cascade) -> Passes:
    """Kinds, passes and availability of every node of `c` (see the module docstring)."""
    nodes = {o: nd for nd in c.nodes
             for o in ([nd.name, nd.lse] if isinstance(nd, OnlineSoftmax) else [nd.name])}
    kind = {name: kind_of(nd) for name, nd in nodes.items()}
    level: dict[str, int] = {}
    avail: dict[str, int] = {}
    walks: dict[str, str | None] = {}

    def need(src: str, exempt: str | None) -> int:
        """The first pass a traversal can read `src` in; a read of `exempt` (its stabilizer)
        through [m, n] maps is free."""
        if src not in nodes:
            return 1
        if src == exempt:
            return level[src]
        if exempt is not None and kind[src] is Kind.ELEMENT:
            return max([1] + [need(r, exempt) for r in reads(nodes[src])])
        return avail[src]

    for nd in c.nodes:
        k = kind[nd.name]
        exempt = nd.stabilizer if isinstance(nd, Einsum) else None
        p = max([1] + [need(r, exempt) for r in reads(nd)])
        outs = [nd.name, nd.lse] if isinstance(nd, OnlineSoftmax) else [nd.name]
        for o in outs:
            if k.traversal:
                level[o] = p
                avail[o] = p if k is Kind.SCAN else p + 1
            else:
                avail[o] = p
        if k.traversal:
            walks[nd.name] = walked(nd)
    return Passes(kind, level, avail, walks)


def count(c: Cascade, rank: str = "n") -> int:
    """The number of passes over `rank` (FuseMax's count for rank n)."""
    return analyze(c).count(rank)


def _pass_of(p: Passes, name: str) -> str:
    if p.kind[name].traversal:
        rank = p.walks.get(name)
        return f"pass {p.level[name]}" + (f" over {rank}" if rank else "")
    if p.kind[name] in (Kind.ELEMENT, Kind.SCAN):
        return f"pass {p.avail[name]}"
    return "-" if p.avail[name] <= 1 else f"after pass {p.avail[name] - 1}"


def summary(c: Cascade) -> str:
    """`N pass(es) over n, M over m; K kernel(s)` (or why it cannot be scheduled)."""
    from attnc.passes import schedule  # schedule builds on this module's analysis
    p = analyze(c)
    text = f"{p.count('n')} pass(es) over n, {p.count('m')} over m"
    if any(k is Kind.ONLINE for k in p.kind.values()):
        fused = p.count("n") <= 1 and p.count("m") == 0
        return text + ("; 1 kernel (the fused softmax)" if fused else "; not fusable")
    try:
        done = schedule.scheduled(c)
    except CompileError as err:
        return text + f"; not schedulable: {err.message}"
    q = analyze(done)
    if (q.count("n"), q.count("m")) != (p.count("n"), p.count("m")):
        text += (f" ({q.count('n')} over n, {q.count('m')} over m once scans read in both "
                 "directions are rewritten)")
    resumed = sorted({x for st in done.stages for x in st.resumes})
    return text + f"; {len(done.stages)} kernel(s)" + (
        f" (resuming {', '.join(resumed)} from checkpoints)" if resumed else "")


def report(c: Cascade) -> str:
    """The counts and, per node, the pass that produces it (`-`: needs no pass; `after pass
    k`: computed once pass k is done), then the counts after the rewrites that follow."""
    from attnc.passes import online_rescale, online_softmax
    p = analyze(c)
    lines = [f"pass_count {c.name}: {summary(c)} (an analysis: it reports on the cascade after "
             "desugar and leaves it unchanged)"]
    for nd in c.nodes:
        lines.append(f"    {nd.name:<8} {_pass_of(p, nd.name)}")
    rewritten = c
    for rewrite in (online_softmax, online_rescale):
        rewritten = rewrite.run(rewritten)
        lines.append(f"after {rewrite.PASS.name}: {summary(rewritten)}")
    return "\n".join(lines) + "\n"


def run(c: Cascade) -> Cascade:
    """An analysis: the IR is returned unchanged; `report` and the printers call `count`."""
    return c


PASS = Pass("pass_count", PassKind.ANALYSIS, run,
            "analysis: FuseMax's number of passes over n and over m, and kernels", report=report)
