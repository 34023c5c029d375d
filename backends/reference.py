"""Reference interpreters in torch: the semantics every pass must preserve.

`interpret` runs a cascade einsum by einsum (the OnlineSoftmax node as a literal scan over n, one
key at a time). When the cascade carries mask bounds and a tile size is given, it honours them
the way a kernel would: keys outside the visited tiles are dropped and the mask is not evaluated
on full tiles, so unsound bounds change the result. `run_kernel` executes kernel IR tile by tile,
and `run_kernel_backward` its backward (autodiff's derivatives on the backward kernels' tiles).
Both are slow and exact (use float64 inputs); they are oracles, not kernels.
"""

from __future__ import annotations

import math

import sympy
import torch

from attnc import symbols as S
from attnc.ir import Cascade, Einsum, ScatterSum
from attnc.scatter import scatter_sum

_UNARY = {
    sympy.exp: torch.exp, sympy.log: torch.log, sympy.tanh: torch.tanh, sympy.Abs: torch.abs,
    sympy.sin: torch.sin, sympy.cos: torch.cos, sympy.tan: torch.tan, S.sigmoid: torch.sigmoid,
    S.softplus: torch.nn.functional.softplus, sympy.floor: torch.floor,
    sympy.ceiling: torch.ceil,
}
_RELATION = {sympy.Lt: torch.lt, sympy.Le: torch.le, sympy.Gt: torch.gt, sympy.Ge: torch.ge,
             sympy.Eq: torch.eq, sympy.Ne: torch.ne}


def _t(x, like: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device=like.device)


class Evaluator:
    """Evaluate a sympy expression with broadcasting torch tensors.

    `symbols` maps sympy symbols to tensors or numbers; `tensor(access)` resolves an Indexed.
    """

    def __init__(self, symbols: dict, tensor, like: torch.Tensor):
        self.symbols = symbols
        self.tensor = tensor
        self.like = like

    def __call__(self, ex):
        like = self.like
        if ex is sympy.true or ex is sympy.false:
            return bool(ex)
        if ex.is_Number:
            if ex == sympy.oo or ex == -sympy.oo:
                return float(ex)
            return int(ex) if ex.is_Integer else float(ex)
        if ex.is_Symbol:
            return self.symbols[ex]
        if isinstance(ex, sympy.Indexed):
            return self.tensor(ex)
        args = [self(a) for a in ex.args] if not isinstance(ex, sympy.Piecewise) else None
        if ex.is_Add:
            out = args[0]
            for a in args[1:]:
                out = out + a
            return out
        if ex.is_Mul:
            out = args[0]
            for a in args[1:]:
                out = out * a
            return out
        if ex.is_Pow:
            base, exp = args
            if isinstance(base, torch.Tensor) and not base.is_floating_point():
                base = base.double()
            return base ** exp if isinstance(base, torch.Tensor) else _t(float(base), like) ** exp
        if isinstance(ex, sympy.Piecewise):
            result = None
            for value, cond in reversed(ex.args):
                v = self(value)
                if result is None:
                    result = _t(v, like)
                    continue
                result = torch.where(_t(self(cond), like), _t(v, like), result)
            return result
        if ex.func in _UNARY:
            x = _t(args[0], like)
            return _UNARY[ex.func](x if x.is_floating_point() else x.double())
        if isinstance(ex, (sympy.Min, sympy.Max)):
            fold = torch.minimum if isinstance(ex, sympy.Min) else torch.maximum
            out = _t(args[0], like)
            for a in args[1:]:
                out = fold(out, _t(a, like))
            return out
        if isinstance(ex, sympy.Mod):
            return torch.remainder(_t(args[0], like), args[1])
        if ex.func in _RELATION:
            return _RELATION[ex.func](_t(args[0], like), _t(args[1], like))
        if isinstance(ex, sympy.And):
            out = _t(args[0], like)
            for a in args[1:]:
                out = out & a
            return out
        if isinstance(ex, sympy.Or):
            out = _t(args[0], like)
            for a in args[1:]:
                out = out | a
            return out
        if isinstance(ex, sympy.Not):
            return ~_t(args[0], like)
        raise NotImplementedError(f"reference interpreter: {ex.func.__name__} in {ex}")


def gather(value: torch.Tensor, index: list) -> torch.Tensor:
    """value[index...] with broadcasting index tensors (float indices from floor are rounded)."""
    idx = []
    for i in index:
        i = torch.as_tensor(i, device=value.device)
        idx.append(i.round().long() if i.is_floating_point() else i.long())
    return value[tuple(idx)]


def _axis(values: torch.Tensor, pos: int, nd: int) -> torch.Tensor:
    """`values` laid along axis `pos` of an nd-dimensional broadcast shape."""
    return values.view([-1 if i == pos else 1 for i in range(nd)])


class _Run:
    """Shared state of one interpretation: operands, extra inputs, sizes."""

    def __init__(self, c_options, q, k, v, scale, inputs):
        if q.shape[1] != k.shape[1]:
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        self.q, self.k, self.v = q, k, v
        self.B, self.H, self.M, D = q.shape
        self.N, self.Dv = k.shape[2], v.shape[3]
        self.size = {"m": self.M, "n": self.N, "e": D, "f": self.Dv}
        self.env = {"Q": (q, ("m", "e")), "K": (k, ("n", "e")), "V": (v, ("n", "f"))}
        self.inputs = inputs
        self.scale = scale

    def evaluator(self, ranks: tuple[str, ...], extra: dict | None = None) -> Evaluator:
        """An Evaluator over [B, H, *ranks]; `extra` adds or overrides symbols."""
        nd = 2 + len(ranks)
        dev = self.q.device
        syms = {S.b: _axis(torch.arange(self.B, device=dev), 0, nd),
                S.h: _axis(torch.arange(self.H, device=dev), 1, nd),
                S.M: self.M, S.N: self.N, S.scale: self.scale, S.B: self.B, S.H: self.H}
        for i, r in enumerate(ranks):
            syms[S.RANKS[r]] = _axis(torch.arange(self.size[r], device=dev), 2 + i, nd)
        syms.update(extra or {})

        def tensor(acc: sympy.Indexed):
            name = str(acc.base)
            if name in self.env:
                value, vr = self.env[name]
                order = [r for r in ranks if r in vr]
                value = value.permute(0, 1, *[2 + vr.index(r) for r in order])
                shape = [value.shape[0], value.shape[1]] + [
                    self.size[r] if r in vr else 1 for r in ranks]
                return value.reshape(shape)
            ev = Evaluator(syms, tensor, self.q)
            return gather(self.inputs[name], [ev(i) for i in acc.indices])

        return Evaluator(syms, tensor, self.q)

    def full(self, value, ranks) -> torch.Tensor:
        shape = [self.B, self.H] + [self.size[r] for r in ranks]
        return _t(value, self.q).to(self.q.dtype if _t(value, self.q).is_floating_point()
                                    else _t(value, self.q).dtype).expand(shape)


def _extremum(val: torch.Tensor, axes: tuple[int, ...], reduce: str) -> torch.Tensor:
    """max/min over `axes`; over an empty range they are -inf/+inf, the identities of the monoid."""
    if any(val.shape[a] == 0 for a in axes):
        shape = [d for i, d in enumerate(val.shape) if i not in axes]
        return val.new_full(shape, -math.inf if reduce == "max" else math.inf)
    return val.amax(dim=axes) if reduce == "max" else val.amin(dim=axes)


def interpret(c: Cascade, q, k, v, *, scale: float | None = None, inputs: dict | None = None,
              tiles: tuple[int, int] | None = None, saved: dict | None = None
              ) -> dict[str, torch.Tensor]:
    """Run a cascade; returns {role: tensor} for its outputs (out [B,H,M,Dv], lse [B,H,M]).

    A backward cascade (autodiff's) also takes `saved`: {O, LSE, dO, dLSE} as [B, H, M, ...];
    its dk and dv are summed over the query heads of each k/v head (GQA), and a param's
    gradient has the param's shape."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    run = _Run(c.options, q, k, v, scale, inputs or {})
    for d in c.decls:
        if d.kind == "saved":
            run.env[d.name] = (saved[d.name], tuple(str(r) for r in d.dims))
    for nd in c.nodes:
        if isinstance(nd, ScatterSum):
            run.env[nd.name] = (_scatter(run, nd), ())
            continue
        if isinstance(nd, Einsum):
            it = nd.iteration
            val = run.full(run.evaluator(it)(nd.expr), it)
            axes = tuple(2 + it.index(r) for r in nd.over)
            if nd.reduce == "sum":
                val = val.sum(dim=axes)
            elif nd.reduce in ("max", "min"):
                val = _extremum(val, axes, nd.reduce)
            run.env[nd.name] = (val, nd.ranks)
        else:
            scores = run.full(run.evaluator(("m", "n"))(nd.scores), ("m", "n"))
            if c.bounds is not None and tiles is not None:
                scores = _apply_bounds(c, run, scores, tiles)
            value = run.full(run.evaluator(("n", "f"))(nd.value), ("n", "f"))
            out, lse = online_softmax_scan(scores, value)
            run.env[nd.name] = (out, ("m", "f"))
            run.env[nd.lse] = (lse, ("m",))
    result = {role: run.env[name][0] for role, name in c.outputs}
    return _sum_groups(result, k.shape[1])


def _sum_groups(grads: dict, kv_heads: int) -> dict:
    """dk and dv per query head -> per k/v head: GQA sums each group's heads."""
    for role in ("dk", "dv"):
        if role in grads:
            g = grads[role]
            grads[role] = g.view(g.shape[0], kv_heads, g.shape[1] // kv_heads,
                                 *g.shape[2:]).sum(2)
    return grads


def _scatter(run: _Run, nd: ScatterSum) -> torch.Tensor:
    """A param's gradient: each term's value over (b, h, m, n), summed into its index."""
    param = run.inputs[nd.param]
    total = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
    for index, value in nd.terms:
        ev = run.evaluator(("m", "n"))
        total += scatter_sum(run.full(ev(value), ("m", "n")), [ev(i) for i in index], param.shape)
    return total.to(param.dtype)


def online_softmax_scan(scores: torch.Tensor, value: torch.Tensor):
    """The OnlineSoftmax node's semantics, literally: one key at a time."""
    state = _softmax_start(scores.shape[:-1], value.shape[-1], scores)
    for j in range(scores.shape[-1]):
        state = _softmax_update(*state, scores[..., j:j + 1], value[..., j:j + 1, :])
    return _softmax_finish(*state)


def _softmax_start(rows: torch.Size, dv: int, like: torch.Tensor):
    """Running max, denominator and numerator before any key."""
    rm = torch.full(rows, -math.inf, dtype=like.dtype, device=like.device)
    return rm, torch.zeros_like(rm), torch.zeros(*rows, dv, dtype=like.dtype, device=like.device)


def _softmax_update(rm, rd, rnv, s, value):
    """Fold keys in: scores `s` [..., rows, keys], `value` [..., keys, f]."""
    new = torch.maximum(rm, s.amax(-1))
    # rows that have seen no visible key keep max -inf; shift by 0 there to avoid inf - inf
    safe = torch.where(new == -math.inf, torch.zeros_like(new), new)
    p = torch.exp(s - safe[..., None])
    alpha = torch.exp(rm - safe)
    return new, rd * alpha + p.sum(-1), rnv * alpha[..., None] + p @ value


def _softmax_finish(rm, rd, rnv):
    """(out, lse); a row with no visible key gets zeros and -inf."""
    empty = rd == 0
    out = torch.where(empty[..., None], torch.zeros_like(rnv), rnv / rd[..., None])
    lse = torch.where(empty, torch.full_like(rd, -math.inf), rm + torch.log(rd))
    return out, lse


def _apply_bounds(c: Cascade, run: _Run, scores, tiles):
    """Drop keys outside visited tiles; use the unmasked score on full tiles."""
    from attnc.passes.mask_bounds import tile_schedule

    bm, bn = tiles
    plan = torch.zeros(run.M, run.N, dtype=torch.int8, device=scores.device)
    for i, visits in enumerate(tile_schedule(c.bounds.segments, run.M, run.N, bm, bn)):
        for start, masked in visits:
            plan[i * bm:(i + 1) * bm, start:start + bn] = 2 if masked else 1
    unmasked = run.full(run.evaluator(("m", "n"))(c.bounds.score), ("m", "n"))
    eff = torch.where(plan == 1, unmasked, scores)
    return torch.where(plan == 0, torch.full_like(eff, -math.inf), eff)


def _tile_scores(kernel, run: _Run, rows, cols, masked: bool):
    """(evaluator, scores [B, H, rows, cols]) of one tile: q.k, the loads, the score, and the
    mask where the tile is masked."""
    ev = run.evaluator(("m", "n"), {
        S.m: _axis(rows, 2, 4), S.n: _axis(cols, 3, 4),
        S.qk: run.q[:, :, rows] @ run.k[:, :, cols].transpose(-1, -2)})
    for ld in kernel.loads:
        ev.symbols[sympy.Symbol(ld.name, real=True)] = gather(
            run.inputs[ld.tensor], [ev(x) for x in ld.index])
    s = _t(ev(kernel.score), run.q).expand(run.B, run.H, len(rows), len(cols))
    if masked and kernel.mask is not None:
        s = torch.where(_t(ev(kernel.mask), run.q), s, torch.full_like(s, -math.inf))
    return ev, s


def run_kernel(kernel, q, k, v, *, scale: float | None = None, inputs: dict | None = None,
               tiles: tuple[int, int] = (16, 16)) -> dict[str, torch.Tensor]:
    """Execute an AttentionKernel tile by tile, as the generated code does: the same key-tile
    schedule, the mask only on masked tiles, the same online-softmax update."""
    from attnc.passes.mask_bounds import tile_schedule

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    run = _Run((), q, k, v, scale, inputs or {})
    bm, bn = tiles
    B, H, M, N = run.B, run.H, run.M, run.N
    out = torch.zeros(B, H, M, run.Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, M), -math.inf, dtype=q.dtype, device=q.device)
    for i, visits in enumerate(tile_schedule(kernel.segments, M, N, bm, bn)):
        rows = torch.arange(i * bm, min(i * bm + bm, M), device=q.device)
        state = _softmax_start((B, H, len(rows)), run.Dv, q)
        for start, masked in visits:
            cols = torch.arange(start, min(start + bn, N), device=q.device)
            _, s = _tile_scores(kernel, run, rows, cols, masked)
            state = _softmax_update(*state, s, run.v[:, :, cols])
        out[:, :, rows], lse[:, :, rows] = _softmax_finish(*state)
    return {"out": out, "lse": lse}


def run_kernel_backward(kernel, q, k, v, *, saved: dict, scale: float | None = None,
                        inputs: dict | None = None, tiles: tuple[int, int] = (16, 16)
                        ) -> dict[str, torch.Tensor]:
    """Execute an AttentionKernel's backward tile by tile, as the generated kernels do: dq and
    the m- or (b, h)-indexed param sums over the forward's key tiles per query tile; dk, dv and
    the n-indexed param sums over the transposed query tiles per key tile; the mask only on
    masked tiles; p recomputed from the saved lse. `saved` holds O, LSE, dO, dLSE; returns dq,
    dk, dv (summed over GQA groups) and d_<param> for every param."""
    from attnc.passes.mask_bounds import query_tile_schedule, tile_schedule

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    run = _Run((), q, k, v, scale, inputs or {})
    bm, bn = tiles
    B, H, M, N = run.B, run.H, run.M, run.N
    lse = saved["LSE"]
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    delta = (saved["dO"] * saved["O"]).sum(-1) - saved["dLSE"]
    loads = {ld.name: ld for ld in kernel.loads}
    grads = {"dq": torch.zeros_like(run.q), "dk": torch.zeros_like(run.k),
             "dv": torch.zeros_like(run.v)}
    params = {d.name: torch.zeros(run.inputs[d.name].shape, dtype=torch.float64,
                                  device=q.device) for d in kernel.inputs if d.kind == "param"}

    def tile(rows, cols, masked, levels):
        ev, s = _tile_scores(kernel, run, rows, cols, masked)
        p = torch.exp(s - lse[:, :, rows, None])
        dp = saved["dO"][:, :, rows] @ run.v[:, :, cols].transpose(-1, -2)
        ds = p * (dp - delta[:, :, rows, None])
        for name, deriv in kernel.grad.dloads:
            ld = loads[name]
            if ld.level in levels and ld.tensor in params:
                value = torch.where(p > 0, ds * _t(ev(deriv), q), torch.zeros_like(ds))
                params[ld.tensor] += scatter_sum(value, [ev(x) for x in ld.index],
                                                 params[ld.tensor].shape)
        return p, ds * _t(ev(kernel.grad.dqk), q)

    for i, visits in enumerate(tile_schedule(kernel.segments, M, N, bm, bn)):
        rows = torch.arange(i * bm, min(i * bm + bm, M), device=q.device)
        for start, masked in visits:
            cols = torch.arange(start, min(start + bn, N), device=q.device)
            _, dqk = tile(rows, cols, masked, ("program", "row", "tile"))
            grads["dq"][:, :, rows] += dqk @ run.k[:, :, cols]
    for j, visits in enumerate(query_tile_schedule(kernel.grad.rows, M, N, bm, bn)):
        cols = torch.arange(j * bn, min(j * bn + bn, N), device=q.device)
        for start, masked in visits:
            rows = torch.arange(start, min(start + bm, M), device=q.device)
            p, dqk = tile(rows, cols, masked, ("key",))
            grads["dv"][:, :, cols] += p.transpose(-1, -2) @ saved["dO"][:, :, rows]
            grads["dk"][:, :, cols] += dqk.transpose(-1, -2) @ run.q[:, :, rows]
    _sum_groups(grads, k.shape[1])
    grads.update({f"d_{name}": g.to(run.inputs[name].dtype) for name, g in params.items()})
    return grads
