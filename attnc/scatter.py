"""Deterministic scatter-add: the last step of a param's gradient.

`index_add_`, `index_put_(accumulate=True)` and `scatter_add_` accumulate in an order that is
not fixed (atomics on CUDA, threads on CPU), so a float gradient could change in its last bits
from run to run. Here the values are sorted by target (a stable sort), summed by a float64
prefix sum, and each target takes the difference of the prefix sum at the ends of its run:
the same operations in the same order every time, on any device, with no data-dependent shapes.
"""

from __future__ import annotations

import torch


def scatter_sum(values: torch.Tensor, index: list, shape: tuple[int, ...]) -> torch.Tensor:
    """out[shape] (float64) with out[i] = sum of values[j] over j with index[:, j] == i; `index`
    holds one integer tensor per dimension of `shape`, broadcastable with `values`. Entries whose
    index falls outside `shape` are dropped."""
    values = values.to(torch.float64)
    index = [torch.as_tensor(i, device=values.device) for i in index]
    values, *index = torch.broadcast_tensors(values, *index)
    size = 1
    flat = torch.zeros(values.shape, dtype=torch.int64, device=values.device)
    inside = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    for i, extent in zip(index, shape):
        i = i.round().long() if i.is_floating_point() else i.long()
        inside &= (i >= 0) & (i < extent)
        flat = flat * extent + i
        size *= extent
    flat = torch.where(inside, flat, size).reshape(-1)  # outside: a sentinel past every target
    order = torch.argsort(flat, stable=True)
    flat = flat[order]
    prefix = torch.cat([values.new_zeros(1), torch.cumsum(values.reshape(-1)[order], 0)])
    targets = torch.arange(size, device=values.device)
    lo = torch.searchsorted(flat, targets, right=False)
    hi = torch.searchsorted(flat, targets, right=True)
    return (prefix[hi] - prefix[lo]).reshape(shape)
