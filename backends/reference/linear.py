"""The reference interpreters of a LinearScan: its recurrence and its chunked form.

`interpret` runs the scan's recurrence step by step: the meaning every later stage must keep
(it is backends/eager/linear.py's `recurrence`, which the kernels' eager fallback backward
differentiates too).
`interpret_chunked` runs the schedule `chunk_scan` chose (intra-chunk masked products with
decay, state passing between chunks, the WY/UT form for delta rules); tests check the two agree.
Both are differentiable. Element-form values come from backends/eager/linear.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnc.backends.eager.linear import (apply_maps, chunk_inputs, environment, initial_states,
                                         maybe_checkpoint, public_state, state_shape)
from attnc.backends.eager.linear import recurrence as interpret
from attnc.ir.linear import LinearScan

__all__ = ["interpret", "interpret_chunked", "chunk_decay", "chunk_delta"]


# --- the chunked form --------------------------------------------------------------------------
def interpret_chunked(scan: LinearScan, q, k, v, inputs: dict, scale: float | None = None,
                      initial_state: dict | None = None, chunk: int = 16,
                      checkpoint: bool = False):
    """The schedule's chunked form; same results as `interpret` (up to rounding)."""
    sch = scan.schedule
    assert sch is not None and sch.chunked, "interpret_chunked needs a chunked schedule"
    q, k = apply_maps(scan, q, k, inputs)
    B, H, Tn, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    ev = environment(scan, q, k, v, inputs, scale)
    init = initial_states(scan, initial_state, B, H, dk, dv, q)
    finals, values = {}, {}
    for plan in sch.states:
        s = scan.state(plan.state)
        x = chunk_inputs(scan, plan, ev, (B, H, Tn) + state_shape(s, B, H, dk, dv)[2:], q)
        if x.beta is not None:
            reads_, final = chunk_delta(x.queries, x.key, x.value, x.logd[..., 0], x.beta,
                                        init[plan.state], chunk, checkpoint)
        else:
            reads_, final = chunk_decay(x.queries, x.key, x.value, x.logd, init[plan.state],
                                        chunk, checkpoint)
        finals[plan.state] = public_state(s, final)
        for r, read_ in zip(x.readers, reads_):
            values[r.symbol] = read_[..., None, :]
    ev.values.update(values)
    o = ev.floating(ev(sch.output)).expand(B, H, Tn, 1, dv)[..., 0, :]
    return o, finals


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
    state = S0
    outs: list[list[torch.Tensor]] = [[] for _ in queries]
    for c in range(kc.shape[2]):
        state, *reads = maybe_checkpoint(checkpoint, _decay_chunk, state, kc[:, :, c],
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
    state = S0
    outs: list[list[torch.Tensor]] = [[] for _ in queries]
    for c in range(kc.shape[2]):
        state, *reads = maybe_checkpoint(checkpoint, _delta_chunk, state, kc[:, :, c],
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
