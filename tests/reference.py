"""Independent eager-PyTorch references for the library variants (variants/*.attn).

Written directly from each variant's math with dense float64 tensors; nothing here uses attnc's
IR, passes or interpreters. They are differentiable (torch autograd through them is the oracle
for gradients): q, k, v and params keep their autograd history. Each function takes
q [B, Hq, M, D], k [B, Hkv, N, D],
v [B, Hkv, N, Dv], a keyword `scale` (None = 1/sqrt(D)), the variant's params/inputs and option
overrides, and returns (out [B, Hq, M, Dv] float64, lse [B, Hq, M] float64). A query row that
sees no key gives out = 0 and lse = -inf.
"""

from __future__ import annotations

import math

import torch

DEFAULTS = {
    "full": {},
    "causal": {},
    "sliding_window": {"window": 256},
    "alibi": {},
    "softcap": {"cap": 50.0},
    "streaming": {"sinks": 4, "window": 256},
    "prefix_lm": {"prefix": 64},
    "document": {},
    "rel_bias": {"max_distance": 128},
    "neighborhood_1d": {"kernel_size": 7},
    "dilated": {"window": 64, "dilation": 2},
    "chunked_local": {"chunk": 128},
    "zerotuning": {},
}


# --- shared pieces ---------------------------------------------------------------------------
def _prepare(q, k, v, scale):
    """float64 copies with k/v expanded to the query heads (GQA: head h reads kv head h // g)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    Hq, Hkv = q.shape[1], k.shape[1]
    assert Hq % Hkv == 0
    g = Hq // Hkv
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return q, k, v, scale


def _dot(q, k):
    return torch.einsum("bhmd,bhnd->bhmn", q, k)


def _positions(M, N):
    m = torch.arange(M).view(M, 1)
    n = torch.arange(N).view(1, N)
    return m, n


def masked_softmax(s, mask, v):
    """softmax over keys of score s [B,H,M,N] restricted to mask (broadcastable), times v.

    Rows with no visible key: out 0, lse -inf.
    """
    mask = torch.broadcast_to(mask, s.shape)
    s = torch.where(mask, s, torch.full_like(s, -math.inf))
    lse = torch.logsumexp(s, dim=-1)  # -inf for fully masked rows
    p = torch.where(mask, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]),
                    torch.zeros_like(s))
    out = torch.einsum("bhmn,bhnf->bhmf", p, v)
    return out, lse


def _opts(name, opts):
    unknown = set(opts) - set(DEFAULTS[name])
    assert not unknown, f"{name}: unknown options {sorted(unknown)}"
    return {**DEFAULTS[name], **opts}


# --- the variants ----------------------------------------------------------------------------
def full(q, k, v, *, scale=None, **opts):
    _opts("full", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    s = _dot(q, k) * scale
    return masked_softmax(s, torch.ones(s.shape[-2:], dtype=torch.bool), v)


def causal(q, k, v, *, scale=None, **opts):
    _opts("causal", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    m, n = _positions(q.shape[2], k.shape[2])
    return masked_softmax(_dot(q, k) * scale, n <= m, v)


def sliding_window(q, k, v, *, scale=None, **opts):
    o = _opts("sliding_window", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    m, n = _positions(q.shape[2], k.shape[2])
    mask = (n <= m) & (m - n < o["window"])
    return masked_softmax(_dot(q, k) * scale, mask, v)


def alibi(q, k, v, *, scale=None, slopes, **opts):
    _opts("alibi", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    m, n = _positions(q.shape[2], k.shape[2])
    slopes = slopes.double().cpu().view(1, -1, 1, 1)
    s = _dot(q, k) * scale + slopes * (n - m).double()
    return masked_softmax(s, n <= m, v)


def softcap(q, k, v, *, scale=None, **opts):
    o = _opts("softcap", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    m, n = _positions(q.shape[2], k.shape[2])
    cap = float(o["cap"])
    s = cap * torch.tanh(_dot(q, k) * scale / cap)
    return masked_softmax(s, n <= m, v)


def streaming(q, k, v, *, scale=None, **opts):
    o = _opts("streaming", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    m, n = _positions(q.shape[2], k.shape[2])
    mask = (n <= m) & ((n < o["sinks"]) | (m - n < o["window"]))
    return masked_softmax(_dot(q, k) * scale, mask, v)


def prefix_lm(q, k, v, *, scale=None, **opts):
    o = _opts("prefix_lm", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    m, n = _positions(q.shape[2], k.shape[2])
    mask = (n <= m) | (n < o["prefix"])
    return masked_softmax(_dot(q, k) * scale, mask, v)


def document(q, k, v, *, scale=None, doc, **opts):
    _opts("document", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    assert M <= N, "document ids are indexed by the query position too: M <= N"
    m, n = _positions(M, N)
    doc = doc.detach().cpu()
    same = doc[:, :M, None] == doc[:, None, :]  # [B, M, N]: doc[b, m] == doc[b, n]
    mask = ((n <= m) & same)[:, None]  # [B, 1, M, N]
    return masked_softmax(_dot(q, k) * scale, mask, v)


def rel_bias(q, k, v, *, scale=None, bias, **opts):
    o = _opts("rel_bias", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    R = int(o["max_distance"])
    M, N = q.shape[2], k.shape[2]
    assert bias.shape == (q.shape[1], 2 * R + 1)
    m, n = _positions(M, N)
    bucket = (n - m).clamp(-R, R) + R  # [M, N]
    table = bias.double().cpu()  # [H, 2R+1]
    b = table[:, bucket]  # [H, M, N]
    s = _dot(q, k) * scale + b[None]
    return masked_softmax(s, torch.ones(M, N, dtype=torch.bool), v)


def neighborhood_1d(q, k, v, *, scale=None, **opts):
    o = _opts("neighborhood_1d", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    ks = int(o["kernel_size"])
    M, N = q.shape[2], k.shape[2]
    assert N >= ks, "neighborhood attention needs N >= kernel_size"
    m, n = _positions(M, N)
    start = (m - ks // 2).clamp(0, N - ks)  # [M, 1]
    mask = (n >= start) & (n < start + ks)
    return masked_softmax(_dot(q, k) * scale, mask, v)


def dilated(q, k, v, *, scale=None, **opts):
    o = _opts("dilated", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    w, d = int(o["window"]), int(o["dilation"])
    m, n = _positions(q.shape[2], k.shape[2])
    dist = m - n
    mask = (n <= m) & (dist < w * d) & (torch.remainder(dist, d) == 0)
    return masked_softmax(_dot(q, k) * scale, mask, v)


def chunked_local(q, k, v, *, scale=None, **opts):
    o = _opts("chunked_local", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    c = int(o["chunk"])
    m, n = _positions(q.shape[2], k.shape[2])
    mask = (n <= m) & (torch.div(m, c, rounding_mode="floor")
                       == torch.div(n, c, rounding_mode="floor"))
    return masked_softmax(_dot(q, k) * scale, mask, v)


def zerotuning(q, k, v, *, scale=None, gamma, **opts):
    """Causal softmax P; P[:, :, :, 0] *= gamma[h]; rows renormalized. No log formulation."""
    _opts("zerotuning", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    m, n = _positions(M, N)
    mask = torch.broadcast_to(n <= m, (q.shape[0], q.shape[1], M, N))
    s = torch.where(mask, _dot(q, k) * scale,
                    torch.full(mask.shape, -math.inf, dtype=torch.float64))
    rowmax = s.amax(dim=-1, keepdim=True)
    rowmax = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
    e = torch.where(mask, torch.exp(s - rowmax), torch.zeros_like(s))
    z = e.sum(-1, keepdim=True)
    visible = z > 0
    p = torch.where(visible, e / torch.where(visible, z, torch.ones_like(z)), torch.zeros_like(e))
    g = gamma.double().cpu().view(1, -1, 1, 1)
    p = torch.where(n == 0, p * g, p)  # per-head scale on the first token's weight
    z2 = p.sum(-1, keepdim=True)
    ok = z2 > 0
    p = torch.where(ok, p / torch.where(ok, z2, torch.ones_like(z2)), torch.zeros_like(p))
    out = torch.einsum("bhmn,bhnf->bhmf", p, v)
    # lse of the equivalent logits: log sum_n exp(s_n) + log(renormalizer) where the
    # renormalizer is sum_n P'_n = z2 (relative to the causal softmax's lse).
    base = torch.log(z.squeeze(-1)) + rowmax.squeeze(-1)
    lse = torch.where(visible.squeeze(-1) & ok.squeeze(-1), base + torch.log(z2.squeeze(-1)),
                      torch.full_like(base, -math.inf))
    return out, lse


VARIANTS = {
    "full": full, "causal": causal, "sliding_window": sliding_window, "alibi": alibi,
    "softcap": softcap, "streaming": streaming, "prefix_lm": prefix_lm, "document": document,
    "rel_bias": rel_bias, "neighborhood_1d": neighborhood_1d, "dilated": dilated,
    "chunked_local": chunked_local, "zerotuning": zerotuning,
}


def reference(name, q, k, v, scale=None, inputs=None, options=None):
    """Dispatch to the reference for variant `name`: returns (out, lse) in float64."""
    return VARIANTS[name](q, k, v, scale=scale, **(inputs or {}), **(options or {}))
