"""The backward of operand prologues (attnc.ir.around: Rope, L2Norm, RowScale) as code
emitters -- `emit_chain` redoes a prologue on a tile keeping each op's input, `emit_vjp` goes
back through it and writes the row values' adjoints -- and the interface of the backward of a
kernel with something around its score (backward_around.py's kernels; row prologues, several
dots, a value alias, a gate, a kv-head map).

INTERFACE (the runtime, attnc/runtime/around.py `AroundFunction.backward`, calls this; stable):

    from attnc.backends.triton.softmax.launch import launch_backward_around
    grads, row_grads = launch_backward_around(
        mod, ir, tensors, extras, rows, kv_map, out, lse, dout, dlse, scale, config,
        on_partial=None, block_lists=(), q_lists=(), block_sizes=None)

  * `tensors`: dict name -> tensor: "q", "k", "v" (absent when `ir.around.value != "v"`: the
    value then IS that key-side operand) and every declared operand (`ir.around.operands`);
    query-side ones [B, Hq, M, Dx], key-side ones [B, Hkv, N, Dx], all of q's dtype, any strides
    with a unit last stride not required (strides are passed).
  * `extras`: the spec's params and inputs by name (as for `launch_backward`).
  * `rows`: dict RowValue.key -> fp32 tensor, for every `attnc.ir.around.row_values(ir.around)`:
    POSITION / FACTOR / GATE [B, H_side, rows] (H_side = Hq and rows = M on the query side, Hkv
    and N on the key side), GAIN [B, H_side, D_operand]; broadcast (expanded, stride-0) views are
    fine. The values the forward used (evaluated once per call, shared by forward and backward).
  * `kv_map`: when `ir.around.kv_head` is not None, the integer tensor [B, Hq] (any integer
    dtype; a [Hq] map expanded over b is fine) of the kv head each query head reads, already
    checked in range [0, Hkv); else None (h // (Hq / Hkv)). The launcher builds the inverse
    itself: int32 HEADS [B, Hq] (the query heads sorted by the kv head they read), HSTART and
    HCOUNT [B, Hkv] (where each kv head's run starts in HEADS, and its length).
  * `out`: the UNGATED output (the forward's normalized output BEFORE `out *= gate`) when the
    spec has a gate; else the output. `lse`: the forward's lse (of the ungated softmax), as
    today. `dout`, `dlse`: gradients of the gated output and of the lse (dlse may be None).
  * `config`, `on_partial`, `block_lists`, `q_lists`, `block_sizes`: as for `launch_backward`
    (score params read by loads keep their partial-sum buffers and `on_partial(load name,
    buffer, first row)` callbacks; a block-sparse kernel takes its block mask's key lists,
    its query lists and its (query, key) block sizes).
  * returns `grads`: dict name -> gradient for every key of `tensors` (same shape and dtype; the
    value alias's gradient is already summed into its operand's), and `row_grads`: dict
    RowValue.key -> fp32 adjoint of every FACTOR, GAIN and GATE row value, each of the FULL
    (unexpanded) shape [B, H_side, rows] / [B, H_side, D]; positions get none. The runtime
    chains `row_grads` into the params with torch autograd (e.g. `torch.autograd.backward(
    [row values evaluated with grad], [row_grads])`). Gains' partial sums are reduced here
    in a fixed order (no float atomics): gradients stay bitwise reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnc.backends.triton.softmax import prologue as P
from attnc.backends.triton.source import CodeBuilder
from attnc.ir.around import Around, L2Norm, Rope, RowKind, RowScale, RowValue, row_values


def adjoint_name(rv: RowValue) -> str:
    """The generated name of a row value's adjoint buffer (bound as Bind("row_adjoint", key))."""
    return f"d_rv_{rv.key}"


def has_adjoint(rv: RowValue) -> bool:
    """Factors, gains and the gate get adjoints; positions none."""
    return rv.kind is not RowKind.POSITION


@dataclass(frozen=True)
class Slots:
    """Where a program writes its row values' adjoints: `heads` heads per batch on its side,
    `extent` rows per head; a gain's partial sums go to slot `slot` of `slots` per (b, head)
    (the program's tile index along its rows)."""

    heads: str
    extent: str
    slot: str
    slots: str


def emit_chain(c: CodeBuilder, t: P.Tile, a: Around, raw: str, shape: str,
               tag: str) -> list[str]:
    """The prologue of `t.operand` on the raw [rows, features] tile `raw` (not transposed), in
    fp32 op by op, as prologue.emit_tile computes it: returns x_0 (the raw tile in fp32), ...,
    x_n (the transformed tile). A rope's partner features come from the registers (tl.gather
    along the features; `shape` is the tile's shape, e.g. "(BLOCK_M, BLOCK_D)"), which equals
    the forward's second load at the partner columns. The ops' tables (`{tag}_o{i}_*`) stay
    defined for `emit_vjp`, which needs each op's input but not the last op's output: x_n is
    named but not computed."""
    ops = a.prologue(t.operand)
    rvs = {rv.op_index: rv for rv in row_values(a) if rv.operand == t.operand}
    xs = [f"{tag}_x0"]
    c(f"{xs[0]} = {raw}.to(tl.float32)")
    for i, op in enumerate(ops):
        x, y, pre = xs[-1], f"{tag}_x{i + 1}", f"{tag}_o{i}"
        out = None
        if isinstance(op, Rope):
            P.emit_rope_columns(c, t, op, pre)
            P.emit_rope_tables(c, t, op, rvs[i], pre)
            c(f"{pre}_idx = tl.broadcast_to({pre}_partner[None, :], {shape})")
            out = f"{x} * {pre}_cos + tl.gather({x}, {pre}_idx, 1) * {pre}_sin"
        elif isinstance(op, L2Norm):
            c(f"{pre}_inv = 1.0 / tl.sqrt(tl.sum({x} * {x}, 1) + {op.eps!r})")
            out = f"{x} * {pre}_inv[:, None]"
            if op.gain is not None:
                P.emit_gain(c, t, rvs[i], f"{pre}_gain")
                out += f" * {pre}_gain[None, :]"
        else:
            assert isinstance(op, RowScale)
            P.emit_row_value(c, t, rvs[i], f"{pre}_f")
            out = f"{x} * {pre}_f[:, None]"
        if i < len(ops) - 1:
            c(f"{y} = {out}")
        xs.append(y)
    return xs


def emit_vjp(c: CodeBuilder, t: P.Tile, a: Around, xs: list[str], dy: str, where: Slots,
             tag: str) -> str:
    """Back through the prologue of `t.operand` (`xs` from `emit_chain`): from dy, the adjoint
    of the transformed tile (fp32), to the raw tile's; returns its name. A rope's transpose is
    the rotation by -angle; an l2norm's is (u - n (n . u)) / |x| with u = dy * gain; a row
    factor's dy * f. Stores each row value's adjoint: a factor's per row (sum_d dy * x, at [b,
    head, row] of its buffer), a gain's as this program's partial sum over its rows (sum_rows
    dy * x / |x|, at [b, head, slot, d]), which the launcher reduces in a fixed order."""
    ops = a.prologue(t.operand)
    rvs = {rv.op_index: rv for rv in row_values(a) if rv.operand == t.operand}
    bh = f"(b.to(tl.int64) * {where.heads} + {t.head})"
    for i in range(len(ops) - 1, -1, -1):
        op, x, pre, dx = ops[i], xs[i], f"{tag}_o{i}", f"{tag}_d{i}"
        if isinstance(op, Rope):
            c(f"{dx} = {dy} * {pre}_cos - tl.gather({dy}, {pre}_idx, 1) * {pre}_sin")
        elif isinstance(op, L2Norm):
            u = dy
            if op.gain is not None:
                c(f"tl.store({adjoint_name(rvs[i])} + ({bh} * {where.slots} + {where.slot}) * "
                  f"{t.n_feats} + {t.feats}, tl.sum({dy} * {x} * {pre}_inv[:, None], 0), "
                  f"mask={t.feats} < {t.n_feats})")
                u = f"{pre}_u"
                c(f"{u} = {dy} * {pre}_gain[None, :]")
            c(f"{dx} = {u} * {pre}_inv[:, None] - {x} * (tl.sum({u} * {x}, 1) * {pre}_inv * "
              f"{pre}_inv * {pre}_inv)[:, None]")
        else:
            c(f"tl.store({adjoint_name(rvs[i])} + {bh} * {where.extent} + {t.rows}, "
              f"tl.sum({dy} * {x}, 1), mask={t.rows} < {where.extent})")
            c(f"{dx} = {dy} * {pre}_f[:, None]")
        dy = dx
    return dy
