"""Code emitters for the tiles of a kernel with something around its score (attnc.ir.around):
operand tiles loaded with their bounds and transformed by their prologues as they load. The
softmax forward (forward.py) and backward (backward.py, prologue_vjp.py) both use them.

Spelling (every generated name derived from a spec's operand goes through `spell`, the
KernelNames' UserNames, so it never collides with attnc's own names):

* q, k, v keep the forward's names: pointers Q, K, V, strides stride_q{b,h,m,d} (stride_k..,
  stride_v..), head dims D (q, k) and DV (v), tile widths BLOCK_D / BLOCK_DV, feature offsets
  offs_d / offs_dv.
* A declared operand x (spelled X): pointer `X` (the call's dtype), strides `X_s0..X_s3`
  ([B, H_side, rows, Dx]), head dim `D_X`, tile width constexpr `BLOCK_D_X`, feature offsets
  `offs_X` (= tl.arange(0, BLOCK_D_X)), base pointer of the program's (b, head) `X_base`.
  Contract binds: Bind("operand", x), Bind("operand_stride", x, i), Bind("operand_dim", x),
  Bind("operand_block", x) (`operand_params`).
* A row value (attnc.ir.around.row_values; key K): fp32 pointer `rv_K`, strides `rv_K_s0..2`
  ([B, H_side, rows] or, for a GAIN, [B, H_side, D_operand]); binds Bind("row", K) and
  Bind("row_stride", K, i) (`row_value_params`).
* The kv-head map: int32 pointer `KV_MAP` [B, Hq] with strides `kvm_sb`, `kvm_sh`; binds
  Bind("KV_MAP"), Bind("kvm_sb"), Bind("kvm_sh") (`kv_map_params`); the program reads
  `kvh = tl.load(KV_MAP + b * kvm_sb + h * kvm_sh)` (forward.query_tile_prologue(kv_map=True)).

Prologue semantics on a tile (attnc.ir.around: Rope, L2Norm, RowScale), computed in fp32 and
rounded to the operand's dtype after the last op: the ops of `Around.prologue(operand)` in order.
A rope needs each feature's partner (j + R/2 or j - R/2 for half pairs, j ^ 1 for interleaved);
registers cannot be permuted along the feature axis, so the tile is loaded a second time at the
partner columns (`xp`, from L1/L2) and the ops before the rope are applied to it too (a gain at
the partner's column; row norms and row factors are the same for both). One rope per operand
(a second would need the partners' partners): refused by `check_prologues` at generation time.
The value tile is the operand `Around.value` names with that operand's prologue.

Gate (agreed with H2b, see prologue_vjp.py): the forward multiplies its stored `Out` by the gate
when the constexpr GATED is set (the launcher clears it for key-split launches and applies the
gate after merging the splits); with SAVE it also stores the UNGATED output to `OutU` (same
layout and strides as Out), which the runtime passes to the backward as `out`
(d gate = rowsum(dO · out_ungated) and dO_ungated = dO · gate are the backward's). With SKIP (set
by the runtime only when no gradient is due and the lse is not returned) a query tile whose
gates are all 0 skips its key loop: its out is 0 and its lse -inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from attnc.backends.triton.contract import Bind, Param, ParamType, arg
from attnc.backends.triton.source import CodeBuilder
from attnc.errors import CompileError
from attnc.ir.around import BASE_OPERANDS, Around, L2Norm, Rope, RopeStyle, RowKind, RowScale, \
    RowValue, Side, row_values

Spell = Callable[[str], str]
INT = ParamType.INT


# --- names -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OperandNames:
    """How generated code spells one operand's tensor (see the module docstring)."""

    pointer: str
    strides: tuple[str, ...]  # b, head, row, feature
    dim: str
    block: str
    offs: str
    base: str


def operand_names(name: str, spell: Spell) -> OperandNames:
    if name in BASE_OPERANDS:
        rows = "m" if name == "q" else "n"
        return OperandNames(name.upper(), tuple(f"stride_{name}{r}" for r in f"bh{rows}d"),
                            "DV" if name == "v" else "D", "BLOCK_DV" if name == "v" else "BLOCK_D",
                            "offs_dv" if name == "v" else "offs_d", f"{name}_base")
    x = spell(name)
    return OperandNames(x, tuple(f"{x}_s{i}" for i in range(4)), f"D_{x}", f"BLOCK_D_{x}",
                        f"offs_{x}", f"{x}_base")


def row_value_name(rv: RowValue) -> str:
    return f"rv_{rv.key}"


def row_value_strides(rv: RowValue) -> list[str]:
    return [f"rv_{rv.key}_s{i}" for i in range(3)]


def operand_params(a: Around, spell: Spell) -> tuple[list[Param], list[Param]]:
    """(runtime params, constexprs) of the declared operands: pointer, four strides, head dim;
    the tile width BLOCK_D_<x>."""
    params, blocks = [], []
    for o in a.operands:
        n = operand_names(o.name, spell)
        params.append(Param(n.pointer, ParamType.DATA, Bind("operand", o.name)))
        params += [Param(s, INT, Bind("operand_stride", o.name, i))
                   for i, s in enumerate(n.strides)]
        params.append(Param(n.dim, INT, Bind("operand_dim", o.name)))
        blocks.append(Param(n.block, ParamType.CONSTEXPR, Bind("operand_block", o.name)))
    return params, blocks


def row_value_params(a: Around, keys: set[str] | None = None) -> list[Param]:
    """Pointer and three strides of each row value (of those in `keys` when given)."""
    out = []
    for rv in row_values(a):
        if keys is None or rv.key in keys:
            out.append(Param(row_value_name(rv), ParamType.FP32_PTR, Bind("row", rv.key)))
            out += [Param(s, INT, Bind("row_stride", rv.key, i))
                    for i, s in enumerate(row_value_strides(rv))]
    return out


def kv_map_params() -> list[Param]:
    return [arg("KV_MAP", ParamType.I32_PTR), arg("kvm_sb", INT), arg("kvm_sh", INT)]


def side_row_values(a: Around, side: Side) -> list[RowValue]:
    """The row values of the prologues of `side`'s operands (not the gate)."""
    return [rv for rv in row_values(a) if rv.side is side and rv.kind is not RowKind.GATE]


def row_value_args(rvs: list[RowValue]) -> list[str]:
    """Pointer and strides of `rvs`, as a step function's argument names."""
    return [x for rv in rvs for x in [row_value_name(rv)] + row_value_strides(rv)]


def check_prologues(a: Around, where: str) -> None:
    """Refuse what the emitters cannot generate: two ropes on one operand, a value alias with
    a prologue of `v` (the value is then another operand)."""
    for p in a.prologues:
        if sum(isinstance(op, Rope) for op in p.ops) > 1:
            raise CompileError(f"{where}: {p.operand} has two ropes; a fused kernel applies one "
                               "rope per operand", tensor=p.operand,
                               hint="combine the rotations into one rope, or apply the second "
                                    "in torch before the call")
    if a.value != "v" and a.prologue("v"):
        raise CompileError(f"{where}: v has a prologue but the value is {a.value}",
                           tensor="v", hint=f"put the prologue on {a.value}")


# --- tiles -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """One operand tile as generated code addresses it.

    `base`: the (b, head) base pointer expression; `rows` / `feats`: 1-D row and feature
    offsets; `n_rows`: the row bound to check (None: the rows are in range, no row mask);
    `n_feats`: the feature bound (always checked: tiles are padded to a power of two);
    `transposed`: the tile is [features, rows] (a key tile dotted as q @ kt), else [rows,
    features]; `b`, `head`: the batch and head expressions the row values of this side are read
    at ("h" on the query side, "kvh" on the key side)."""

    operand: str
    base: str
    rows: str
    row_stride: str
    feats: str
    feat_stride: str
    n_feats: str
    n_rows: str | None
    transposed: bool
    head: str
    b: str = "b"

    def rows2(self) -> str:
        return f"{self.rows}[None, :]" if self.transposed else f"{self.rows}[:, None]"

    def feats2(self, feats: str | None = None) -> str:
        f = feats or self.feats
        return f"{f}[:, None]" if self.transposed else f"{f}[None, :]"

    def row_vector(self, x: str) -> str:
        """A per-row vector broadcast against the tile."""
        return f"{x}[None, :]" if self.transposed else f"{x}[:, None]"

    def feat_vector(self, x: str) -> str:
        return f"{x}[:, None]" if self.transposed else f"{x}[None, :]"

    @property
    def feat_axis(self) -> int:
        return 0 if self.transposed else 1


def emit_load(c: CodeBuilder, t: Tile, dst: str, feats: str | None = None) -> None:
    """dst = the raw tile (operand dtype), features at `feats` (default t.feats; a rope's
    partner columns), zero outside the bounds."""
    f = feats or t.feats
    ptrs = f"{t.base} + {t.rows2()} * {t.row_stride} + {t.feats2(f)} * {t.feat_stride}"
    mask = f"{t.feats2(f)} < {t.n_feats}"
    if t.n_rows is not None:
        mask = f"({t.rows2()} < {t.n_rows}) & ({mask})"
    c(f"{dst} = tl.load({ptrs}, mask={mask}, other=0.0)")


def emit_row_value(c: CodeBuilder, t: Tile, rv: RowValue, dst: str) -> None:
    """dst = the row value `rv` at the tile's rows ([rows] fp32; 0 past the row bound)."""
    s0, s1, s2 = row_value_strides(rv)
    mask = "" if t.n_rows is None else f", mask={t.rows} < {t.n_rows}, other=0.0"
    c(f"{dst} = tl.load({row_value_name(rv)} + {t.b} * {s0} + {t.head} * {s1} + {t.rows} * "
      f"{s2}{mask})")


def emit_gain(c: CodeBuilder, t: Tile, rv: RowValue, dst: str, feats: str | None = None) -> None:
    """dst = the gain vector `rv` at the tile's features ([features] fp32, 0 past D)."""
    s0, s1, s2 = row_value_strides(rv)
    f = feats or t.feats
    c(f"{dst} = tl.load({row_value_name(rv)} + {t.b} * {s0} + {t.head} * {s1} + {f} * {s2}, "
      f"mask={f} < {t.n_feats}, other=0.0)")


def rope_dims(op: Rope, t: Tile) -> str:
    """The rotated features' count R as generated code spells it (the operand's head dim when
    the rope names none)."""
    return str(op.dims) if op.dims is not None else t.n_feats


def emit_rope_columns(c: CodeBuilder, t: Tile, op: Rope, pre: str) -> None:
    """Per-feature rope tables of a tile's features, named `{pre}_*`: `_rot` (the feature is
    rotated), `_partner` (its pair's other feature; itself when not rotated), `_sgn` (-1 for the
    pair's first feature, +1 for its second) and `_inv` (theta^(-2i/R), i the pair's index)."""
    j, R = t.feats, rope_dims(op, t)
    c(f"{pre}_rot = {j} < {R}")
    if op.style is RopeStyle.HALF:
        c(f"{pre}_first = {j} < {R} // 2")
        c(f"{pre}_pair = tl.where({pre}_first, {j}, {j} - {R} // 2)")
        c(f"{pre}_partner = tl.where({pre}_rot, tl.where({pre}_first, {j} + {R} // 2, "
          f"{j} - {R} // 2), {j})")
        c(f"{pre}_sgn = tl.where({pre}_first, -1.0, 1.0)")
    else:
        c(f"{pre}_pair = {j} // 2")
        c(f"{pre}_partner = tl.where({pre}_rot, {j} ^ 1, {j})")
        c(f"{pre}_sgn = tl.where({j} % 2 == 0, -1.0, 1.0)")
    scale = -2.0 * math.log2(op.theta)
    c(f"{pre}_inv = tl.exp2({pre}_pair.to(tl.float32) * ({scale!r} / {R}))")


# cos and sin of a tile's angles. libdevice's sinf/cosf carry a slow path for huge arguments
# (Payne-Hanek reduction through local memory) that every key tile would pay for in registers
# and local memory; the angle is reduced to [-pi, pi] here instead (in fp32, as the angle itself
# is computed, in two steps so that |angle| < 1e5 loses nothing) and Taylor polynomials to
# degree 17 / 18 give sin and cos there (measured: within 1.5e-6 of float64 for |angle| < 1e5).
ROPE_HELPER = """@triton.jit
def _rope_cos_sin(angle):
    \"\"\"cos and sin of fp32 angles: reduced to [-pi, pi], then Taylor polynomials.\"\"\"
    # 2 pi = 6.28125 + 0.00193530717958647..: k * 6.28125 is exact for |angle| < 1e5
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = (angle - k * 6.28125) - k * 0.0019353071795864769
    r2 = r * r
    s = -1.0 / 355687428096000.0
    s = s * r2 + 1.0 / 1307674368000.0
    s = s * r2 - 1.0 / 6227020800.0
    s = s * r2 + 1.0 / 39916800.0
    s = s * r2 - 1.0 / 362880.0
    s = s * r2 + 1.0 / 5040.0
    s = s * r2 - 1.0 / 120.0
    s = s * r2 + 1.0 / 6.0
    s = r - r * r2 * s
    c = 1.0 / 6402373705728000.0
    c = c * r2 - 1.0 / 20922789888000.0
    c = c * r2 + 1.0 / 87178291200.0
    c = c * r2 - 1.0 / 479001600.0
    c = c * r2 + 1.0 / 3628800.0
    c = c * r2 - 1.0 / 40320.0
    c = c * r2 + 1.0 / 720.0
    c = c * r2 - 1.0 / 24.0
    c = c * r2 + 0.5
    c = 1.0 - r2 * c
    return c, s
"""


def helpers(a: Around) -> tuple[str, ...]:
    """The functions a module whose kernels use these emitters needs (module_head's `extra`)."""
    ropes = any(isinstance(op, Rope) for p in a.prologues for op in p.ops)
    return (ROPE_HELPER,) if ropes else ()


def emit_rope_tables(c: CodeBuilder, t: Tile, op: Rope, rv: RowValue, pre: str) -> None:
    """`{pre}_cos`, `{pre}_sin` (the latter times the pair sign) over the tile, from the
    position row value `rv`: x' = x * cos + x[partner] * sin. Features past R keep cos 1,
    sin 0."""
    emit_row_value(c, t, rv, f"{pre}_pos")
    c(f"{pre}_ang = {t.row_vector(pre + '_pos')} * {t.feat_vector(pre + '_inv')}")
    rot = t.feat_vector(f"{pre}_rot")
    c(f"{pre}_cos, {pre}_sin = _rope_cos_sin({pre}_ang)")
    c(f"{pre}_cos = tl.where({rot}, {pre}_cos, 1.0)")
    c(f"{pre}_sin = tl.where({rot}, {pre}_sin, 0.0) * {t.feat_vector(pre + '_sgn')}")


def emit_tile(c: CodeBuilder, t: Tile, dst: str, a: Around, dtype: str | None = None) -> None:
    """dst = the operand tile with its prologue applied (fp32 math, then rounded to `dtype`, a
    Triton dtype expression, by default the operand's own); without a prologue, the raw load.
    Locals are named `{dst}_*`. Needs `UPCAST` in scope (the _round helper's flag)."""
    ops = a.prologue(t.operand)
    if not ops:
        emit_load(c, t, dst)
        return
    rvs = {rv.op_index: rv for rv in row_values(a) if rv.operand == t.operand}
    rope = next(((i, op) for i, op in enumerate(ops) if isinstance(op, Rope)), None)
    emit_load(c, t, f"{dst}_raw")
    dtype = dtype or f"{dst}_raw.dtype"
    c(f"{dst} = {dst}_raw.to(tl.float32)")
    partner = None
    if rope is not None:
        emit_rope_columns(c, t, rope[1], f"{dst}_r")
        partner = f"{dst}_p"
        emit_load(c, t, partner, f"{dst}_r_partner")
        c(f"{partner} = {partner}.to(tl.float32)")
    for i, op in enumerate(ops):
        live = partner is not None and rope is not None and i < rope[0]
        if isinstance(op, Rope):
            assert partner is not None
            emit_rope_tables(c, t, op, rvs[i], f"{dst}_r")
            c(f"{dst} = {dst} * {dst}_r_cos + {partner} * {dst}_r_sin")
        elif isinstance(op, L2Norm):
            c(f"{dst}_rn{i} = 1.0 / tl.sqrt(tl.sum({dst} * {dst}, {t.feat_axis}) + {op.eps!r})")
            c(f"{dst} = {dst} * {t.row_vector(f'{dst}_rn{i}')}")
            if live:
                c(f"{partner} = {partner} * {t.row_vector(f'{dst}_rn{i}')}")
            if op.gain is not None:
                emit_gain(c, t, rvs[i], f"{dst}_g{i}")
                c(f"{dst} = {dst} * {t.feat_vector(f'{dst}_g{i}')}")
                if live:
                    emit_gain(c, t, rvs[i], f"{dst}_gp{i}", f"{dst}_r_partner")
                    c(f"{partner} = {partner} * {t.feat_vector(f'{dst}_gp{i}')}")
        else:
            assert isinstance(op, RowScale)
            emit_row_value(c, t, rvs[i], f"{dst}_f{i}")
            c(f"{dst} = {dst} * {t.row_vector(f'{dst}_f{i}')}")
            if live:
                c(f"{partner} = {partner} * {t.row_vector(f'{dst}_f{i}')}")
    c(f"{dst} = _round({dst}, {dtype}, UPCAST)")


def query_tile(name: str, spell: Spell, n_rows: str | None = "M") -> Tile:
    """The [BLOCK_M, D_x] tile of a query-side operand at the program's rows (offs_m), its base
    pointer `<base>` set up by `emit_query_base`."""
    n = operand_names(name, spell)
    return Tile(name, n.base, "offs_m", n.strides[2], n.offs, n.strides[3], n.dim, n_rows,
                False, "h")


def key_tile(name: str, spell: Spell, transposed: bool, n_rows: str | None = "N",
             rows: str = "offs_n") -> Tile:
    """A key-side operand's tile at the key offsets `rows`: transposed [D_x, BLOCK_N] (dotted
    as q @ kt) or [BLOCK_N, D_x] (the value)."""
    n = operand_names(name, spell)
    return Tile(name, n.base, rows, n.strides[2], n.offs, n.strides[3], n.dim, n_rows,
                transposed, "kvh")


def emit_base(c: CodeBuilder, name: str, side: Side, spell: Spell) -> None:
    """`<x>_base` = the operand's pointer at the program's (b, head): h on the query side,
    kvh on the key side."""
    n = operand_names(name, spell)
    head = "h" if side is Side.QUERY else "kvh"
    c(f"{n.base} = {n.pointer} + b.to(tl.int64) * {n.strides[0]} + {head} * {n.strides[1]}")


def emit_offsets(c: CodeBuilder, names: list[str], spell: Spell) -> None:
    """offs_<x> = tl.arange(0, BLOCK_D_<x>) of each declared operand in `names`."""
    for name in names:
        if name not in BASE_OPERANDS:
            n = operand_names(name, spell)
            c(f"{n.offs} = tl.arange(0, {n.block})")
