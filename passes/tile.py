"""tile: schedule a one-pass cascade as a grid over (b, h, query tiles) with a sequential loop
over key tiles, taken from the mask bounds or, for a block-sparse cascade, from the block mask
given at call time. Refuses (CompileError) a cascade that still needs more than one pass over n,
since its intermediates would have to be materialized between passes.
"""

from __future__ import annotations

from dataclasses import replace

from attnc.errors import CompileError
from attnc.ir.cascade import Cascade, KeySource, OnlineSoftmax, TileSchedule
from attnc.passes import Pass, PassKind, pass_count


def run(c: Cascade) -> Cascade:
    passes = pass_count.count(c)
    if passes > 1:
        pass_of = pass_count.passes_of(c)
        second = next(nd.name for nd in c.nodes if pass_of[nd.name] > 1)
        raise CompileError(
            f"{c.name}: the cascade needs {passes} passes over n after rewriting ({second} "
            "starts pass 2); attnc fuses one-pass cascades only. A softmax written as max / exp "
            "/ sum / divide over a score tensor is rewritten to one pass; other multi-pass forms "
            "are not supported yet", tensor=second)
    if not any(isinstance(nd, OnlineSoftmax) for nd in c.nodes):
        raise CompileError(f"{c.name}: no softmax over n found; attnc compiles softmax attention "
                           "(GM = max(n) x, SN = exp(x - GM), SD = sum(n) SN, A = SN/SD, "
                           "AV = sum(n) A*V)", tensor=c.output("out"))
    keys = KeySource.BLOCK_MASK if c.block_sparse else KeySource.SEGMENTS
    return replace(c, schedule=TileSchedule(keys=keys))


PASS = Pass("tile", PassKind.REWRITE, run,
            "grid over (b, h, query tiles), sequential loop over key tiles")
