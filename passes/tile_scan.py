"""tile_scan: choose the kernels that run a scheduled scan (the linear family's kernel IR).

The chunked kernel covers a chunked schedule whose states all have a key axis (and, for delta
rules, a value axis too): its intra-chunk products run over key features. Value features split
into programs unless an expression sums over j. The backward is the chunked core kernels for a
chunked scan; otherwise a generated recurrent backward when sympy derives the vector-Jacobian
product of every update and of the output (and of the sums inside them), else autograd through
the eager recurrence. See attnc/ir/linear_kernel.py for what the plan holds.
"""

from __future__ import annotations

import sympy

from attnc.expr.derivatives import vjp_obstacle
from attnc.expr.symbols import j
from attnc.ir.linear import LinearScan
from attnc.ir.linear_kernel import Algorithm, ScanBackward, ScanPlan
from attnc.passes import Pass, PassKind


def why_not_chunked(scan: LinearScan) -> str | None:
    """None when the chunked kernel covers this schedule, else why not."""
    sch = scan.schedule
    if sch is None or not sch.chunked:
        return sch.reason if sch is not None else "not scheduled"
    for plan in sch.states:
        axes = scan.state(plan.state).axes
        if "i" not in axes:
            return f"the chunked kernel needs a key axis on state {plan.state}"
        if plan.kind.delta and "j" not in axes:
            return f"the chunked delta-rule kernel needs a matrix state ({plan.state})"
    return None


def sums_over_j(scan: LinearScan) -> bool:
    """Whether an expression a kernel prints sums over j (any of a sum's limits: sympy merges
    nested sums into one)."""
    exprs = [u.expr for u in scan.updates] + [scan.output]
    if scan.schedule is not None and scan.schedule.chunked and scan.schedule.output is not None:
        exprs.append(scan.schedule.output)
    return any(limit[0] == j for ex in exprs for sm in ex.atoms(sympy.Sum)
               for limit in sm.args[1:])


def run(scan: LinearScan) -> ScanPlan:
    reason = why_not_chunked(scan)
    no_vjp = None
    if reason is None:
        backward = ScanBackward.CORE
    else:
        no_vjp = vjp_obstacle([u.expr for u in scan.updates] + [scan.output], scan.atoms())
        backward = ScanBackward.RECURRENT if no_vjp is None else ScanBackward.EAGER
    return ScanPlan(scan=scan, algorithm=Algorithm.CHUNKED if reason is None
                    else Algorithm.RECURRENT, why_not_chunked=reason,
                    chunk_size=scan.chunk_size, whole_values=sums_over_j(scan),
                    backward=backward, no_vjp=no_vjp)


PASS = Pass("tile_scan", PassKind.REWRITE, run,
            "the kernels that run a scan: chunked and/or recurrent, tiles, grid, backward")
