"""The meaning of what an attention block says around its score (attnc.ir.around), over whole
tensors with torch: the math definitions the reference interpreter (backends/reference/cascade.py)
and the tests build on. Everything is differentiable by torch autograd.

Shapes: q and the query-side operands are [B, Hq, M, D_x]; k, v and the key-side operands
[B, Hkv, N, D_x]. Row values (positions, factors, the gate) are evaluated from their spec
expressions over [B, Hq, M] on the query side and [B, Hkv, N] on the key side (there h is the K/V
head); gains over [B, H_side, D_x] with `d` the feature index; head-mixing weights over
[B, Hq, Hq, M] (b, h, g, m). Accesses read `inputs` (params and inputs by name) and may index
with any of those symbols; the sizes B, H (= Hq), M, N and D (q's head dim) are known.

* `rope`: pairs (i, i + dims/2) (HALF) or (2i, 2i + 1) (INTERLEAVED) of the first `dims` features
  turned by position · theta^(-2i/dims); `l2norm`: x / sqrt(Σ x² + eps) · gain;
  `RowScale`: x · factor. `prologue` applies an operand's ops in order.
* `kv_map`: the K/V head of each query head (kv_head, default h // (Hq / Hkv)); `by_query_head`
  expands a key-side tensor to the query heads with it.
* `joint_operands`: q' = [w_1·x_1, w_2·x_2, ...], k' = [y_1, y_2, ...] concatenated on the
  features, so q'·k' = Σ w_t dot(x_t, y_t) (the dots of `Around.dots`), and the value, all per
  query head, after their prologues.
* `visible`: the gathered keys [B, Hq, M, N]; `mix`: Σ_g weight(h, g) · x[g] over the query heads;
  `gate`: the gate per query row.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
import torch

from attnc.backends.eager.evaluate import Evaluator, gather
from attnc.expr import symbols as S
from attnc.ir import around as A
from attnc.ir.around import Around, L2Norm, Op, Rope, RopeStyle, RowScale, Side


class Context:
    """The sizes of one call and its params and inputs by name (floating ones in the working
    dtype of `like`)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, inputs: Mapping[str, torch.Tensor]):
        self.B, self.Hq, self.M, self.D = q.shape
        self.Hkv, self.N = k.shape[1], k.shape[2]
        self.inputs = inputs
        self.like = q
        self.sizes = {S.B: self.B, S.H: self.Hq, S.M: self.M, S.N: self.N, S.D: self.D}

    def evaluate(self, expr: sympy.Expr, axes: tuple[tuple[sympy.Symbol, int], ...]
                 ) -> torch.Tensor:
        """`expr` over the grid of `axes` (symbol, extent), one tensor dim per axis."""
        nd = len(axes)
        syms: dict = dict(self.sizes)
        for i, (sym, extent) in enumerate(axes):
            syms[sym] = torch.arange(extent, device=self.like.device).view(
                [-1 if j == i else 1 for j in range(nd)])

        def access(acc: sympy.Indexed) -> torch.Tensor:
            return gather(self.inputs[str(acc.base)], [ev(i) for i in acc.indices])

        ev = Evaluator(syms, self.like, access=access)
        return ev.tensor(ev(expr)).expand([extent for _, extent in axes])

    def rows(self, expr: sympy.Expr, side: Side) -> torch.Tensor:
        """One value per row: [B, Hq, M] (query side) or [B, Hkv, N] (key side)."""
        if side is Side.QUERY:
            return self.evaluate(expr, ((S.b, self.B), (S.h, self.Hq), (S.m, self.M)))
        return self.evaluate(expr, ((S.b, self.B), (S.h, self.Hkv), (S.n, self.N)))

    def gain(self, expr: sympy.Expr, side: Side, dim: int) -> torch.Tensor:
        """A gain over the features: [B, H_side, dim]."""
        heads = self.Hq if side is Side.QUERY else self.Hkv
        return self.evaluate(expr, ((S.b, self.B), (S.h, heads), (S.d, dim)))


def rope(x: torch.Tensor, position: torch.Tensor, theta: float, dims: int | None,
         style: RopeStyle) -> torch.Tensor:
    """x [..., L, D] turned by position [..., L]: pair i of the first `dims` features by angle
    position · theta^(-2i/dims); the features from `dims` on pass through."""
    dims = x.shape[-1] if dims is None else dims
    half = dims // 2
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64, device=x.device) / dims)
    angle = position.to(torch.float64)[..., None] * freq  # [..., L, half]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    rot, rest = x[..., :dims], x[..., dims:]
    if style is RopeStyle.HALF:
        a, b = rot[..., :half], rot[..., half:]
        turned = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    return torch.cat([turned, rest], -1)


def l2norm(x: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(Σ_d x² + eps) along the features, times `gain` [..., D] (broadcast over rows)."""
    out = x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)
    return out if gain is None else out * gain[..., None, :].to(x.dtype)


def apply(op: Op, x: torch.Tensor, side: Side, ctx: Context) -> torch.Tensor:
    """One prologue op on an operand [B, H_side, L, D_x]."""
    if isinstance(op, Rope):
        if op.dims is not None and op.dims > x.shape[-1]:
            raise ValueError(f"rope rotates {op.dims} features of an operand with "
                             f"{x.shape[-1]}")
        return rope(x, ctx.rows(op.position, side), op.theta, op.dims, op.style)
    if isinstance(op, L2Norm):
        gain = None if op.gain is None else ctx.gain(op.gain, side, x.shape[-1])
        return l2norm(x, gain, op.eps)
    assert isinstance(op, RowScale)
    return x * ctx.rows(op.factor, side)[..., None].to(x.dtype)


def prologue(ops: tuple[Op, ...], x: torch.Tensor, side: Side, ctx: Context) -> torch.Tensor:
    for op in ops:
        x = apply(op, x, side, ctx)
    return x


def kv_map(around: Around, ctx: Context) -> torch.Tensor:
    """The K/V head each query head reads, [Hq] int64."""
    if around.kv_head is None:
        if ctx.Hq % ctx.Hkv:
            raise ValueError(f"q has {ctx.Hq} heads, not a multiple of k's {ctx.Hkv}")
        return torch.arange(ctx.Hq, device=ctx.like.device) // (ctx.Hq // ctx.Hkv)
    heads = ctx.evaluate(around.kv_head, ((S.h, ctx.Hq),))
    if heads.is_floating_point():
        heads = heads.round()
    heads = heads.long()
    if ((heads < 0) | (heads >= ctx.Hkv)).any():
        raise ValueError(f"kv_head maps a query head outside the {ctx.Hkv} K/V heads: "
                         f"{heads.tolist()}")
    return heads


def by_query_head(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """A key-side tensor [B, Hkv, ...] per query head: [B, Hq, ...]."""
    return x.index_select(1, heads)


def operands(around: Around, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
             ctx: Context) -> dict[str, torch.Tensor]:
    """Every operand after its prologue, the key-side ones per query head (kv_map)."""
    given = {"q": q, "k": k, "v": v}
    given.update({o.name: ctx.inputs[o.name] for o in around.operands})
    heads = kv_map(around, ctx)
    out = {}
    for name, x in given.items():
        if x is None:
            continue
        side = around.side(name)
        x = prologue(around.prologue(name), x, side, ctx)
        out[name] = x if side is Side.QUERY else by_query_head(x, heads)
    return out


def joint_operands(around: Around, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                   ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', k', value) per query head, q'·k' = Σ_t weight_t · dot(query_t, key_t)."""
    if around.value == "v" and v is None:
        raise ValueError("v is required: the spec's value is v")
    xs = operands(around, q, k, v, ctx)
    for t in around.dots:
        if xs[t.query].shape[-1] != xs[t.key].shape[-1]:
            raise ValueError(f"dot({t.query}, {t.key}): {t.query} has {xs[t.query].shape[-1]} "
                             f"features, {t.key} {xs[t.key].shape[-1]}")
    qj = torch.cat([xs[t.query] * float(t.weight) for t in around.dots], -1)
    kj = torch.cat([xs[t.key] for t in around.dots], -1)
    return qj, kj, xs[around.value]


def visible(around: Around, ctx: Context) -> torch.Tensor:
    """Which keys each query row sees by the gather, [B, Hq, M, N] bool (all when none)."""
    shape = (ctx.B, ctx.Hq, ctx.M, ctx.N)
    g = around.gather
    if g is None:
        return torch.ones(shape, dtype=torch.bool, device=ctx.like.device)
    index = [ctx.evaluate(i, ((S.b, ctx.B), (S.h, ctx.Hq), (S.m, ctx.M))) for i in g.index]
    lists = gather(ctx.inputs[g.tensor], index).long()  # [B, Hq, M, J]
    block = torch.arange(ctx.N, device=ctx.like.device) // g.key_block
    hit = (lists[..., :, None] == block) & (lists[..., :, None] >= 0)
    return hit.any(-2)


def gate(around: Around, ctx: Context) -> torch.Tensor | None:
    """The output gate per query row [B, Hq, M], or None."""
    return None if around.gate is None else ctx.rows(around.gate, Side.QUERY)


def mix(weight: sympy.Expr, x: torch.Tensor, ctx: Context, rows: torch.Tensor | None = None
        ) -> torch.Tensor:
    """Σ_g weight(b, h, g, m) · x[b, g, m, n] for x [B, Hq, M, N] (or for the query rows `rows`
    only, x [B, Hq, len(rows), N])."""
    w = ctx.evaluate(weight, ((S.b, ctx.B), (S.h, ctx.Hq), (A.g, ctx.Hq), (S.m, ctx.M)))
    if rows is not None:
        w = w[..., rows]
    return torch.einsum("bhgm,bgmn->bhmn", w.to(x.dtype), x)


def softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, lse) over the last dim; a row with no visible key (all -inf) gets zero weights
    and lse -inf."""
    lse = torch.logsumexp(scores, -1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - safe[..., None]), lse


def attention(around: Around, scores: torch.Tensor, value: torch.Tensor, ctx: Context
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """out and lse from the masked (and gathered, premixed) scores [B, Hq, M, N] and the value
    per query head [B, Hq, N, Dv]: softmax, postmix of the weights, then the gate."""
    w, lse = softmax(scores)
    if around.postmix is not None:
        w = mix(around.postmix, w, ctx)
    out = w @ value
    g = gate(around, ctx)
    return (out if g is None else out * g[..., None].to(out.dtype)), lse
