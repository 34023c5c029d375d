"""pass_count (analysis): FuseMax's count of passes over the key rank n.

An einsum that iterates n runs in pass p, where p is one more than the pass of any n-reduced
value it reads (that value is complete only after its pass), and at least the pass of any
n-indexed value it reads (those fuse into the same traversal). An OnlineSoftmax node is one
traversal by construction. The count is the largest pass of any n-iterating node.
"""

from __future__ import annotations

from attnc.ir.cascade import Cascade, Einsum, OnlineSoftmax, reads
from attnc.passes import Pass, PassKind


def passes_of(c: Cascade, rank: str = "n") -> dict[str, int]:
    """The pass over `rank` that produces each node's tensor (0: it needs no traversal)."""
    pass_of: dict[str, int] = {}
    reduced: set[str] = set()  # tensors whose producer reduced `rank`
    for nd in c.nodes:
        iterates = (rank in nd.iteration) if isinstance(nd, Einsum) else True
        need = 0
        for src in reads(nd):
            p = pass_of.get(src, 0)
            need = max(need, p + 1 if (src in reduced and iterates) else p)
        p = max(need, 1) if iterates else need
        outs = [nd.name, nd.lse] if isinstance(nd, OnlineSoftmax) else [nd.name]
        for o in outs:
            pass_of[o] = p
            if iterates and rank not in getattr(nd, "ranks", ()):
                reduced.add(o)
    return pass_of


def count(c: Cascade, rank: str = "n") -> int:
    pass_of = passes_of(c, rank)
    iterating = [pass_of[nd.name] for nd in c.nodes
                 if not isinstance(nd, Einsum) or rank in nd.iteration]
    return max(iterating, default=0)


def report(c: Cascade) -> str:
    """The count and, per node, the pass that produces it (`-`: none, it is computed once the
    passes it reads are done)."""
    pass_of = passes_of(c)
    lines = [f"pass_count {c.name}: {count(c)} pass(es) over n (an analysis: it reports on the "
             "cascade after desugar and leaves it unchanged)"]
    for nd in c.nodes:
        iterates = not isinstance(nd, Einsum) or "n" in nd.iteration
        lines.append(f"    {nd.name:<8} pass {pass_of[nd.name] if iterates else '-'}")
    return "\n".join(lines) + "\n"


def run(c: Cascade) -> Cascade:
    """An analysis: the IR is returned unchanged; `report` and the printers call `count`."""
    return c


PASS = Pass("pass_count", PassKind.ANALYSIS, run,
            "analysis: FuseMax's number of passes over the key rank n", report=report)
