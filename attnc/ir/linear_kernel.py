"""Kernel IR of the linear family: which kernels run a scheduled scan, with which tiles and grid.

`tile_scan` builds a `ScanPlan` from a LinearScan that chunk_scan has scheduled:

  * forward: a recurrent kernel always (one step at a time: any update, and decoding), and a
    chunked kernel when the schedule is chunked and the kernel covers it (`why_not_chunked`
    otherwise); `algorithm` is the default of the two;
  * tiles: BK holds all key features (the next power of two of DK, at least 16); BV splits the
    value features into programs unless an expression sums over j (`whole_values`); BT, the
    steps per chunk, is the compile option `chunk_size`, else 32 (16 for diagonal decays and
    for more than 128 key features);
  * grid: one program per (sequence, head, value tile);
  * backward: the spec-independent chunked core kernels for a chunked scan, a generated
    recurrent backward where sympy derives every step's vector-Jacobian product, else autograd
    through the eager recurrence (`no_vjp` says why).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from attnc.ir.linear import LinearScan, UpdateClass


class Algorithm(enum.Enum):
    CHUNKED = "chunked"
    RECURRENT = "recurrent"


class ScanBackward(enum.Enum):
    CORE = "chunked core kernels"
    RECURRENT = "generated recurrent backward"
    EAGER = "autograd through the eager recurrence"


# Key features above this make a chunk's tiles large ([BT, BK] and [BK, BV] per state, all
# of BK at once): chunks and value tiles then shrink to 16 to fit in shared memory (a Taylor
# feature map of head dim 16 has 273 features).
WIDE_KEYS = 128
CHUNK = 32
SHORT_CHUNK = 16
VALUE_TILE = 64


@dataclass(frozen=True)
class ScanPlan:
    scan: LinearScan
    algorithm: Algorithm
    why_not_chunked: str | None
    chunk_size: int | None  # the compile option; None: CHUNK, or SHORT_CHUNK (see chunk_tile)
    whole_values: bool  # an expression sums over j: one program holds every value feature
    backward: ScanBackward
    no_vjp: str | None = None  # why there is no generated recurrent backward

    @property
    def name(self) -> str:
        return self.scan.name

    @property
    def chunked(self) -> bool:
        return self.why_not_chunked is None

    @property
    def diagonal(self) -> bool:
        """A diagonal decay: its intra-chunk product splits exp(G_t - G_s) as
        exp(G_t) exp(-G_s), which stays in fp32 range only over short chunks."""
        sch = self.scan.schedule
        return sch is not None and any(p.kind is UpdateClass.DIAGONAL_DECAY for p in sch.states)


def verify_plan(plan: ScanPlan) -> None:
    """What a well-formed plan is: a chunked default needs a chunked kernel; the core backward
    needs one too; a chunk size is a power of two from 16 to 128."""
    if plan.algorithm is Algorithm.CHUNKED and not plan.chunked:
        raise AssertionError(f"{plan.name}: chunked by default without a chunked kernel")
    if (plan.backward is ScanBackward.CORE) != plan.chunked:
        raise AssertionError(f"{plan.name}: the core backward serves exactly the chunked scans")
    if (plan.backward is ScanBackward.EAGER) != (plan.no_vjp is not None):
        raise AssertionError(f"{plan.name}: an eager backward must say why")
    if plan.chunk_size not in (None, 16, 32, 64, 128):
        raise AssertionError(f"{plan.name}: chunk size {plan.chunk_size}")


def format_plan(plan: ScanPlan) -> str:
    """The plan as `attnc show SPEC --stage tile_scan` prints it."""
    name = plan.name
    lines = [f"kernels {name}   (one program per (sequence, head, value tile); "
             "states in registers, fp32; products in the inputs' dtype)"]
    if plan.chunked:
        lines.append(f"  forward: {name}_chunked (default): chunks of BT steps, intra-chunk "
                     "masked products and state passing")
    lines.append(f"  forward: {name}_recurrent ("
                 + ("default" if plan.algorithm is Algorithm.RECURRENT else
                    'algorithm="recurrent", decoding') + "): one step at a time")
    if not plan.chunked:
        lines.append(f"    not chunked: {plan.why_not_chunked}")
    lines.append("  grid: (sequences, H, cdiv(DV, BV))")
    lines.append("  tiles: BK = pow2(DK) >= 16; BV = "
                 + ("pow2(DV) (an expression sums over j: one program holds all of DV)"
                    if plan.whole_values else
                    f"min(pow2(DV), {VALUE_TILE}), 16 when BK > {WIDE_KEYS}"))
    if plan.chunked:
        bt = (f"{plan.chunk_size} (compile option chunk_size)" if plan.chunk_size else
              f"{SHORT_CHUNK} (diagonal decay)" if plan.diagonal else
              f"{CHUNK}, {SHORT_CHUNK} when BK > {WIDE_KEYS}")
        lines.append(f"  chunk: BT = {bt}")
        assert plan.scan.schedule is not None
        for p in plan.scan.schedule.states:
            form = (" (WY/UT form: 16 x 16 diagonal blocks of the inverse by forward "
                    "substitution, combined by products)") if p.kind.delta else ""
            lines.append(f"    state {p.state}: {p.kind.value}{form}")
    if plan.backward is ScanBackward.CORE:
        lines.append("  backward: core_forward, core_backward per state (spec-independent, grid "
                     "(sequences, H, cdiv(DV, BV)));\n"
                     "    the elementwise prologue and epilogue by torch autograd")
    elif plan.backward is ScanBackward.RECURRENT:
        lines.append(f"  backward: {name}_recurrent_bwd: one program per (sequence, head) with "
                     "all of DK x DV; states stored every 64 steps, replayed, walked in reverse")
    else:
        lines.append(f"  backward: {plan.backward.value} (checkpointed): {plan.no_vjp}")
    return "\n".join(lines) + "\n"
