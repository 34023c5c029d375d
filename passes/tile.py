"""tile: schedule a one-pass softmax cascade (one with an OnlineSoftmax node) as a grid over
(b, h, query tiles) with a sequential loop over key tiles, taken from the mask bounds or, for a
block-sparse cascade, from the block mask given at call time. A general cascade (no
OnlineSoftmax node) passes through unchanged (`schedule` stays None): `schedule` splits it into
stages after autodiff. Refuses (CompileError) a softmax cascade that still needs more than one
pass over n besides its softmax, since one fused kernel cannot hold it.
"""

from __future__ import annotations

from dataclasses import replace

from attnc.errors import CompileError
from attnc.ir.cascade import Cascade, KeySource, OnlineSoftmax, TileSchedule
from attnc.passes import Pass, PassKind, pass_count


def run(c: Cascade) -> Cascade:
    if not any(isinstance(nd, OnlineSoftmax) for nd in c.nodes):
        return c
    passes = pass_count.count(c)
    if passes > 1 or pass_count.count(c, "m"):
        p = pass_count.analyze(c)
        later = next(t for t in p.walks if p.level[t] > 1 or p.walks[t] != "n")
        raise CompileError(
            f"{c.name}: the cascade needs {passes} passes over n and {pass_count.count(c, 'm')} "
            f"over m after rewriting ({later} starts another pass); the fused softmax kernel "
            "holds one pass over n", tensor=later)
    keys = KeySource.BLOCK_MASK if c.block_sparse else KeySource.SEGMENTS
    return replace(c, schedule=TileSchedule(keys=keys))


PASS = Pass("tile", PassKind.REWRITE, run,
            "softmax: grid over (b, h, query tiles), sequential loop over key tiles; "
            "general cascades pass through")
