"""Param gradients of a softmax kernel, from the backward kernels' partial sums.

The backward kernels never accumulate a param's gradient with atomics: each program writes the
partial sums of `ds * d score / d load` to its own slots of a buffer that keeps the dims of the
load's level (per (b, h) and query tile, per row, per key, or per element). `add` evaluates the
load's index over those dims (the shared evaluator, backends/eager) and scatter-sums the
buffer into the param in a fixed order (attnc.scatter), so two runs give bitwise equal
gradients.
"""

from __future__ import annotations

import torch

from attnc.backends.eager.evaluate import Evaluator, gather
from attnc.expr import symbols as S
from attnc.ir.kernel import AttentionKernel, LoadLevel
from attnc.scatter import scatter_sum

# The ranks a load level's buffer keeps besides (b, h).
_RANKS = {LoadLevel.PROGRAM: (), LoadLevel.ROW: ("m",), LoadLevel.KEY: ("n",),
          LoadLevel.TILE: ("m", "n")}


class ParamGradients:
    """`grads[name]`: the float64 gradient of each param in `names`, summed as `add` receives
    the buffers."""

    def __init__(self, ir: AttentionKernel, inputs: dict, names: list[str], B, H, M, N):
        self.loads = {ld.name: ld for ld in ir.loads}
        self.inputs, self.sizes = inputs, (B, H, M, N)
        self.grads = {n: torch.zeros(inputs[n].shape, dtype=torch.float64,
                                     device=inputs[n].device) for n in names}

    def add(self, load_name: str, buffer: torch.Tensor, first_row: int) -> None:
        """Scatter-sum a load's partial-sum buffer (rows from `first_row` for a per-element
        one) into its param."""
        ld = self.loads[load_name]
        if ld.tensor not in self.grads:
            return
        B, H, M, N = self.sizes
        dev = buffer.device
        ranks = _RANKS[ld.level]
        positions = {"m": torch.arange(first_row, first_row + (
            buffer.shape[1] if ld.level is LoadLevel.TILE else M), device=dev),
            "n": torch.arange(N, device=dev)}
        values = (buffer.view(B, H, -1).sum(-1) if ld.level is LoadLevel.PROGRAM
                  else buffer.view(B, H, *(len(positions[r]) for r in ranks)))
        nd = 2 + len(ranks)
        syms = {S.B: B, S.H: H, S.M: M, S.N: N, S.m: 0, S.n: 0,
                S.b: torch.arange(B, device=dev).view([-1] + [1] * (nd - 1)),
                S.h: torch.arange(H, device=dev).view([1, -1] + [1] * (nd - 2))}
        for i, r in enumerate(ranks):
            syms[S.RANKS[r]] = positions[r].view([-1 if j == 2 + i else 1 for j in range(nd)])

        def access(acc):
            return gather(self.inputs[str(acc.base)], [ev(x) for x in acc.indices])
        ev = Evaluator(syms, values, access=access)
        self.grads[ld.tensor] += scatter_sum(values, [ev(x) for x in ld.index],
                                             self.grads[ld.tensor].shape)
