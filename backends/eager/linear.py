"""Element-form values of a scan in torch: what the linear kernels' eager prologue computes.

Element-form values are tensors whose last two dims are the feature axes (i: DK or 1,
j: DV or 1); the dims before are the batch (b, h) and, for whole-sequence values, t. The
`environment` of a scan holds q, k, v, the per-step inputs and the params in that form, as an
Evaluator over which any expression of the scan (an update, the output, a chunk plan's key or
decay) evaluates. Also here: the built-in feature maps, which run before the kernels, and the
layouts of states ([N, H, I|1, J|1] inside, [N, H, DK, DV] / [N, H, DK] / ... in public).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnc.backends.eager.evaluate import Evaluator
from attnc.expr import symbols as S
from attnc.expr.symbols import DK, DV, T, i, j, t
from attnc.ir.linear import (FeatureMapKind, LinearScan, Readout, StateDecl, StatePlan, read,
                             step_axes)


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
        mapped[mp.target] = taylor2(x) if mp.fn is FeatureMapKind.TAYLOR2 else \
            hedgehog(x, *(inputs[p] for p in mp.params))
    return mapped["q"], mapped["k"]


def feature_dim(scan: LinearScan, q, inputs: dict) -> int:
    """DK: q's head dim after the feature maps (the maps run on zero rows of q)."""
    empty = torch.zeros(q.shape[:2] + (0, q.shape[-1]), device=q.device)
    return apply_maps(scan, empty, empty, inputs)[0].shape[-1]


# --- environments ------------------------------------------------------------------------------
def environment(scan: LinearScan, q, k, v, inputs: dict, scale: float, step=None,
                positions: torch.Tensor | None = None) -> Evaluator:
    """Values of q, k, v, per-step inputs and params, shaped [B, H, (T,) I|1, J|1].

    With `step` the per-step tensors are taken at that step (no T dim); without, whole sequences
    (`positions`: each step's t, for sequences packed along T; default 0..T-1).
    """
    B, H, Tn, dk = q.shape
    env: dict = {S.scale: scale, S.H: H, DK: dk, DV: v.shape[-1]}
    seq = (lambda x: x[:, :, step]) if step is not None else (lambda x: x)
    env[read("q", ("i",))] = seq(q)[..., :, None]
    env[read("k", ("i",))] = seq(k)[..., :, None]
    env[read("v", ("j",))] = seq(v)[..., None, :]
    lead = (1, H) + (() if step is not None else (1,))
    # positions stay integers (t % 4 is integer modulo; in bf16, t = 257 would round to 256)
    env[S.h] = torch.arange(H, device=q.device).view(*lead, 1, 1)
    if step is not None:
        env[t] = int(step)
    else:
        pos = torch.arange(Tn, device=q.device) if positions is None else positions
        env[t] = pos.long().view(1, 1, Tn, 1, 1)
    for d in scan.step_tensors:
        if d.name not in inputs:
            continue
        x = inputs[d.name]
        axes = step_axes(d)
        if T in d.dims:
            x = seq(x)
        elif d.dims and d.dims[0] == S.H:  # per head: [H, features...] -> [1, H, ...]
            x = x.unsqueeze(0)
            if step is None:
                x = x.unsqueeze(2)
        elif d.dims and d.dims[0] == S.B:  # per (b, h)
            if step is None:
                x = x.unsqueeze(2)
        env[read(d.name, axes)] = _feature_dims(x, axes)
    return Evaluator(env, q, axes={i: (-2, dk), j: (-1, v.shape[-1])})


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


# --- the chunked form's inputs -----------------------------------------------------------------
@dataclass(frozen=True)
class ChunkInputs:
    """One state's inputs to the chunked form: key and log decay [B, H, T, K] (a scalar decay
    repeated over K), value [B, H, T, V], a query [B, H, T, K] per readout of the state
    (`readers`), beta [B, H, T] for delta rules (else None)."""

    readers: tuple[Readout, ...]
    key: torch.Tensor
    value: torch.Tensor
    queries: tuple[torch.Tensor, ...]
    logd: torch.Tensor
    beta: torch.Tensor | None


def chunk_inputs(scan: LinearScan, plan: StatePlan, ev: Evaluator, shape: tuple,
                 like: torch.Tensor) -> ChunkInputs:
    """A state's ChunkInputs from a whole-sequence environment. `shape` is (B, H, T, K, V)
    with K = DK and V = DV or 1 for a vector state."""
    assert scan.schedule is not None
    readers = tuple(r for r in scan.schedule.readouts if r.state == plan.state)
    return ChunkInputs(
        readers=readers,
        key=_seq(ev(plan.key), shape, -1, like),
        value=_seq(ev(plan.value), shape, -2, like),
        queries=tuple(_seq(ev(r.query), shape, -1, like) for r in readers),
        logd=_seq(ev(plan.log_decay), shape, -1, like),
        beta=_seq(ev(plan.beta), shape, -1, like)[..., 0] if plan.kind.delta else None)


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


# --- the recurrence ----------------------------------------------------------------------------
SEGMENT = 64  # steps between the states a checkpointed recurrence keeps


def recurrence(scan: LinearScan, q, k, v, inputs: dict, scale: float | None = None,
               initial_state: dict | None = None, checkpoint: bool = False):
    """The scan's meaning, step by step: (o [B, H, T, DV], final states {name: public
    shape}).

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
            ev = environment(scan, q, k, v, inputs, scale, step)
            for u in scan.updates:
                ev.values.update({read(n, scan.state(n).axes): x for n, x in now.items()})
                now[u.state] = ev.floating(ev(u.expr)).to(q.dtype).expand(
                    state_shape(scan.state(u.state), B, H, dk, dv))
            ev.values.update({read(n, scan.state(n).axes): x for n, x in now.items()})
            outs.append(ev.floating(ev(scan.output)).expand(B, H, 1, dv)[:, :, 0])
        return (torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, dv),
                *(now[n] for n in names))

    pieces = []
    for start in range(0, Tn, SEGMENT):
        args = (start, min(start + SEGMENT, Tn), *(states[n] for n in names))
        o, *carried = maybe_checkpoint(checkpoint, segment, *args)
        states = dict(zip(names, carried))
        pieces.append(o)
    o = torch.cat(pieces, dim=2) if pieces else v.new_zeros(B, H, 0, dv)
    return o, {s.name: public_state(s, states[s.name]) for s in scan.states}


def maybe_checkpoint(on: bool, fn, *args):
    if on and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
