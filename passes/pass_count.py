"""pass_count (analysis): FuseMax's count of passes over the key rank n.

An einsum that iterates n runs in pass p, where p is one more than the pass of any n-reduced
value it reads (that value is complete only after its pass), and at least the pass of any
n-indexed value it reads (those fuse into the same traversal). An OnlineSoftmax node is one
traversal by construction. The count is the largest pass of any n-iterating node.
"""

from __future__ import annotations

from attnc.ir import Cascade, Einsum, reads

NAME = "pass_count"


def count(c: Cascade, rank: str = "n") -> int:
    pass_of: dict[str, int] = {}  # tensor -> pass that produces it (0: needs no traversal)
    reduced: set[str] = set()  # tensors whose producer reduced `rank`
    for nd in c.nodes:
        iterates = (rank in nd.iteration) if isinstance(nd, Einsum) else True
        need = 0
        for src in reads(nd):
            p = pass_of.get(src, 0)
            need = max(need, p + 1 if (src in reduced and iterates) else p)
        p = max(need, 1) if iterates else need
        outs = [nd.name] if isinstance(nd, Einsum) else [nd.name, nd.lse]
        for o in outs:
            pass_of[o] = p
            if iterates and rank not in getattr(nd, "ranks", ()):
                reduced.add(o)
    iterating = [pass_of[nd.name] for nd in c.nodes
                 if not isinstance(nd, Einsum) or rank in nd.iteration]
    return max(iterating, default=0)


def run(c: Cascade) -> Cascade:
    """An analysis: the IR is returned unchanged; printers call `count` to report."""
    return c
