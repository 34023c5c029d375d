"""Kernel IR: one fused attention kernel, backend-neutral.

A program owns one query tile (BLOCK_M rows) of one (b, h). It loads its q tile, then the `loads`
that depend only on (b, h) (PROGRAM) or on the row (ROW), walks the key tiles of each
`segments` entry (masked tiles, then full tiles without evaluating the mask, then masked tiles),
updating the running max/sum/accumulator of the normalizer, and stores out and lse. A
block-sparse kernel (schedule.keys is BLOCK_MASK) walks instead the key blocks a block mask lists
for its (b, h, query block): partial blocks masked, full blocks without the mask. Key-dependent
loads (KEY, TILE) happen inside the key loop. Expressions are sympy over qk, b, h, m, n, M, N,
scale and the load symbols; tile sizes are symbolic and chosen at launch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy

from attnc.expr import symbols as S
from attnc.ir.around import Around, verify_around
from attnc.ir.cascade import KeySegment, KeySource, Normalizer, TensorDecl, TensorKind, TileSchedule


class LoadLevel(enum.Enum):
    """The outermost loop level a load's index allows."""

    PROGRAM = "program"  # depends on (b, h) only
    ROW = "row"          # on the query row m
    KEY = "key"          # on the key n
    TILE = "tile"        # on both: one value per (row, key)

    @staticmethod
    def of(index: tuple[sympy.Expr, ...]) -> LoadLevel:
        free = set().union(*(sympy.sympify(i).free_symbols for i in index)) if index else set()
        return {(False, False): LoadLevel.PROGRAM, (True, False): LoadLevel.ROW,
                (False, True): LoadLevel.KEY, (True, True): LoadLevel.TILE}[
            (S.m in free, S.n in free)]


@dataclass(frozen=True)
class Load:
    """The `ordinal`-th distinct read of `tensor` at `index`; expressions read its value as the
    symbol `name`."""

    tensor: str
    ordinal: int
    index: tuple[sympy.Expr, ...]
    level: LoadLevel

    @property
    def name(self) -> str:
        return f"{self.tensor}_{self.ordinal}"

    @property
    def symbol(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, real=True)

    def __str__(self) -> str:
        return (f"{self.name} = load {self.tensor}[{', '.join(map(str, self.index))}]  "
                f"({self.level.value})")


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
    schedule: TileSchedule
    normalizer: Normalizer = Normalizer.SOFTMAX
    grad: Gradient | None = None
    no_backward: str | None = None  # why there is no backward (autodiff's reason)
    # operands, prologues, gate, head map, gather, mixing (attnc/ir/around.py), in the spec's
    # accesses: the runtime evaluates its expressions into row vectors the kernels read
    around: Around = Around()

    @property
    def block_sparse(self) -> bool:
        return self.schedule.keys is KeySource.BLOCK_MASK

    def load(self, name: str) -> Load:
        return next(ld for ld in self.loads if ld.name == name)


def verify_kernel(k: AttentionKernel) -> None:
    """What a well-formed kernel is (checked after the pass that builds it): loads read declared
    params and inputs with one index per dimension and have distinct names; the score and mask
    read only q.k, positions, sizes, scale and loads; the derivatives name existing loads."""
    decls = {d.name: d for d in k.inputs}
    verify_around(k.around, k.name)
    if any(d.kind not in (TensorKind.PARAM, TensorKind.INPUT) for d in k.inputs):
        raise AssertionError(f"{k.name}: a kernel's inputs are params and inputs")
    names = [ld.name for ld in k.loads]
    if len(set(names)) != len(names):
        raise AssertionError(f"{k.name}: two loads share a name")
    for ld in k.loads:
        if ld.tensor not in decls or len(ld.index) != len(decls[ld.tensor].dims):
            raise AssertionError(f"{k.name}: load {ld} does not match a declared tensor")
        if ld.level is not LoadLevel.of(ld.index):
            raise AssertionError(f"{k.name}: load {ld} is placed at the wrong level")
    allowed = {S.qk, S.b, S.h, S.m, S.n, S.B, S.H, S.M, S.N, S.scale} | {ld.symbol
                                                                         for ld in k.loads}
    exprs = [k.score] + ([k.mask] if k.mask is not None else [])
    for ex in k.around.exprs():
        if any(str(acc.base) not in decls for acc in sympy.sympify(ex).atoms(sympy.Indexed)):
            raise AssertionError(f"{k.name}: {ex} reads a tensor the kernel does not take")
    if k.grad is not None:
        exprs += [k.grad.dqk] + [d for _, d in k.grad.dloads]
        if any(name not in names for name, _ in k.grad.dloads):
            raise AssertionError(f"{k.name}: a derivative names no load")
    for ex in exprs:
        stray = sympy.sympify(ex).free_symbols - allowed
        if stray or sympy.sympify(ex).atoms(sympy.Indexed):
            raise AssertionError(f"{k.name}: {ex} reads {sorted(map(str, stray)) or 'a tensor'}")
    if k.mask is not None and k.mask.has(S.qk):
        raise AssertionError(f"{k.name}: the mask reads q.k")
    if not k.block_sparse and not k.segments:
        raise AssertionError(f"{k.name}: no key segments")


def format_kernel(k: AttentionKernel) -> str:
    """Deterministic listing of a kernel (the `fuse` stage of `attnc show`)."""
    lines = [f"kernel {k.name}",
             f"  {k.schedule}",
             f"  inputs: {', '.join(str(d) for d in k.inputs) or 'none'}"]
    lines += [f"  {line}" for line in k.around.lines()]
    for level in LoadLevel:
        for ld in k.loads:
            if ld.level is level:
                lines.append(f"  {ld}")
    lines.append("  for each query tile [m_lo, m_hi]:")
    if k.block_sparse:
        lines.append("    key blocks: the block mask's partial list (masked), then its full list")
    else:
        for i, seg in enumerate(k.segments):
            lines.append(f"    segment {i}: {seg}")
    lines.append(f"    per key tile: s = {k.score}")
    mask = k.mask if k.mask is not None else "n < N"
    lines.append(f"    masked tiles: s = where({mask}, s, -oo)")
    lines.append(f"    normalizer: {k.normalizer.value} (online: running max, sum, rescaled acc)")
    lines.append("  store out = acc / l (0 when no key is visible), lse = max + log(l) (-oo)")
    if k.grad is not None:
        lines += _format_gradient(k, k.grad)
    elif k.no_backward is not None:
        lines.append(f"no backward: {k.no_backward}")
    return "\n".join(lines) + "\n"


def _format_gradient(k: AttentionKernel, g: Gradient) -> list[str]:
    lines = ["backward (p = exp(s - lse), ds = p*(dO.v - delta); delta = rowsum(dO*O) - dlse)",
             f"  per element: dqk = ds * ({g.dqk})"]
    lines += [f"  per element: d {name} = ds * ({deriv})" for name, deriv in g.dloads]
    lines.append("  dq kernel, per query tile: the forward's key tiles; dq += dqk @ k")
    lines.append("  dk/dv kernel, per key tile [n_lo, n_hi] and query head of its group:")
    if k.block_sparse:
        lines.append("    query blocks: the block mask's transposed lists (partial, then full)")
    else:
        for i, seg in enumerate(g.rows):
            lines.append(f"    segment {i}: {str(seg).replace('keys', 'queries')}")
    lines.append("    dv += p^T @ dO;  dk += dqk^T @ q")
    return lines
