"""Eager float64 references for the prologues, operands, gates and head maps around a score,
written from the formulas (RoFormer's rotation, QK-Norm's l2 normalization, DeepSeek-V2's MLA),
never from attnc's IR. Differentiable with torch autograd (the gradient oracle)."""

from __future__ import annotations

import math

import torch


def rope(x, pos, theta: float, dims: int | None = None, interleaved: bool = False):
    """Rotate pairs of the first `dims` features of x [..., rows, D] by pos [..., rows] times
    theta^(-2i/dims): half-split pairs (i, i + dims/2), or (2i, 2i + 1) when interleaved."""
    D = x.shape[-1]
    R = D if dims is None else dims
    i = torch.arange(R // 2, dtype=torch.float64, device=x.device)
    angle = pos.to(torch.float64)[..., None] * theta ** (-2.0 * i / R)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    if interleaved:
        a, b = x[..., 0:R:2], x[..., 1:R:2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    else:
        a, b = x[..., :R // 2], x[..., R // 2:R]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return torch.cat([rotated, x[..., R:]], -1)


def l2norm(x, gain=None, eps: float = 1e-6):
    """x / sqrt(sum x^2 + eps) (over the features), times gain [..., D] when given."""
    y = x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)
    return y if gain is None else y * gain


def heads(x, Hq: int, kv_map=None):
    """Key-side x [B, Hkv, N, D] as seen by each query head: x[:, kv_map[h]] (default h // G)."""
    Hkv = x.shape[1]
    index = torch.as_tensor(kv_map if kv_map is not None else
                            [h // (Hq // Hkv) for h in range(Hq)], device=x.device)
    return x[:, index]


def attention(dots, v, scale: float, mask=None, gate=None, kv_map=None):
    """out, lse of softmax(Σ w · q_i k_i^T · scale) v. `dots`: (query [B, Hq, M, D_i], key
    [B, Hkv, N, D_i], weight) terms; `mask(m, n)` -> bool [M, N] (None: every key); `gate`
    [B, Hq, M] multiplies out; `kv_map` [Hq] the K/V head of each query head. Rows seeing no
    key give out 0 and lse -inf."""
    Hq = dots[0][0].shape[1]
    s = sum(w * (qx @ heads(kx, Hq, kv_map).transpose(-1, -2)) for qx, kx, w in dots) * scale
    M, N = s.shape[-2:]
    if mask is not None:
        m = torch.arange(M, device=s.device)[:, None]
        n = torch.arange(N, device=s.device)[None, :]
        s = s.masked_fill(~mask(m, n), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = p @ heads(v, Hq, kv_map)
    if gate is not None:
        out = out * gate[..., None]
    return out, lse


def causal(m, n):
    return n <= m


def naive_mla(x_nope, x_rope, c, k_rope, w_uk, w_uv, pos_q, pos_k, theta: float, scale: float):
    """DeepSeek-V2 MLA as it is specified, without absorption: each head up-projects the shared
    latent c [B, 1, N, Dc] into its keys k_h = c W_uk[h] ([H, Dc, Dn]) and values v_h = c W_uv[h]
    ([H, Dc, Dv]); the decoupled rope parts x_rope [B, H, M, Dr] and k_rope [B, 1, N, Dr] (shared
    by the heads) are rotated (interleaved pairs, as DeepSeek's code does); the score is
    (x_nope . k_h + rope(x_rope) . rope(k_rope)) * scale, causal; out [B, H, M, Dv]."""
    k_nope = torch.einsum("bnc,hcd->bhnd", c[:, 0], w_uk)
    v = torch.einsum("bnc,hcd->bhnd", c[:, 0], w_uv)
    qr = rope(x_rope, pos_q[:, None, :], theta, interleaved=True)
    kr = rope(k_rope, pos_k[:, None, :], theta, interleaved=True)
    s = (x_nope @ k_nope.transpose(-1, -2) + qr @ kr.transpose(-1, -2)) * scale
    M, N = s.shape[-2:]
    keep = torch.arange(N)[None, :] <= torch.arange(M)[:, None]
    return torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ v
