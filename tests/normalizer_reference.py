"""Independent eager-PyTorch references for the library's non-softmax normalizers (issue 15):
sigmoid_attn, softplus_attn, relu_attn, standardized, sinkhorn, sink_softmax, grouped and
stick_breaking.

Written from the math (../shared/VARIANTS.md rows L16-L18 and each variant's paper, cited in its
variants/*.attn header), with dense float64 tensors: the score matrix is materialized, masks are
boolean tensors, GQA repeats k and v. Nothing here uses attnc's IR, passes or interpreters, and
no formula is copied from a cascade: sinkhorn iterates literally, stick_breaking sums its log
product with an explicit triangular matrix instead of a scan. Every function is differentiable
(torch autograd through it is the oracle for gradients) and never divides by zero, so rows that
see no key give out = 0 with finite gradients.

Each function takes q [B, Hq, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], a keyword `scale`
(None = 1/sqrt(D)), `mask` (None = the variant's own; else a boolean tensor broadcastable to
[B, Hq, M, N], used by tests to make rows that see no key), the variant's params and option
overrides, and returns (out [B, Hq, M, Dv] float64, lse [B, Hq, M] float64 or None). Only
sink_softmax has an lse. Positions follow the library's convention: query m and key n are
plain indices (with M != N the causal mask n <= m is top-left aligned).
"""

from __future__ import annotations

import math

import torch

from tests.reference import _dot, _positions, _prepare, masked_softmax

DEFAULTS = {
    "sigmoid_attn": {},
    "softplus_attn": {},
    "relu_attn": {},
    "standardized": {},
    "sinkhorn": {"iters": 3, "tau": 1.0},
    "sink_softmax": {},
    "grouped": {"groups": 4},
    "stick_breaking": {},
}
STANDARDIZE_EPS = 1e-6  # the `standardize` normalizer's fixed epsilon under the variance


def _opts(name, opts):
    unknown = set(opts) - set(DEFAULTS[name])
    assert not unknown, f"{name}: unknown options {sorted(unknown)}"
    return {**DEFAULTS[name], **opts}


def _visible(mask, default, shape):
    """The boolean [B, H, M, N] mask: the caller's, or the variant's own."""
    return torch.broadcast_to(default if mask is None else mask, shape)


def _causal(M, N):
    m, n = _positions(M, N)
    return n <= m


def _safe(x):
    """x where it is nonzero, else 1: a denominator whose zero case the caller masks out."""
    return torch.where(x != 0, x, torch.ones_like(x))


def _weighted(w, visible, v):
    """sum over the visible keys of w * v."""
    return torch.einsum("bhmn,bhnf->bhmf", torch.where(visible, w, torch.zeros_like(w)), v)


# --- L16: pointwise normalizers ------------------------------------------------------------------
def sigmoid_attn(q, k, v, *, scale=None, mask=None, **opts):
    """w = sigmoid(s - log N) on the causal keys, no normalization (b = -log n, the paper's
    bias for sequence length n; N here, the number of keys)."""
    _opts("sigmoid_attn", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    s = _dot(q, k) * scale
    visible = _visible(mask, _causal(M, N), s.shape)
    return _weighted(torch.sigmoid(s - math.log(N)), visible, v), None


def softplus_attn(q, k, v, *, scale=None, mask=None, **opts):
    """LSSA: w = softplus(lambda_m * s) / sum over visible n of the same, lambda_m = log of the
    number of keys query m sees under the causal mask, min(m + 1, N)."""
    _opts("softplus_attn", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    m, _ = _positions(M, N)
    lam = torch.log(torch.clamp(m + 1, max=N).double())  # [M, 1]
    s = _dot(q, k) * scale
    visible = _visible(mask, _causal(M, N), s.shape)
    f = torch.where(visible, torch.nn.functional.softplus(lam * s), torch.zeros_like(s))
    total = f.sum(-1, keepdim=True)
    return _weighted(f / _safe(total), visible, v), None


def relu_attn(q, k, v, *, scale=None, mask=None, **opts):
    """w = relu(s) / (the number of keys the query sees)."""
    _opts("relu_attn", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    s = _dot(q, k) * scale
    visible = _visible(mask, _causal(M, N), s.shape)
    count = visible.sum(-1, keepdim=True).double()
    return _weighted(torch.relu(s) / _safe(count), visible, v), None


# --- L17: standardized scores (NON) ---------------------------------------------------------------
def standardized(q, k, v, *, scale=None, mask=None, **opts):
    """w = (s - mu) / sqrt(var + eps), mu and the biased variance over the visible keys (the
    variance from the centered scores, not from E[s^2] - mu^2)."""
    _opts("standardized", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    s = _dot(q, k) * scale
    visible = _visible(mask, _causal(M, N), s.shape)
    zero = torch.zeros_like(s)
    count = _safe(visible.sum(-1, keepdim=True).double())
    mu = torch.where(visible, s, zero).sum(-1, keepdim=True) / count
    centered = torch.where(visible, s - mu, zero)
    var = (centered * centered).sum(-1, keepdim=True) / count
    return _weighted(centered / torch.sqrt(var + STANDARDIZE_EPS), visible, v), None


# --- L18: Sinkhorn --------------------------------------------------------------------------------
def sinkhorn(q, k, v, *, scale=None, mask=None, **opts):
    """K = exp(s / tau) * M; `iters` times: K /= K.sum(-1); K /= K.sum(-2); out = K v.

    Each row of exp is shifted by its max first: the first row normalization divides the shift
    out exactly, and it keeps exp finite. A row or column with nothing left divides 0 by 1."""
    o = _opts("sinkhorn", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    s = _dot(q, k) * scale / float(o["tau"])
    visible = _visible(mask, torch.ones(M, N, dtype=torch.bool), s.shape)
    shift = torch.where(visible, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    K = torch.where(visible, torch.exp(s - shift), torch.zeros_like(s))
    for _ in range(int(o["iters"])):
        K = K / _safe(K.sum(-1, keepdim=True))
        K = K / _safe(K.sum(-2, keepdim=True))
    return torch.einsum("bhmn,bhnf->bhmf", K, v), None


# --- softmax with a sink logit --------------------------------------------------------------------
def sink_softmax(q, k, v, *, scale=None, mask=None, sinks, **opts):
    """Softmax over the visible keys plus one extra logit sinks[h] that has no value:
    w = exp(s) / (sum exp(s) + exp(sink)), lse = log(sum exp(s) + exp(sink)). A row that sees
    no key gives out = 0 and lse = sink."""
    _opts("sink_softmax", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    s = _dot(q, k) * scale
    visible = _visible(mask, _causal(M, N), s.shape)
    sink = sinks.double().cpu().view(1, -1, 1, 1).expand(s.shape[0], -1, M, 1)
    logits = torch.cat([torch.where(visible, s, torch.full_like(s, -math.inf)), sink], dim=-1)
    p = torch.softmax(logits, dim=-1)[..., :N]  # the sink's column takes weight, gives nothing
    return torch.einsum("bhmn,bhnf->bhmf", p, v), torch.logsumexp(logits, dim=-1)


# --- grouped normalization ------------------------------------------------------------------------
def grouped(q, k, v, *, scale=None, mask=None, w, **opts):
    """Key n belongs to group n * G // N; each group is a softmax of its own visible keys; the
    group outputs are mixed by softmax over c of w[h, c]. An empty group contributes 0."""
    o = _opts("grouped", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    G = int(o["groups"])
    s = _dot(q, k) * scale
    visible = _visible(mask, torch.ones(M, N, dtype=torch.bool), s.shape)
    group = torch.div(torch.arange(N) * G, N, rounding_mode="floor")  # [N]
    mix = torch.softmax(w.double().cpu(), dim=-1)  # [H, G]
    out = 0
    for c in range(G):
        per_group, _ = masked_softmax(s, visible & (group == c), v)
        out = out + mix[:, c].view(1, -1, 1, 1) * per_group
    return out, None


# --- stick-breaking -------------------------------------------------------------------------------
def stick_breaking(q, k, v, *, scale=None, mask=None, **opts):
    """beta = sigmoid(s); w[m, n] = beta[m, n] * prod over the visible keys j with n < j of
    (1 - beta[m, j]) (under the default strict causal mask n < m: the keys between n and m).

    The log of the product is a plain matrix product of log(1 - beta) = logsigmoid(-s) with
    the strictly upper triangular matrix [j > n]: no scan."""
    _opts("stick_breaking", opts)
    q, k, v, scale = _prepare(q, k, v, scale)
    M, N = q.shape[2], k.shape[2]
    m, n = _positions(M, N)
    s = _dot(q, k) * scale
    visible = _visible(mask, n < m, s.shape)
    zero = torch.zeros_like(s)
    log_rest = torch.where(visible, torch.nn.functional.logsigmoid(-s), zero)
    after = (torch.arange(N).view(1, N) > torch.arange(N).view(N, 1)).double()  # [n, j]: j > n
    log_w = torch.nn.functional.logsigmoid(s) + torch.einsum("bhmj,nj->bhmn", log_rest, after)
    return _weighted(torch.exp(torch.where(visible, log_w, zero)), visible, v), None


VARIANTS = {
    "sigmoid_attn": sigmoid_attn, "softplus_attn": softplus_attn, "relu_attn": relu_attn,
    "standardized": standardized, "sinkhorn": sinkhorn, "sink_softmax": sink_softmax,
    "grouped": grouped, "stick_breaking": stick_breaking,
}


def reference(name, q, k, v, scale=None, inputs=None, options=None, mask=None):
    """Dispatch to the reference for variant `name`: (out, lse or None) in float64."""
    return VARIANTS[name](q, k, v, scale=scale, mask=mask, **(inputs or {}), **(options or {}))
