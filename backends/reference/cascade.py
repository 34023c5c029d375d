"""Reference interpreters in torch: the semantics every pass must preserve.

`interpret` runs a cascade einsum by einsum (the OnlineSoftmax node as a literal scan over n, one
key at a time). When the cascade carries mask bounds and a tile size is given, it honours them
the way a kernel would: keys outside the visited tiles are dropped and the mask is not evaluated
on full tiles, so unsound bounds change the result. `run_kernel` executes kernel IR tile by tile,
and `run_kernel_backward` its backward (autodiff's derivatives on the backward kernels' tiles).
Both are slow and exact (use float64 inputs); they are oracles, not kernels.

A general cascade's `mask` restricts every reduction over m or n, and every scan along m or n,
to the visible (m, n) pairs, where the einsum iterates over both m and n (a sum over none is 0,
a max -inf, a min +inf; a scan skips the invisible pairs); maps are evaluated everywhere (their
values at invisible pairs are never read). Scans are inclusive prefix (cumsum) or suffix
(rcumsum) sums along their rank; `stabilizer` marks change nothing. A ScatterSum sums each term
over (b, h) and the ranks m, n its value or index uses (the visible pairs when it uses both).
Everything is torch code, so `interpret` is differentiable by torch.autograd wherever the
cascade's values are finite (masked values that are infinite give NaN gradients through
torch.where, as in any torch program).

What an attention block says around its score (`Cascade.around`, `AttentionKernel.around`:
attnc.ir.around) is applied with backends/eager/around.py: operands (passed by name in
`inputs`, like params) go through their prologues, key-side ones are laid out per query head by
the head map, and several dots become one dot of concatenated operands, the query side scaled by
the weights (q' = [w_1 x_1, ...], k' = [y_1, ...]); the value is the spec's (`v` may be None
when it is another operand). Head premixing applies to the score node (before the mask), the
gather to the masked scores (as -inf), and in `run_kernel` to each tile's; the gate multiplies
`out`. With postmix, `out` comes from the masked scores' softmax weights mixed over the heads
(eager/around.attention; `interpret` then ignores the tile plan for `out`). The backward
interpreters (`interpret_backward`, `run_kernel_backward`) know nothing around the score:
differentiate `interpret` or `run_kernel` with torch autograd instead.
"""

from __future__ import annotations

import math

import sympy
import torch

from attnc.backends.eager import around as AR
from attnc.backends.eager.evaluate import Evaluator, extremum, gather
from attnc.expr import symbols as S
from attnc.ir.around import Around
from attnc.ir.cascade import (Backward, Cascade, Einsum, OnlineSoftmax, Reduce, Saved, ScatterSum,
                              TensorKind)
from attnc.ir.kernel import LoadLevel
from attnc.passes.mask_bounds import query_tile_schedule, tile_schedule
from attnc.scatter import scatter_sum


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
        self.env: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {
            "Q": (q, ("m", "e")), "K": (k, ("n", "e")), "V": (v, ("n", "f"))}
        self.inputs = inputs
        self.scale = scale

    def scores(self, ex) -> torch.Tensor:
        """Scores over [B, H, m, n], as floats also where the score is an integer expression
        (score = n - m): the online softmax starts its running max at -inf."""
        val = self.full(self.evaluator(("m", "n"))(ex), ("m", "n"))
        return val if val.is_floating_point() else val.to(self.q.dtype)

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
            return gather(self.inputs[name], [ev(i) for i in acc.indices])

        ev = Evaluator(syms, self.q, access=tensor)
        return ev

    def full(self, value, ranks) -> torch.Tensor:
        shape = [self.B, self.H] + [self.size[r] for r in ranks]
        t = torch.as_tensor(value, device=self.q.device)
        return t.to(self.q.dtype if t.is_floating_point() else t.dtype).expand(shape)


def interpret(c: Cascade, q, k, v, *, scale: float | None = None, inputs: dict | None = None,
              tiles: tuple[int, int] | None = None, saved: dict | None = None
              ) -> dict[str, torch.Tensor]:
    """Run a cascade; returns {role: tensor} for its outputs (out [B,H,M,Dv], lse [B,H,M]).

    A backward cascade (see `interpret_backward`) also takes `saved`: its saved tensors by
    name, as [B, H, ...] in the ranks of their declaration; its dk and dv are summed over the
    query heads of each k/v head (GQA), and a param's gradient has the param's shape."""
    env = intermediates(c, q, k, v, scale=scale, inputs=inputs, tiles=tiles, saved=saved)
    out = _sum_groups({role: env[name] for role, name in c.outputs}, k.shape[1])
    if not c.around.plain:
        ctx = AR.Context(q, k, inputs or {})
        _, _, value = AR.joint_operands(c.around, q, k, v, ctx)
        if c.around.postmix is not None:
            out["out"], _ = AR.attention(c.around, env[_hooks(c)[1]], value, ctx)
        else:
            out["out"] = _gated(c.around, out["out"], ctx)
    return out


def _gated(around: Around, out: torch.Tensor, ctx: AR.Context) -> torch.Tensor:
    g = AR.gate(around, ctx)
    return out if g is None else out * g[..., None].to(out.dtype)


def _hooks(c: Cascade) -> tuple[str, str]:
    """(the scores node, the masked scores node) of a softmax cascade: head premixing applies
    to the first, the gather to the second (the same node when there is no mask)."""
    if c.mask_node is not None:
        masked = c.einsum(c.mask_node).expr
        if not isinstance(masked, sympy.Piecewise):  # the mask is false: no score is read
            return "", c.mask_node
        inner = masked.args[0][0]
        assert isinstance(inner, sympy.Indexed), f"{c.name}: the mask wraps {inner}"
        return str(inner.base), c.mask_node
    for nd in c.nodes:
        scores = nd.scores if isinstance(nd, OnlineSoftmax) else (
            nd.expr if isinstance(nd, Einsum) and nd.reduce is Reduce.MAX else None)
        if scores is not None:
            assert isinstance(scores, sympy.Indexed), f"{c.name}: the softmax reads {scores}"
            return str(scores.base), str(scores.base)
    raise AssertionError(f"{c.name}: no softmax reads the scores")


def _around_scores(around: Around, ctx: AR.Context, scores: torch.Tensor, premix: bool,
                   gather_keys: bool) -> torch.Tensor:
    """Scores [B, Hq, M, N] premixed over the heads and/or restricted to the gathered keys."""
    if premix and around.premix is not None:
        scores = AR.mix(around.premix, scores, ctx)
    if gather_keys and around.gather is not None:
        scores = torch.where(AR.visible(around, ctx), scores,
                             torch.full_like(scores, -math.inf))
    return scores


def intermediates(c: Cascade, q, k, v, *, scale: float | None = None, inputs: dict | None = None,
                  tiles: tuple[int, int] | None = None, saved: dict | None = None
                  ) -> dict[str, torch.Tensor]:
    """Every tensor `interpret` computes, by name, as [B, H, *ranks] per query head (k and v
    repeated over GQA groups): the forward values a general backward reads as residuals."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ctx = None
    if not c.around.plain:
        ctx = AR.Context(q, k, inputs or {})
        q, k, v = AR.joint_operands(c.around, q, k, v, ctx)
        score_node, masked_node = _hooks(c)
    run = _Run(c.options, q, k, v, scale, inputs or {})
    for d in c.decls:
        if d.kind is TensorKind.SAVED:
            assert saved is not None, f"{c.name} reads saved tensors"
            run.env[d.name] = (saved[d.name], tuple(str(r) for r in d.dims))
    for nd in c.nodes:
        if isinstance(nd, ScatterSum):
            run.env[nd.name] = (_scatter(run, nd, c.mask), ())
        elif isinstance(nd, Einsum):
            value = _einsum(run, nd, c.mask)
            if ctx is not None and nd.name in (score_node, masked_node):
                value = _around_scores(c.around, ctx, value, nd.name == score_node,
                                       nd.name == masked_node)
            run.env[nd.name] = (value, nd.ranks)
        else:
            scores = run.scores(nd.scores)
            if c.bounds is not None and tiles is not None:
                scores = _apply_bounds(c, run, scores, tiles, ctx)
            value = run.full(run.evaluator(("n", "f"))(nd.value), ("n", "f"))
            out, lse = online_softmax_scan(scores, value)
            run.env[nd.name] = (out, ("m", "f"))
            run.env[nd.lse] = (lse, ("m",))
    return {name: value for name, (value, _) in run.env.items()}


def interpret_backward(bwd: Backward, q, k, v, *, saved: dict, scale: float | None = None,
                       inputs: dict | None = None, residuals: dict | None = None
                       ) -> dict[str, torch.Tensor]:
    """Run autodiff's backward cascade; `saved` maps each Saved role (or its value: "O",
    "LSE", "dO", "dLSE") to its tensor (roles the backward does not read are ignored), and
    `residuals` each forward tensor a general backward reads (`Backward.residuals`; e.g. from
    `intermediates`) to its value. Returns {"dq", "dk", "dv", "d_<param>": gradient}."""
    names = dict(bwd.saved)
    by_name = {names[Saved(role)]: x for role, x in saved.items() if Saved(role) in names}
    by_name.update({decl: (residuals or {})[tensor] for tensor, decl in bwd.residuals})
    return interpret(bwd.cascade, q, k, v, scale=scale, inputs=inputs, saved=by_name)


def _visible(run: _Run, mask, it: tuple[str, ...], over: tuple[str, ...]):
    """The mask over an einsum's iteration [B, H, *it] when it restricts the einsum (it
    reduces or scans over m or n and iterates over both), else None."""
    if mask is None or not {"m", "n"} <= set(it) or not {"m", "n"} & set(over):
        return None
    return run.full(run.evaluator(it)(mask), it).to(torch.bool)


def _einsum(run: _Run, nd: Einsum, mask) -> torch.Tensor:
    it = nd.iteration
    val = run.full(run.evaluator(it)(nd.expr), it)
    if nd.reduce is None:
        return val
    axes = tuple(2 + it.index(r) for r in nd.over)
    visible = _visible(run, mask, it, nd.over)
    if nd.reduce in (Reduce.MAX, Reduce.MIN):
        largest = nd.reduce is Reduce.MAX
        if visible is not None:
            val = val if val.is_floating_point() else val.to(run.q.dtype)
            empty = torch.full_like(val, -math.inf if largest else math.inf)
            val = torch.where(visible, val, empty)
        return extremum(val, axes, largest)
    if visible is not None:
        val = torch.where(visible, val, torch.zeros_like(val))
    if nd.reduce is Reduce.SUM:
        return val.sum(dim=axes)
    (axis,) = axes
    if nd.reduce is Reduce.CUMSUM:
        return val.cumsum(axis)
    return val.flip(axis).cumsum(axis).flip(axis)


def _sum_groups(grads: dict, kv_heads: int) -> dict:
    """dk and dv per query head -> per k/v head: GQA sums each group's heads."""
    for role in ("dk", "dv"):
        if role in grads:
            g = grads[role]
            grads[role] = g.view(g.shape[0], kv_heads, g.shape[1] // kv_heads,
                                 *g.shape[2:]).sum(2)
    return grads


def _scatter(run: _Run, nd: ScatterSum, mask) -> torch.Tensor:
    """A param's gradient: each term's value over (b, h) and the ranks m, n it uses, summed
    into its index (over the visible pairs of a masked cascade when it uses both)."""
    param = run.inputs[nd.param]
    total = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
    for index, value in nd.terms:
        used = set().union(*(sympy.sympify(x).free_symbols for x in (value, *index)))
        ranks = tuple(r for r in ("m", "n") if S.RANKS[r] in used)
        ev = run.evaluator(ranks)
        val = run.full(ev(value), ranks)
        visible = _visible(run, mask, ranks, ranks)
        if visible is not None:
            val = torch.where(visible, val, torch.zeros_like(val))
        total += scatter_sum(val, [ev(i) for i in index], param.shape)
    return total.to(param.dtype)


def online_softmax_scan(scores: torch.Tensor, value: torch.Tensor):
    """The OnlineSoftmax node's semantics, literally: one key at a time."""
    state = _softmax_start(scores.shape[:-1], value.shape[-1], scores)
    for j in range(scores.shape[-1]):
        state = _softmax_update(*state, scores[..., j:j + 1], value[..., j:j + 1, :])
    return _softmax_finish(*state)


State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _softmax_start(rows: tuple[int, ...], dv: int, like: torch.Tensor) -> State:
    """Running max, denominator and numerator before any key."""
    rm = torch.full(rows, -math.inf, dtype=like.dtype, device=like.device)
    return rm, torch.zeros_like(rm), torch.zeros(*rows, dv, dtype=like.dtype, device=like.device)


def _softmax_update(rm, rd, rnv, s, value) -> State:
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


def _apply_bounds(c: Cascade, run: _Run, scores, tiles, ctx: AR.Context | None = None):
    """Drop keys outside visited tiles; use the unmasked score on full tiles (premixed and
    restricted to the gathered keys, as the masked scores are, when `ctx`)."""
    assert c.bounds is not None
    bm, bn = tiles
    plan = torch.zeros(run.M, run.N, dtype=torch.int8, device=scores.device)
    for i, visits in enumerate(tile_schedule(c.bounds.segments, run.M, run.N, bm, bn)):
        for start, masked in visits:
            plan[i * bm:(i + 1) * bm, start:start + bn] = 2 if masked else 1
    score = c.bounds.score
    assert score is not None
    unmasked = run.scores(score)
    if ctx is not None:
        # premixed already when it reads the scores node itself
        premix = all(str(a.base) != _hooks(c)[0] for a in score.atoms(sympy.Indexed))
        unmasked = _around_scores(c.around, ctx, unmasked, premix, True)
    eff = torch.where(plan == 1, unmasked, scores)
    return torch.where(plan == 0, torch.full_like(eff, -math.inf), eff)


def _tile_scores(kernel, run: _Run, rows, cols, masked: bool, ctx: AR.Context | None = None):
    """(evaluator, scores [B, H, rows, cols]) of one tile: q.k, the loads, the score (premixed
    over the heads), the mask where the tile is masked, and the gathered keys (with `ctx`, the
    call's context for what is around the score)."""
    ev = run.evaluator(("m", "n"), {
        S.m: _axis(rows, 2, 4), S.n: _axis(cols, 3, 4),
        S.qk: run.q[:, :, rows] @ run.k[:, :, cols].transpose(-1, -2)})
    for ld in kernel.loads:
        ev.values[ld.symbol] = gather(run.inputs[ld.tensor], [ev(x) for x in ld.index])
    s = ev.tensor(ev(kernel.score)).expand(run.B, run.H, len(rows), len(cols))
    # a score of -oo is a mask false everywhere, folded in by fuse: nothing to mix
    if ctx is not None and kernel.around.premix is not None and kernel.score != -sympy.oo:
        s = AR.mix(kernel.around.premix, s, ctx, rows)
    if masked and kernel.mask is not None:
        s = torch.where(ev.tensor(ev(kernel.mask)), s, torch.full_like(s, -math.inf))
    if ctx is not None and kernel.around.gather is not None:
        seen = AR.visible(kernel.around, ctx)[:, :, rows][:, :, :, cols]
        s = torch.where(seen, s, torch.full_like(s, -math.inf))
    return ev, s


def run_kernel(kernel, q, k, v, *, scale: float | None = None, inputs: dict | None = None,
               tiles: tuple[int, int] = (16, 16)) -> dict[str, torch.Tensor]:
    """Execute an AttentionKernel tile by tile, as the generated code does: the same key-tile
    schedule, the mask only on masked tiles, the same online-softmax update (with postmix, a
    second sweep over the same tiles sums the mixed normalized weights times the values)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    around, ctx = kernel.around, None
    if not around.plain:
        ctx = AR.Context(q, k, inputs or {})
        q, k, v = AR.joint_operands(around, q, k, v, ctx)
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
            _, s = _tile_scores(kernel, run, rows, cols, masked, ctx)
            state = _softmax_update(*state, s, run.v[:, :, cols])
        out[:, :, rows], lse[:, :, rows] = _softmax_finish(*state)
    if ctx is not None and around.postmix is not None:
        out = torch.zeros_like(out)
        safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        for i, visits in enumerate(tile_schedule(kernel.segments, M, N, bm, bn)):
            rows = torch.arange(i * bm, min(i * bm + bm, M), device=q.device)
            for start, masked in visits:
                cols = torch.arange(start, min(start + bn, N), device=q.device)
                _, s = _tile_scores(kernel, run, rows, cols, masked, ctx)
                w = AR.mix(around.postmix, torch.exp(s - safe[:, :, rows, None]), ctx, rows)
                out[:, :, rows] += w @ run.v[:, :, cols]
    if ctx is not None:
        out = _gated(around, out, ctx)
    return {"out": out, "lse": lse}


def run_kernel_backward(kernel, q, k, v, *, saved: dict, scale: float | None = None,
                        inputs: dict | None = None, tiles: tuple[int, int] = (16, 16)
                        ) -> dict[str, torch.Tensor]:
    """Execute an AttentionKernel's backward tile by tile, as the generated kernels do: dq and
    the m- or (b, h)-indexed param sums over the forward's key tiles per query tile; dk, dv and
    the n-indexed param sums over the transposed query tiles per key tile; the mask only on
    masked tiles; p recomputed from the saved lse. `saved` holds O, LSE, dO, dLSE; returns dq,
    dk, dv (summed over GQA groups) and d_<param> for every param."""
    if not kernel.around.plain:
        raise ValueError(f"run_kernel_backward: {kernel.name} has operands, prologues, a gate, "
                         "a head map, a gather or head mixing around its score, which only "
                         "run_kernel applies; differentiate run_kernel with torch autograd")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    run = _Run((), q, k, v, scale, inputs or {})
    bm, bn = tiles
    M, N = run.M, run.N
    lse = saved["LSE"]
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    delta = (saved["dO"] * saved["O"]).sum(-1) - saved["dLSE"]
    loads = {ld.name: ld for ld in kernel.loads}
    grads = {"dq": torch.zeros_like(run.q), "dk": torch.zeros_like(run.k),
             "dv": torch.zeros_like(run.v)}
    params = {d.name: torch.zeros(run.inputs[d.name].shape, dtype=torch.float64,
                                  device=q.device) for d in kernel.inputs
              if d.kind is TensorKind.PARAM}

    def tile(rows, cols, masked, levels):
        ev, s = _tile_scores(kernel, run, rows, cols, masked)
        p = torch.exp(s - lse[:, :, rows, None])
        dp = saved["dO"][:, :, rows] @ run.v[:, :, cols].transpose(-1, -2)
        ds = p * (dp - delta[:, :, rows, None])
        for name, deriv in kernel.grad.dloads:
            ld = loads[name]
            if ld.level in levels and ld.tensor in params:
                value = torch.where(p > 0, ds * ev.tensor(ev(deriv)), torch.zeros_like(ds))
                params[ld.tensor] += scatter_sum(value, [ev(x) for x in ld.index],
                                                 params[ld.tensor].shape)
        return p, ds * ev.tensor(ev(kernel.grad.dqk))

    for i, visits in enumerate(tile_schedule(kernel.segments, M, N, bm, bn)):
        rows = torch.arange(i * bm, min(i * bm + bm, M), device=q.device)
        for start, masked in visits:
            cols = torch.arange(start, min(start + bn, N), device=q.device)
            _, dqk = tile(rows, cols, masked, (LoadLevel.PROGRAM, LoadLevel.ROW, LoadLevel.TILE))
            grads["dq"][:, :, rows] += dqk @ run.k[:, :, cols]
    for j, visits in enumerate(query_tile_schedule(kernel.grad.rows, M, N, bm, bn)):
        cols = torch.arange(j * bn, min(j * bn + bn, N), device=q.device)
        for start, masked in visits:
            rows = torch.arange(start, min(start + bm, M), device=q.device)
            p, dqk = tile(rows, cols, masked, (LoadLevel.KEY,))
            grads["dv"][:, :, cols] += p.transpose(-1, -2) @ saved["dO"][:, :, rows]
            grads["dk"][:, :, cols] += dqk.transpose(-1, -2) @ run.q[:, :, rows]
    _sum_groups(grads, k.shape[1])
    grads.update({f"d_{name}": g.to(run.inputs[name].dtype) for name, g in params.items()})
    return grads
