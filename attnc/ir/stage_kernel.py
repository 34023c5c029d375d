"""Kernel IR of a general cascade: one `StageKernel` per stage of the schedule, in order.

A stage kernel's program owns one tile of its parallel rank P (m or n) of one (b, h) and walks
the tiles of its loop rank L (the other) in the stage's order. Its `nodes` are the cascade's
einsums (and, in a backward, param-gradient ScatterSums) it evaluates, each at the layout its
ranks give: [P] and [P, e|f] values per program (before the loop when they read nothing the
loop produces, after it otherwise), [L], [L, e|f] and [P, L] values per loop tile, reductions
over L as accumulators carried across the loop (a stabilized sum rescaled by its running
max), scans along L as a running carry plus a scan inside the tile. `memory` are the tensors it
reads whole (operands, saved tensors, earlier stages' results: ranks [P] / [L] / [x, e|f]),
`loads` the reads of params and inputs at index expressions, `writes` what it stores. Pairs
the cascade's mask hides are left out of every reduction and scan; `segments` bound the L range
a program visits (mask_bounds' key segments for P = m, its query segments for P = n).

`CascadePlan` holds the forward's stage kernels, the backward's (empty when there is none),
which forward results the backward reads, and the outputs. Everything is frozen and printable.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.ir.cascade import Einsum, KeySegment, ScatterSum, Stage, TensorDecl, TensorKind
from attnc.ir.kernel import Load

StageNode = Einsum | ScatterSum


@dataclass(frozen=True)
class StageKernel:
    index: int
    stage: Stage
    nodes: tuple[StageNode, ...]
    memory: tuple[tuple[str, tuple[str, ...]], ...]  # (tensor, ranks) read whole from memory
    loads: tuple[Load, ...]
    writes: tuple[tuple[str, tuple[str, ...]], ...]  # (tensor, ranks) stored
    mask: sympy.Expr | None
    segments: tuple[KeySegment, ...]
    # the writes only the backward reads: stored when the call needs gradients (constexpr SAVE)
    saves: tuple[str, ...] = ()

    @property
    def parallel(self) -> str:
        return self.stage.parallel

    @property
    def loop(self) -> str | None:
        return self.stage.loop

    def __str__(self) -> str:
        lines = [f"kernel {self.index + 1}: {self.stage}"]
        if self.mask is not None:
            lines.append(f"    visible pairs: {self.mask}")
        for seg in self.segments:
            lines.append(f"    {self.stage.loop} range per {self.stage.parallel} tile: {seg}")
        if self.saves:
            lines.append("    for the backward (when gradients are needed): "
                         + ", ".join(self.saves))
        lines += [f"    {ld}" for ld in self.loads]
        lines += [f"    {nd}".replace("\n", "\n    ") for nd in self.nodes]
        return "\n".join(lines)


@dataclass(frozen=True)
class CascadePlan:
    name: str
    inputs: tuple[TensorDecl, ...]  # params and inputs, in call order
    decls: tuple[TensorDecl, ...]   # every tensor the forward declares (operands included)
    forward: tuple[StageKernel, ...]
    out: str
    lse: str | None
    backward: tuple[StageKernel, ...] = ()
    # the backward cascade's SAVED declarations: (its name, the forward tensor or role it holds:
    # a forward tensor's name, or "dO" / "dLSE" for the incoming gradients)
    saved: tuple[tuple[str, str], ...] = ()
    # the backward's outputs: ("dq" | "dk" | "dv" | "d_<param>", tensor)
    grads: tuple[tuple[str, str], ...] = ()
    backward_decls: tuple[TensorDecl, ...] = ()
    no_backward: str | None = None

    @property
    def has_backward(self) -> bool:
        return bool(self.backward)

    @property
    def loads(self) -> tuple[Load, ...]:
        """Every stage's loads (the call checks their index ranges)."""
        seen: dict[Load, None] = {}
        for sk in self.forward + self.backward:
            seen.update(dict.fromkeys(sk.loads))
        return tuple(seen)


def verify_plan(p: CascadePlan) -> None:
    """A plan's stages read only what is declared or written by an earlier stage of the same
    direction, write what the outputs need, and load only declared params and inputs."""
    declared = {d.name for d in p.inputs}
    for kernels, decls, outs in ((p.forward, p.decls, [p.out] + ([p.lse] if p.lse else [])),
                                 (p.backward, p.backward_decls, [t for _, t in p.grads])):
        if not kernels:
            continue
        done = {d.name for d in decls}
        for sk in kernels:
            for name, _ in sk.memory:
                if name not in done:
                    raise AssertionError(f"{p.name}: kernel {sk.index + 1} reads {name} before "
                                         "it is written")
            for ld in sk.loads:
                if ld.tensor not in declared:
                    raise AssertionError(f"{p.name}: kernel {sk.index + 1} loads {ld.tensor}, "
                                         "which is no param or input")
            for name, ranks in sk.writes:
                if set(ranks) >= {"m", "n"}:
                    raise AssertionError(f"{p.name}: kernel {sk.index + 1} stores the [m, n] "
                                         f"tensor {name}")
            done |= {name for name, _ in sk.writes}
            done |= {nd.name for nd in sk.nodes if isinstance(nd, ScatterSum)}
        missing = [t for t in outs if t not in done]
        if missing:
            raise AssertionError(f"{p.name}: no kernel writes {missing[0]}")
    if any(d.kind not in (TensorKind.PARAM, TensorKind.INPUT) for d in p.inputs):
        raise AssertionError(f"{p.name}: a plan's inputs are params and inputs")


def format_plan(p: CascadePlan) -> str:
    lines = [f"plan {p.name}: {len(p.forward)} forward kernel(s)"
             + (f", {len(p.backward)} backward kernel(s)" if p.backward else ""),
             f"  inputs: {', '.join(str(d) for d in p.inputs) or 'none'}",
             f"  outputs: out={p.out}" + (f", lse={p.lse}" if p.lse else "")]
    lines += ["  " + str(sk).replace("\n", "\n  ") for sk in p.forward]
    if p.backward:
        lines.append("backward (saved: " + ", ".join(f"{n} = {w}" for n, w in p.saved) + ")")
        lines += ["  " + str(sk).replace("\n", "\n  ") for sk in p.backward]
        lines.append("  gradients: " + ", ".join(f"{r}={t}" for r, t in p.grads))
    elif p.no_backward is not None:
        lines.append(f"no backward: {p.no_backward}")
    return "\n".join(lines) + "\n"
