"""Independent float64 oracles for the linear-attention (state-update) library specs.

Written straight from the math as naive step-by-step recurrences (a Python loop over t), not
from any compiler code. Core layout: q, k [B, H, T, Dk], v [B, H, T, Dv], per-step inputs
[B, H, T] or [B, H, T, Dk], per-head params [H]. At each step the states are updated first, in
order (later statements see the updated earlier states), then o_t is read from the new states.
Every function returns (o [B, H, T, Dv] float64, {state_name: final state}); `initial_state` is
an optional dict of the same shapes (missing / None entries are zeros). No in-place ops, so
everything is differentiable with autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- helpers

def to_fla(x):
    """Core layout [B, H, T, ...] -> flash-linear-attention layout [B, T, H, ...]."""
    return x.transpose(1, 2).contiguous()


def from_fla(x):
    """flash-linear-attention layout [B, T, H, ...] -> core layout [B, H, T, ...]."""
    return x.transpose(1, 2).contiguous()


def varlen_split(x, cu_seqlens):
    """Per-sequence slices x[:, :, cu[i]:cu[i+1]] of a B == 1 core-layout tensor."""
    assert x.shape[0] == 1, "varlen inputs are packed into batch 1"
    cu = [int(c) for c in cu_seqlens.tolist()]
    return [x[:, :, cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]


def _state(initial_state, name, shape, like):
    """The initial value of one state: the given tensor in float64, or zeros."""
    s = (initial_state or {}).get(name)
    if s is None:
        return torch.zeros(shape, dtype=torch.float64, device=like.device)
    return s.double()


def _heads(p):
    """Per-head param [H] -> [1, H, 1, 1], broadcastable against [B, H, Dk, Dv]."""
    return p.double()[None, :, None, None]


def _outer(a, b):
    """Per-(batch, head) outer product: [B, H, Dk] x [B, H, Dv] -> [B, H, Dk, Dv]."""
    return a[..., :, None] * b[..., None, :]


def _read(S, x):
    """S^T x: sum_i x[i] S[i, j] -> [B, H, Dv]."""
    return (x[..., :, None] * S).sum(-2)


def _scale(scale, dk):
    return dk ** -0.5 if scale is None else scale


# ----------------------------------------------------------------------------- normalized (S, z)

def _normalized_linear(fq, fk, v, eps, initial_state):
    """S += fk v^T; z += fk; o = S^T fq / (fq . z + eps), for precomputed feature maps."""
    fq, fk, v = fq.double(), fk.double(), v.double()
    B, H, T, Dk = fk.shape
    Dv = v.shape[-1]
    S = _state(initial_state, "S", (B, H, Dk, Dv), v)
    z = _state(initial_state, "z", (B, H, Dk), v)
    out = []
    for t in range(T):
        S = S + _outer(fk[:, :, t], v[:, :, t])
        z = z + fk[:, :, t]
        den = (fq[:, :, t] * z).sum(-1) + eps
        out.append(_read(S, fq[:, :, t]) / den[..., None])
    return torch.stack(out, dim=2), {"S": S, "z": z}


def linear_attn(q, k, v, eps=1e-6, initial_state=None):
    """Katharopoulos linear attention, phi = elu + 1, with normalizer z."""
    phi = lambda x: F.elu(x.double()) + 1.0
    return _normalized_linear(phi(q), phi(k), v, eps, initial_state)


def taylor2(x):
    """Second-order Taylor feature map: [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]."""
    x = x.double()
    d = x.shape[-1]
    xx = (x[..., :, None] * x[..., None, :]).flatten(-2) / (math.sqrt(2.0) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, xx], dim=-1)


def based(q, k, v, eps=1e-6, initial_state=None):
    """Based: normalized linear attention with the taylor2 feature map (Dk = 1 + d + d^2)."""
    return _normalized_linear(taylor2(q), taylor2(k), v, eps, initial_state)


def hedgehog_map(x, W):
    """Hedgehog feature map: y = x W per head; [softmax(y), softmax(-y)] -> 2F."""
    y = torch.einsum("bhtd,hdf->bhtf", x.double(), W.double())
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], dim=-1)


def hedgehog(q, k, v, W, eps=1e-6, initial_state=None):
    """Hedgehog: normalized linear attention with the learned hedgehog_map feature map."""
    return _normalized_linear(hedgehog_map(q, W), hedgehog_map(k, W), v, eps, initial_state)


# ----------------------------------------------------------------------------- decayed S

def _decayed(q, k, v, decay, write, scale, initial_state):
    """S = decay(t) * S + write(t) * k_t v_t^T; o_t = scale * S^T q_t."""
    B, H, T, Dk = k.shape
    S = _state(initial_state, "S", (B, H, Dk, v.shape[-1]), v)
    out = []
    for t in range(T):
        S = decay(t) * S + write(t) * _outer(k[:, :, t], v[:, :, t])
        out.append(scale * _read(S, q[:, :, t]))
    return torch.stack(out, dim=2), {"S": S}


def retnet(q, k, v, scale=None, initial_state=None):
    """RetNet retention: fixed per-head decay gamma_h = 1 - 2^(-5 - h)."""
    q, k, v = q.double(), k.double(), v.double()
    H = q.shape[1]
    gamma = _heads(torch.tensor([1.0 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64,
                                 device=q.device))
    return _decayed(q, k, v, lambda t: gamma, lambda t: 1.0, _scale(scale, q.shape[-1]),
                    initial_state)


def lightning(q, k, v, scale=None, eps=1e-6, initial_state=None):
    """Lightning attention: decay exp(-8 (h + 1) / H), then RMS-normalized readout."""
    q, k, v = q.double(), k.double(), v.double()
    H = q.shape[1]
    lam = _heads(torch.tensor([math.exp(-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64,
                                 device=q.device))
    r, final = _decayed(q, k, v, lambda t: lam, lambda t: 1.0, _scale(scale, q.shape[-1]),
                        initial_state)
    return r / torch.sqrt((r * r).mean(-1, keepdim=True) + eps), final


def simple_gla(q, k, v, g, scale=None, initial_state=None):
    """Simple GLA: scalar log-space gate per step, S = exp(g_t) S + k v^T."""
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    return _decayed(q, k, v, lambda t: torch.exp(g[:, :, t])[..., None, None], lambda t: 1.0,
                    _scale(scale, q.shape[-1]), initial_state)


def mamba2_ssd(q, k, v, dt, A, D, initial_state=None):
    """Mamba-2 SSD: S = exp(dt A) S + dt k v^T; o = S^T q + D v (no scale)."""
    q, k, v, dt = q.double(), k.double(), v.double(), dt.double()
    A, D = A.double(), D.double()
    decay = lambda t: torch.exp(dt[:, :, t] * A[None, :])[..., None, None]
    write = lambda t: dt[:, :, t][..., None, None]
    o, final = _decayed(q, k, v, decay, write, 1.0, initial_state)
    return o + D[None, :, None, None] * v, final


def gla(q, k, v, g, scale=None, initial_state=None):
    """GLA: per-key-dim log-space gate, S[i, :] = exp(g_t[i]) S[i, :] + k_t[i] v_t."""
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    return _decayed(q, k, v, lambda t: torch.exp(g[:, :, t])[..., :, None], lambda t: 1.0,
                    _scale(scale, q.shape[-1]), initial_state)


# ----------------------------------------------------------------------------- delta rule

def delta_net(q, k, v, beta, scale=None, initial_state=None):
    """DeltaNet: S = S + beta k (v - S^T k)^T, with S^T k taken before the update."""
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    B, H, T, Dk = k.shape
    scale = _scale(scale, Dk)
    S = _state(initial_state, "S", (B, H, Dk, v.shape[-1]), v)
    out = []
    for t in range(T):
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t][..., None]
        S = S + _outer(bt * kt, vt - _read(S, kt))
        out.append(scale * _read(S, q[:, :, t]))
    return torch.stack(out, dim=2), {"S": S}


def gated_delta_net(q, k, v, g, beta, scale=None, initial_state=None):
    """Gated DeltaNet: P = exp(g) S; S = P + beta k (v - P^T k)^T."""
    q, k, v, g, beta = q.double(), k.double(), v.double(), g.double(), beta.double()
    B, H, T, Dk = k.shape
    scale = _scale(scale, Dk)
    S = _state(initial_state, "S", (B, H, Dk, v.shape[-1]), v)
    out = []
    for t in range(T):
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t][..., None]
        P = torch.exp(g[:, :, t])[..., None, None] * S
        S = P + _outer(bt * kt, vt - _read(P, kt))
        out.append(scale * _read(S, q[:, :, t]))
    return torch.stack(out, dim=2), {"S": S}


# ----------------------------------------------------------------------------- others

def flowformer(q, k, v, eps=1e-6, initial_state=None):
    """Causal Flowformer (flow conservation) with phi = sigmoid."""
    fq, fk, v = torch.sigmoid(q.double()), torch.sigmoid(k.double()), v.double()
    B, H, T, Dk = fk.shape
    Dv = v.shape[-1]
    sk = _state(initial_state, "sk", (B, H, Dk), v)
    sq = _state(initial_state, "sq", (B, H, Dk), v)
    ko = _state(initial_state, "ko", (B, H, Dk), v)
    qi = _state(initial_state, "qi", (B, H, Dk), v)
    S = _state(initial_state, "S", (B, H, Dk, Dv), v)
    c = _state(initial_state, "c", (B, H), v)
    steps = _state(initial_state, "steps", (B, H), v)  # how many steps so far (resumable)
    out = []
    for t in range(T):
        qt, kt, vt = fq[:, :, t], fk[:, :, t], v[:, :, t]
        sk = sk + kt
        sq = sq + qt
        I = (qt * sk).sum(-1) + eps                    # incoming flow   [B, H]
        O = (kt * sq).sum(-1) + eps                    # outgoing flow   [B, H]
        ko = ko + kt / O[..., None]
        qi = qi + qt / I[..., None]
        e = torch.exp((kt * qi).sum(-1))               # exp(Ohat)       [B, H]
        S = S + _outer(kt, e[..., None] * vt)
        c = c + e
        steps = steps + 1
        gate = torch.sigmoid((qt * ko).sum(-1))        # sigmoid(Ihat)   [B, H]
        w = gate * steps / (I * c)
        out.append(w[..., None] * _read(S, qt))
    return torch.stack(out, dim=2), {"sk": sk, "sq": sq, "ko": ko, "qi": qi, "S": S, "c": c,
                                   "steps": steps}


def nonlinear_tanh(q, k, v, initial_state=None):
    """Non-linear state update S = tanh(S + k v^T); o = S^T q (tests the recurrent fallback)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, Dk = k.shape
    S = _state(initial_state, "S", (B, H, Dk, v.shape[-1]), v)
    out = []
    for t in range(T):
        S = torch.tanh(S + _outer(k[:, :, t], v[:, :, t]))
        out.append(_read(S, q[:, :, t]))
    return torch.stack(out, dim=2), {"S": S}
