"""Eager torch semantics of a LinearScan: the reference interpreter and the chunked form.

`interpret` runs the scan's recurrence step by step: the meaning every later stage must keep.
`interpret_chunked` runs the schedule `chunk_scan` chose (intra-chunk masked products with
decay, state passing between chunks, the WY/UT form for delta rules); tests check the two agree.
Both are differentiable, so the chunked form (or the recurrence, for a sequential scan) is
also the backward of the fused kernels: autograd through a recomputation, chunk by chunk.

Element-form values are tensors whose last two dims are the feature axes (i: DK or 1,
j: DV or 1); the dims before are the batch (b, h) and, for whole-sequence values, t.
"""

from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F

from attnc import symbols as S
from attnc.linear_ir import DK, DV, LinearScan, Schedule, StateDecl, T, i, read, step_axes, t

_UNARY = {sympy.exp: torch.exp, sympy.log: torch.log, sympy.tanh: torch.tanh,
          sympy.sin: torch.sin, sympy.cos: torch.cos, sympy.Abs: torch.abs,
          S.sigmoid: torch.sigmoid, S.softplus: F.softplus, S.elu: F.elu}


def evaluate(ex: sympy.Expr, env: dict) -> torch.Tensor | float:
    """Evaluate an element-form expression; `env` maps accesses and symbols to values."""
    if ex in env:
        return env[ex]
    if ex.is_Number:
        return float(ex)
    if ex is sympy.true or ex is sympy.false:
        return bool(ex)
    if isinstance(ex, sympy.Sum):  # one limit per contraction (sympy merges nested sums)
        body = evaluate(ex.args[0], env)
        for axis, *_ in ex.args[1:]:
            dim = -2 if axis == i else -1
            if not torch.is_tensor(body) or body.shape[dim] == 1:
                body = body * env[DK if axis == i else DV]
            else:
                body = body.sum(dim=dim, keepdim=True)
        return body
    args = [evaluate(a, env) for a in ex.args]
    if ex.is_Add:
        return sum(args[1:], args[0])
    if ex.is_Mul:
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if ex.is_Pow:
        base, exp = args
        if not torch.is_tensor(base):
            return torch.pow(torch.as_tensor(base, dtype=torch.float64), exp) \
                if not torch.is_tensor(exp) else torch.pow(base, exp)
        return base ** exp
    if ex.func in _UNARY:
        x = args[0]
        if not torch.is_tensor(x):
            x = torch.tensor(float(x), dtype=torch.float64)
        return _UNARY[ex.func](x)
    if isinstance(ex, sympy.floor):
        return torch.floor(_tensor(args[0]))
    if isinstance(ex, sympy.Mod):
        return torch.remainder(_tensor(args[0]), _tensor(args[1]))
    if isinstance(ex, (sympy.Max, sympy.Min)):
        out = _tensor(args[0])
        for a in args[1:]:
            out = torch.maximum(out, _tensor(a)) if isinstance(ex, sympy.Max) \
                else torch.minimum(out, _tensor(a))
        return out
    if isinstance(ex, sympy.Piecewise):
        out = _tensor(evaluate(ex.args[-1][0], env))
        for value, cond in reversed(ex.args[:-1]):
            out = torch.where(_tensor(evaluate(cond, env)), _tensor(evaluate(value, env)), out)
        return out
    rel = {sympy.Lt: torch.lt, sympy.Le: torch.le, sympy.Gt: torch.gt, sympy.Ge: torch.ge,
           sympy.Eq: torch.eq, sympy.Ne: torch.ne}
    if ex.func in rel:
        return rel[ex.func](_tensor(args[0]), _tensor(args[1]))
    if isinstance(ex, sympy.And):
        return _reduce(torch.logical_and, args)
    if isinstance(ex, sympy.Or):
        return _reduce(torch.logical_or, args)
    if isinstance(ex, sympy.Not):
        return torch.logical_not(_tensor(args[0]))
    raise NotImplementedError(f"cannot evaluate {ex.func.__name__} in {ex}")


def _tensor(x):
    return x if torch.is_tensor(x) else torch.tensor(x)


def _reduce(fn, args):
    out = _tensor(args[0])
    for a in args[1:]:
        out = fn(out, _tensor(a))
    return out


# --- feature maps (prologue) -------------------------------------------------------------------
def taylor2(x: torch.Tensor) -> torch.Tensor:
    """[1, x / d^(1/4), vec(x x^T) / sqrt(2 d)]: phi(a).phi(b) = 1 + a.b/sqrt(d) + (a.b)^2/(2d),
    the second-order Taylor expansion of exp(a.b / sqrt(d)) (BASED)."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, outer], dim=-1)


def hedgehog(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Hedgehog's learned map: [softmax(x W_h), softmax(-x W_h)] with W [H, D, F]."""
    y = torch.einsum("bhtd,hdf->bhtf", x, w.to(x.dtype))
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], dim=-1)


def apply_maps(scan: LinearScan, q, k, inputs: dict):
    mapped = {"q": q, "k": k}
    for mp in scan.maps:
        x = mapped[mp.target]
        mapped[mp.target] = taylor2(x) if mp.fn == "taylor2" else \
            hedgehog(x, *(inputs[p] for p in mp.params))
    return mapped["q"], mapped["k"]


def feature_dim(scan: LinearScan, q, inputs: dict) -> int:
    """DK: q's head dim after the feature maps (the maps run on zero rows of q)."""
    empty = torch.zeros(q.shape[:2] + (0, q.shape[-1]), device=q.device)
    return apply_maps(scan, empty, empty, inputs)[0].shape[-1]


# --- environments ------------------------------------------------------------------------------
def environment(scan: LinearScan, q, k, v, inputs: dict, scale: float, step=None,
                positions: torch.Tensor | None = None) -> dict:
    """Values of q, k, v, per-step inputs and params, shaped [B, H, (T,) I|1, J|1].

    With `step` the per-step tensors are taken at that step (no T dim); without, whole sequences
    (`positions`: each step's t, for sequences packed along T; default 0..T-1).
    """
    B, H, Tn, dk = q.shape
    env = {S.scale: scale, S.H: H, DK: dk, DV: v.shape[-1]}
    seq = (lambda x: x[:, :, step]) if step is not None else (lambda x: x)
    env[read("q", ("i",))] = seq(q)[..., :, None]
    env[read("k", ("i",))] = seq(k)[..., :, None]
    env[read("v", ("j",))] = seq(v)[..., None, :]
    lead = (1, H) + (() if step is not None else (1,))
    env[S.h] = torch.arange(H, device=q.device, dtype=q.dtype).view(*lead, 1, 1)
    if step is not None:
        env[t] = float(step)
    else:
        pos = torch.arange(Tn, device=q.device) if positions is None else positions
        env[t] = pos.to(q.dtype).view(1, 1, Tn, 1, 1)
    for d in scan.decls:
        if d.name not in inputs or any(mp.params and d.name in mp.params for mp in scan.maps):
            continue
        x = inputs[d.name]
        axes = step_axes(d)
        if T in d.dims:
            x = seq(x)
        elif d.dims and d.dims[0] == S.H:  # per-head
            x = x.view(*((1, H) + (1,) * (x.dim() - 1)))
            if step is None:
                x = x.unsqueeze(2)
        elif d.dims and d.dims[0] == S.B:  # per (b, h)
            if step is None:
                x = x.unsqueeze(2)
        x = _feature_dims(x, axes)
        env[read(d.name, axes)] = x
    return env


def _feature_dims(x, axes):
    if axes == ("i",):
        return x[..., :, None]
    if axes == ("j",):
        return x[..., None, :]
    if axes == ("i", "j"):
        return x
    return x[..., None, None]


def state_shape(s: StateDecl, B, H, dk, dv) -> tuple:
    return (B, H, dk if "i" in s.axes else 1, dv if "j" in s.axes else 1)


def public_state(s: StateDecl, x: torch.Tensor) -> torch.Tensor:
    """[B, H, I|1, J|1] -> [B, H, DK, DV] / [B, H, DK] / [B, H, DV] / [B, H]."""
    if s.axes == ("i", "j"):
        return x
    if s.axes == ("i",):
        return x[..., 0]
    if s.axes == ("j",):
        return x[..., 0, :]
    return x[..., 0, 0]


def internal_state(s: StateDecl, x: torch.Tensor) -> torch.Tensor:
    return _feature_dims(x, s.axes)


def initial_states(scan: LinearScan, initial: dict | None, B, H, dk, dv, like) -> dict:
    out = {}
    for s in scan.states:
        shape = state_shape(s, B, H, dk, dv)
        x = (initial or {}).get(s.name)
        out[s.name] = torch.zeros(shape, dtype=like.dtype, device=like.device) if x is None \
            else internal_state(s, x.to(like.dtype)).expand(shape)
    return out


# --- the recurrence ----------------------------------------------------------------------------
def interpret(scan: LinearScan, q, k, v, inputs: dict, scale: float | None = None,
              initial_state: dict | None = None, checkpoint: bool = False):
    """The scan's meaning: (o [B, H, T, DV], final states {name: public shape}).

    With `checkpoint`, autograd keeps only the states between segments of SEGMENT steps and
    recomputes the steps inside a segment during backward."""
    q, k = apply_maps(scan, q, k, inputs)
    B, H, Tn, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    states = initial_states(scan, initial_state, B, H, dk, dv, q)
    names = [s.name for s in scan.states]

    def segment(start, stop, *carried):
        now = dict(zip(names, carried))
        outs = []
        for step in range(start, stop):
            env = environment(scan, q, k, v, inputs, scale, step)
            for u in scan.updates:
                env.update({read(n, scan.state(n).axes): x for n, x in now.items()})
                new = evaluate(u.expr, env)
                now[u.state] = _tensor(new).to(q.dtype).expand(
                    state_shape(scan.state(u.state), B, H, dk, dv))
            env.update({read(n, scan.state(n).axes): x for n, x in now.items()})
            outs.append(_tensor(evaluate(scan.output, env)).expand(B, H, 1, dv)[:, :, 0])
        return (torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, dv),
                *(now[n] for n in names))

    pieces = []
    for start in range(0, Tn, SEGMENT):
        args = (start, min(start + SEGMENT, Tn), *(states[n] for n in names))
        o, *carried = _maybe_checkpoint(checkpoint, segment, *args)
        states = dict(zip(names, carried))
        pieces.append(o)
    o = torch.cat(pieces, dim=2) if pieces else v.new_zeros(B, H, 0, dv)
    return o, {s.name: public_state(s, states[s.name]) for s in scan.states}


SEGMENT = 64


def _maybe_checkpoint(on: bool, fn, *args):
    if on and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# --- the chunked form --------------------------------------------------------------------------
def interpret_chunked(scan: LinearScan, q, k, v, inputs: dict, scale: float | None = None,
                      initial_state: dict | None = None, chunk: int = 16,
                      checkpoint: bool = False):
    """The schedule's chunked form; same results as `interpret` (up to rounding)."""
    sch: Schedule = scan.schedule
    assert sch is not None and sch.chunked, "interpret_chunked needs a chunked schedule"
    q, k = apply_maps(scan, q, k, inputs)
    B, H, Tn, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    env = environment(scan, q, k, v, inputs, scale)
    init = initial_states(scan, initial_state, B, H, dk, dv, q)
    finals, values = {}, {}
    for plan in sch.states:
        s = scan.state(plan.state)
        x = chunk_inputs(scan, plan, env, (B, H, Tn) + state_shape(s, B, H, dk, dv)[2:], q)
        if x["beta"] is not None:
            reads_, final = chunk_delta(x["queries"], x["key"], x["value"], x["logd"][..., 0],
                                        x["beta"], init[plan.state], chunk, checkpoint)
        else:
            reads_, final = chunk_decay(x["queries"], x["key"], x["value"], x["logd"],
                                        init[plan.state], chunk, checkpoint)
        finals[plan.state] = public_state(s, final)
        for r, read_ in zip(x["readers"], reads_):
            values[r.symbol] = read_[..., None, :]
    env.update(values)
    o = _tensor(evaluate(sch.output, env)).expand(B, H, Tn, 1, dv)[..., 0, :]
    return o, finals


def chunk_inputs(scan: LinearScan, plan, env: dict, shape: tuple, like) -> dict:
    """One state's inputs to the chunked form, from a whole-sequence environment: key and
    log decay [B, H, T, K] (a scalar decay repeated over K), value [B, H, T, V], a query
    [B, H, T, K] per readout of the state (`readers`), beta [B, H, T] for delta rules (else None).
    `shape` is (B, H, T, K, V) with K = DK and V = DV or 1 for a vector state."""
    readers = [r for r in scan.schedule.readouts if r.state == plan.state]
    delta = plan.kind in ("delta_rule", "gated_delta_rule")
    return {"readers": readers,
            "key": _seq(evaluate(plan.key, env), shape, -1, like),
            "value": _seq(evaluate(plan.value, env), shape, -2, like),
            "queries": [_seq(evaluate(r.query, env), shape, -1, like) for r in readers],
            "logd": _seq(evaluate(plan.log_decay, env), shape, -1, like),
            "beta": _seq(evaluate(plan.beta, env), shape, -1, like)[..., 0] if delta else None}


def _seq(x, shape, axis, like) -> torch.Tensor:
    """An element-form whole-sequence value [B, H, T, I|1, J|1] as the chunk algorithm's
    [B, H, T, I] (axis -1: a key-side value) or [B, H, T, J] (axis -2: a value-side value)."""
    full = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    B, H, Tn, I, J = shape
    full = full.expand(B, H, Tn, full.shape[-2] if full.dim() == 5 else 1,
                       full.shape[-1] if full.dim() == 5 else 1) if full.dim() == 5 \
        else full.expand(B, H, Tn, 1, 1)
    if axis == -1:
        return full[..., 0].expand(B, H, Tn, I) if full.shape[-2] == 1 else full[..., 0]
    return full[..., 0, :].expand(B, H, Tn, J) if full.shape[-1] == 1 else full[..., 0, :]


def _chunks(x: torch.Tensor, chunk: int, time_dim: int = 2) -> torch.Tensor:
    Tn = x.shape[time_dim]
    pad = (-Tn) % chunk
    if pad:
        widths = [0, 0] * (x.dim() - time_dim - 1) + [0, pad]
        x = F.pad(x, widths)
    return x.unflatten(time_dim, (-1, chunk))


def chunk_decay(queries, key, value, logd, S0, chunk: int, checkpoint: bool = False):
    """S_t = diag(exp(logd_t)) S_{t-1} + key_t value_t^T; readouts x_t^T S_t per query.

    key/logd/queries [B, H, T, K], value [B, H, T, V], S0 [B, H, K, V]. With `checkpoint`,
    autograd keeps only the state between chunks."""
    Tn = key.shape[2]
    kc, vc, gc = _chunks(key, chunk), _chunks(value, chunk), _chunks(logd, chunk)
    xcs = [_chunks(x, chunk) for x in queries]
    state, outs = S0, [[] for _ in queries]
    for c in range(kc.shape[2]):
        state, *reads = _maybe_checkpoint(checkpoint, _decay_chunk, state, kc[:, :, c],
                                          vc[:, :, c], gc[:, :, c], *(x[:, :, c] for x in xcs))
        for out, r in zip(outs, reads):
            out.append(r)
    return [torch.cat(o, dim=2)[:, :, :Tn] for o in outs], state


def _decay_chunk(state, k, v, g, *queries):
    C = k.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    G = g.cumsum(-2)                                # [B, H, C, K]
    diff = G[..., :, None, :] - G[..., None, :, :]  # [B, H, C(t), C(s), K]
    decay = torch.exp(diff.masked_fill(~causal[..., None], float("-inf")))
    reads = []
    for xq in queries:
        inter = (xq * torch.exp(G)) @ state
        scores = torch.einsum("bhtk,bhsk,bhtsk->bhts", xq, k, decay)
        reads.append(inter + scores @ v)
    last = G[..., -1:, :]
    state = torch.exp(last[..., 0, :])[..., None] * state + \
        (k * torch.exp(last - G)).transpose(-1, -2) @ v
    return (state, *reads)


def chunk_delta(queries, key, value, logd, beta, S0, chunk: int, checkpoint: bool = False):
    """S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with a_t = exp(logd_t), by the
    WY/UT form: per chunk, delta = T (beta V) - T (beta Gamma K) S0 with the unit lower triangular
    T = (I + tril(diag(beta) (Gamma_t / Gamma_s) K K^T, -1))^-1.

    key/queries [B, H, T, K], value [B, H, T, V], logd/beta [B, H, T], S0 [B, H, K, V]."""
    Tn = key.shape[2]
    kc, vc = _chunks(key, chunk), _chunks(value, chunk)
    gc, bc = _chunks(logd, chunk), _chunks(beta, chunk)
    xcs = [_chunks(x, chunk) for x in queries]
    state, outs = S0, [[] for _ in queries]
    for c in range(kc.shape[2]):
        state, *reads = _maybe_checkpoint(checkpoint, _delta_chunk, state, kc[:, :, c],
                                          vc[:, :, c], gc[:, :, c], bc[:, :, c],
                                          *(x[:, :, c] for x in xcs))
        for out, r in zip(outs, reads):
            out.append(r)
    return [torch.cat(o, dim=2)[:, :, :Tn] for o in outs], state


def _delta_chunk(state, k, v, g, b, *queries):
    C = k.shape[2]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    strict = lower & ~eye.bool()
    G = g.cumsum(-1)                                # [B, H, C]
    ratio = G[..., :, None] - G[..., None, :]
    L = torch.where(strict, torch.exp(ratio.masked_fill(~strict, 0.0)) * (k @ k.transpose(-1, -2)),
                    0.0)
    unit = eye + b[..., :, None] * L
    U = torch.linalg.solve_triangular(unit, b[..., None] * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(unit, (b * torch.exp(G))[..., None] * k, upper=False,
                                      unitriangular=True)
    delta = U - W @ state
    decay = torch.where(lower, torch.exp(ratio.masked_fill(~lower, 0.0)), 0.0)
    reads = [torch.exp(G)[..., None] * (xq @ state) + ((xq @ k.transpose(-1, -2)) * decay) @ delta
             for xq in queries]
    last = G[..., -1:]
    state = torch.exp(last)[..., None] * state + \
        (k * torch.exp(last - G)[..., None]).transpose(-1, -2) @ delta
    return (state, *reads)
