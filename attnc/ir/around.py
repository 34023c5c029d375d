"""What an attention block says around its score: operands, prologues, epilogue, head map, gather.

An `attention` block computes out[b, h, m] = Σₙ w(s(b, h, m, n)) · v'[n]; this module's `Around`
holds everything that feeds that formula besides the score and mask expressions themselves:

* **Operands** (`OperandDecl`): besides q, k and v, per-row tensors a score may dot. A QUERY one
  is laid out like q, [B, Hq, M, D_x]; a KEY one like k, [B, Hkv, N, D_x] (its own head dim).
* **Dots** (`DotTerm`): the score reads one dot-product value qk = Σ_t weight_t · dot(x_t, y_t)
  over its terms (`dot(q, k) + dot(qr, kr)` is two terms of weight 1); weights are numbers.
* **Value** (`value`): the tensor the weights average, "v" or a KEY operand (MLA's latent) or
  "k" itself; when it is not "v" the call takes no v.
* **Prologues** (`Prologue`): per operand, ops applied in order to each row as its tile loads:
  `Rope` (rotation by position · θ^(-2i/dims) on the first `dims` features, half-split or
  interleaved pairs), `L2Norm` (x / sqrt(Σ x² + eps) times an optional gain indexed by the
  feature `d`), `RowScale` (x times one value per row: per-query temperature, per-key value
  scale). The score dots the transformed rows; gradients flow back through each op.
* **Gate** (`gate`): out[b, h, m] *= gate, an expression of b, h, m, params and inputs.
* **Head map** (`kv_head`): the K/V head query head h reads (default h // (Hq / Hkv)).
* **Head mixing** (`premix`, `postmix`): s'[h] = Σ_g premix(h, g) · s[g] over the query heads
  g of the call (scores mixed before normalization), w'[h] = Σ_g postmix(h, g) · w[g] (normalized
  weights mixed after it); expressions of h, g, b, m, params and inputs.
* **Gather** (`Gather`): `n in idx[..., :]` (or `n // block in idx[..., :]`): the only keys (or
  key blocks) a row sees are those its list names; negative entries are padding. Any other mask
  still applies on top.

Expressions are sympy in the spec's symbols (b, h, m, n and accesses of declared params and
inputs, `d` the feature index of gains); at kernel level (attnc.ir.kernel) the fuse pass has
replaced accesses by Load symbols everywhere except in gains, which stay `g[..., d]` accesses.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy

from attnc.expr.symbols import d  # noqa: F401  (the feature index gains read; re-exported)

# In `premix` / `postmix`: the head whose scores (weights) are mixed into head h's.
g = sympy.Symbol("g", integer=True, nonnegative=True)

BASE_OPERANDS = ("q", "k", "v")


class Side(enum.Enum):
    """Which rows an operand has: QUERY ones are indexed by m, KEY ones by n."""

    QUERY = "query"
    KEY = "key"


def side_of(name: str, operands: tuple[OperandDecl, ...] = ()) -> Side:
    if name == "q":
        return Side.QUERY
    if name in ("k", "v"):
        return Side.KEY
    return next(o.side for o in operands if o.name == name)


@dataclass(frozen=True)
class OperandDecl:
    name: str
    side: Side

    def __str__(self) -> str:
        return f"operand {self.name}[{'m' if self.side is Side.QUERY else 'n'}]"


@dataclass(frozen=True)
class DotTerm:
    """weight · dot(query, key) for one (query operand, key operand) pair."""

    query: str
    key: str
    weight: sympy.Expr = sympy.Integer(1)

    def __str__(self) -> str:
        dot = f"dot({self.query}, {self.key})"
        return dot if self.weight == 1 else f"{self.weight} * {dot}"


class RopeStyle(enum.Enum):
    HALF = "half"                # pairs (i, i + dims/2): GPT-NeoX / Llama
    INTERLEAVED = "interleaved"  # pairs (2i, 2i + 1): GPT-J / the RoFormer paper


@dataclass(frozen=True)
class Rope:
    """Rotate feature pairs (x_a, x_b) of the first `dims` features (None: all) by angle
    position · theta^(-2i/dims), i the pair's index: x_a' = x_a cos - x_b sin, x_b' = x_b cos +
    x_a sin; the features from `dims` on pass through."""

    position: sympy.Expr
    theta: float
    dims: int | None = None
    style: RopeStyle = RopeStyle.HALF

    def __str__(self) -> str:
        fn = "rope" if self.style is RopeStyle.HALF else "rope_interleaved"
        dims = "" if self.dims is None else f", {self.dims}"
        return f"{fn}(x, {self.position}, {self.theta!r}{dims})"


@dataclass(frozen=True)
class L2Norm:
    """x / sqrt(Σ_d x[d]² + eps) * gain[d] (gain None: 1)."""

    gain: sympy.Expr | None = None
    eps: float = 1e-6

    def __str__(self) -> str:
        return f"l2norm(x{'' if self.gain is None else ', ' + str(self.gain)})"


@dataclass(frozen=True)
class RowScale:
    """x * factor, one value per row (of b, h and m for a query operand, n for a key one)."""

    factor: sympy.Expr

    def __str__(self) -> str:
        return f"x * {self.factor}"


Op = Rope | L2Norm | RowScale


@dataclass(frozen=True)
class Prologue:
    operand: str
    ops: tuple[Op, ...]

    def __str__(self) -> str:
        text = self.operand
        for op in self.ops:
            text = str(op).replace("x", text, 1) if not isinstance(op, RowScale) else \
                f"{text} * {op.factor}"
        return f"{self.operand} = {text}"


@dataclass(frozen=True)
class Gather:
    """The keys a row sees are listed: key n is visible when n // key_block equals one of
    tensor[index..., j] over the list's last dim j (`n in idx[b, h, m, :]` has key_block 1,
    `n // 64 in blocks[b, h, m // 64, :]` 64); entries < 0 are padding. `index` reads b, h and m
    (m // block for lists per query block)."""

    tensor: str
    index: tuple[sympy.Expr, ...]
    key_block: int = 1

    def __str__(self) -> str:
        key = "n" if self.key_block == 1 else f"n // {self.key_block}"
        return f"{key} in {self.tensor}[{', '.join(map(str, self.index))}, :]"


@dataclass(frozen=True)
class Around:
    operands: tuple[OperandDecl, ...] = ()
    dots: tuple[DotTerm, ...] = (DotTerm("q", "k"),)
    value: str = "v"
    prologues: tuple[Prologue, ...] = ()
    gate: sympy.Expr | None = None
    kv_head: sympy.Expr | None = None
    gather: Gather | None = None
    premix: sympy.Expr | None = None
    postmix: sympy.Expr | None = None

    @property
    def plain(self) -> bool:
        """Nothing around the score: q·k, v, no prologue, gate, head map, gather or mixing."""
        return self == Around()

    def prologue(self, operand: str) -> tuple[Op, ...]:
        return next((p.ops for p in self.prologues if p.operand == operand), ())

    def side(self, name: str) -> Side:
        return side_of(name, self.operands)

    def gains(self) -> list[sympy.Expr]:
        """The l2norms' gains: accesses indexed by the feature `d`."""
        return [op.gain for p in self.prologues for op in p.ops
                if isinstance(op, L2Norm) and op.gain is not None]

    def exprs(self, gains: bool = True) -> list[sympy.Expr]:
        """Every expression it holds (positions, factors, gate, head map, gather index, and the
        gains when `gains`)."""
        out: list[sympy.Expr] = self.gains() if gains else []
        for p in self.prologues:
            for op in p.ops:
                if isinstance(op, Rope):
                    out.append(op.position)
                elif isinstance(op, RowScale):
                    out.append(op.factor)
        out += [x for x in (self.gate, self.kv_head, self.premix, self.postmix) if x is not None]
        if self.gather is not None:
            out += list(self.gather.index)
        return out

    def map_exprs(self, fn: Callable[[sympy.Expr], sympy.Expr], gains: bool = True) -> Around:
        """The same with `fn` applied to every expression (gains only when `gains`)."""
        def op(o: Op) -> Op:
            if isinstance(o, Rope):
                return replace(o, position=fn(o.position))
            if isinstance(o, RowScale):
                return replace(o, factor=fn(o.factor))
            return replace(o, gain=fn(o.gain)) if gains and o.gain is not None else o
        gather = self.gather
        if gather is not None:
            gather = replace(gather, index=tuple(fn(i) for i in gather.index))
        return replace(self, prologues=tuple(replace(p, ops=tuple(op(o) for o in p.ops))
                                             for p in self.prologues),
                       gate=None if self.gate is None else fn(self.gate),
                       kv_head=None if self.kv_head is None else fn(self.kv_head), gather=gather,
                       premix=None if self.premix is None else fn(self.premix),
                       postmix=None if self.postmix is None else fn(self.postmix))

    def lines(self) -> list[str]:
        """Its statements, one per line, for the IR printers (nothing when plain)."""
        out = [str(o) for o in self.operands]
        if self.dots != Around().dots:
            out.append("qk = " + " + ".join(map(str, self.dots)))
        if self.value != "v":
            out.append(f"v = {self.value}")
        out += [str(p) for p in self.prologues]
        if self.gate is not None:
            out.append(f"gate = {self.gate}")
        if self.kv_head is not None:
            out.append(f"kv_head = {self.kv_head}")
        if self.gather is not None:
            out.append(f"gather: {self.gather}")
        out += [f"{kind} = {ex}" for kind, ex in (("premix", self.premix),
                                                  ("postmix", self.postmix)) if ex is not None]
        return out


def verify_around(a: Around, where: str) -> None:
    """Well-formed: dots and prologues name known operands of the right sides, the value is a
    key-side operand, rope dims are even, each operand has at most one prologue."""
    names = set(BASE_OPERANDS) | {o.name for o in a.operands}
    if len({o.name for o in a.operands}) != len(a.operands) or names & {
            o.name for o in a.operands} & set(BASE_OPERANDS):
        raise AssertionError(f"{where}: operand names repeat or shadow q, k, v")
    for t in a.dots:
        if t.query not in names or t.key not in names or a.side(t.query) is not Side.QUERY or \
                a.side(t.key) is not Side.KEY or t.query == "v" or t.key == "v":
            raise AssertionError(f"{where}: bad dot term {t}")
        if not sympy.sympify(t.weight).is_number:
            raise AssertionError(f"{where}: a dot's weight is a number, got {t.weight}")
    if a.value not in names or a.side(a.value) is not Side.KEY:
        raise AssertionError(f"{where}: the value {a.value} is no key-side operand")
    seen = [p.operand for p in a.prologues]
    if len(set(seen)) != len(seen) or any(x not in names for x in seen):
        raise AssertionError(f"{where}: prologues {seen} repeat or name unknown operands")
    for p in a.prologues:
        for op in p.ops:
            if isinstance(op, Rope) and op.dims is not None and (op.dims <= 0 or op.dims % 2):
                raise AssertionError(f"{where}: rope dims {op.dims} must be positive and even")


class RowKind(enum.Enum):
    POSITION = "position"  # a rope's position per row
    FACTOR = "factor"      # a RowScale's factor per row
    GAIN = "gain"          # an l2norm's gain: one vector over the features per (b, head)
    GATE = "gate"          # the output gate per query row


@dataclass(frozen=True)
class RowValue:
    """A value the runtime evaluates with torch from the spec's expression and passes to the
    kernels: a POSITION, FACTOR or GATE is one fp32 per row, [B, Hq, M] on the query side and
    [B, Hkv, N] on the key side; a GAIN is [B, H_side, D_operand]. `key` names it in generated
    code and launch bindings (`gate`, `q_position0`, `k_factor1`, `q_gain0`: operand, kind and the
    op's index in the operand's prologue). Positions are never differentiated; the kernels write
    the adjoints of the others, which the runtime chains into the params with torch autograd."""

    key: str
    kind: RowKind
    side: Side
    expr: sympy.Expr
    operand: str = ""
    op_index: int = -1


def row_values(a: Around) -> tuple[RowValue, ...]:
    """The row values of `a`, prologue by prologue and op by op, then the gate."""
    out = []
    for p in a.prologues:
        side = a.side(p.operand)
        for i, op in enumerate(p.ops):
            if isinstance(op, Rope):
                kind, ex = RowKind.POSITION, op.position
            elif isinstance(op, RowScale):
                kind, ex = RowKind.FACTOR, op.factor
            elif op.gain is not None:
                kind, ex = RowKind.GAIN, op.gain
            else:
                continue
            out.append(RowValue(f"{p.operand}_{kind.value}{i}", kind, side, ex, p.operand, i))
    if a.gate is not None:
        out.append(RowValue("gate", RowKind.GATE, Side.QUERY, a.gate))
    return tuple(out)
