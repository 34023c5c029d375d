"""Kernel IR: one fused attention kernel, backend-neutral.

A program owns one query tile (BLOCK_M rows) of one (b, h). It loads its q tile, then the `loads`
that depend only on (b, h) ("program") or on the row ("row"), walks the key tiles of each
`segments` entry (masked tiles, then full tiles without evaluating the mask, then masked tiles),
updating the running max/sum/accumulator of the normalizer, and stores out and lse. A
block-sparse kernel (schedule.keys == "block_mask") walks instead the key blocks a block mask lists
for its (b, h, query block): partial blocks masked, full blocks without the mask. Key-dependent
loads ("key", "tile") happen inside the key loop. Expressions are sympy over qk, b, h, m, n, M,
N, scale and the load symbols; tile sizes are symbolic and chosen at launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.ir import KeySegment, Schedule, TensorDecl


@dataclass(frozen=True)
class Load:
    name: str  # the symbol expressions use for the loaded value
    tensor: str
    index: tuple[sympy.Expr, ...]
    level: str  # "program" | "row" | "key" | "tile"

    def __str__(self) -> str:
        return f"{self.name} = load {self.tensor}[{', '.join(map(str, self.index))}]  ({self.level})"


@dataclass(frozen=True)
class Gradient:
    """What the backward kernels evaluate per (row, key) besides the forward's score: `dqk`, the
    score's derivative in q.k, and for each param load its derivative `d score / d load`; `rows`
    are the query segments per key tile [n_lo, n_hi] that the dK/dV kernel walks."""

    dqk: sympy.Expr
    dloads: tuple[tuple[str, sympy.Expr], ...]
    rows: tuple[KeySegment, ...]


@dataclass(frozen=True)
class AttentionKernel:
    name: str
    inputs: tuple[TensorDecl, ...]  # params and inputs, in call order
    loads: tuple[Load, ...]
    score: sympy.Expr
    mask: sympy.Expr | None
    segments: tuple[KeySegment, ...]
    exact_bounds: bool
    schedule: Schedule
    normalizer: str = "softmax"
    grad: Gradient | None = None
    no_backward: str | None = None  # why there is no backward (autodiff's reason)


def format_kernel(k: AttentionKernel) -> str:
    """Deterministic listing of a kernel (the `kernel` stage of `attnc show`)."""
    lines = [f"kernel {k.name}",
             f"  {k.schedule}",
             f"  inputs: {', '.join(str(d) for d in k.inputs) or 'none'}"]
    for level in ("program", "row", "key", "tile"):
        for ld in k.loads:
            if ld.level == level:
                lines.append(f"  {ld}")
    lines.append("  for each query tile [m_lo, m_hi]:")
    if k.schedule.keys == "block_mask":
        lines.append("    key blocks: the block mask's partial list (masked), then its full list")
    else:
        for i, seg in enumerate(k.segments):
            lines.append(f"    segment {i}: {seg}")
    lines.append(f"    per key tile: s = {k.score}")
    lines.append(f"    masked tiles: s = where({k.mask if k.mask is not None else 'n < N'}, s, -oo)")
    lines.append(f"    normalizer: {k.normalizer} (online: running max, sum, rescaled acc)")
    lines.append("  store out = acc / l (0 when no key is visible), lse = max + log(l) (-oo)")
    if k.grad is not None:
        lines += _format_gradient(k)
    elif k.no_backward is not None:
        lines.append(f"no backward: {k.no_backward}")
    return "\n".join(lines) + "\n"


def _format_gradient(k: AttentionKernel) -> list[str]:
    g = k.grad
    lines = ["backward (p = exp(s - lse), ds = p*(dO.v - delta); delta = rowsum(dO*O) - dlse)",
             f"  per element: dqk = ds * ({g.dqk})"]
    lines += [f"  per element: d {name} = ds * ({deriv})" for name, deriv in g.dloads]
    lines.append("  dq kernel, per query tile: the forward's key tiles; dq += dqk @ k")
    lines.append("  dk/dv kernel, per key tile [n_lo, n_hi] and query head of its group:")
    if k.schedule.keys == "block_mask":
        lines.append("    query blocks: the block mask's transposed lists (partial, then full)")
    else:
        for i, seg in enumerate(g.rows):
            lines.append(f"    segment {i}: {str(seg).replace('keys', 'queries')}")
    lines.append("    dv += p^T @ dO;  dk += dqk^T @ q")
    return lines
