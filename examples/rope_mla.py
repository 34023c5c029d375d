"""Rotary embeddings and DeepSeek-style multi-head latent attention (MLA), fused.

Three library specs, each checked against plain PyTorch written from the formulas:

* `rope`: q and k rotated by their positions as their tiles load (no rotated copy of q or k is
  written), compared with rotating in torch and then calling SDPA;
* `qk_norm`: l2-normalized q and k with learnable gains, then rope; the gains get gradients;
* `mla`: the absorbed MLA form -- the query absorbed into the 32-wide latent, the latent shared by
  every head as keys and values (`v = k`), a decoupled rotary part `qr . kr` -- compared with the
  naive MLA that up-projects the latent per head.

Runs in seconds on a CPU (Triton's interpreter) and unchanged on CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attnc


def rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def rotate(x, pos, theta=10000.0, dims=None, interleaved=False):
    """RoFormer's rotation of the first `dims` features of x [B, H, T, D] by pos [B, T]."""
    R = x.shape[-1] if dims is None else dims
    inv = theta ** (-2.0 * torch.arange(R // 2, dtype=torch.float64) / R)
    ang = pos.double()[:, None, :, None] * inv
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if interleaved:
        a, b = x[..., 0:R:2], x[..., 1:R:2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    else:
        a, b = x[..., :R // 2], x[..., R // 2:R]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return torch.cat([out, x[..., R:]], -1)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 1, 4, 2, 48, 32

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = randn(B, H, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, D)
    pos = torch.arange(T, device=device).expand(B, T).contiguous()
    tiles = {"block_m": 16, "block_n": 16}

    # rope on the first 16 features (GPT-NeoX's partial rotary)
    rope = attnc.load("rope", rot=16, **tiles)
    out = rope(q, k, v, pos_q=pos, pos_k=pos)
    ref = F.scaled_dot_product_attention(rotate(q, pos, dims=16),
                                         rotate(k, pos, dims=16).repeat_interleave(2, 1),
                                         v.repeat_interleave(2, 1), is_causal=True)
    print(f"rope (rot=16, GQA {H}/{Hkv}): relative error vs torch rotation + SDPA "
          f"{rel(out, ref):.2e}")

    # qk_norm: gradients reach the gains through the fused l2norm
    gq = (0.5 + torch.rand(D, generator=g)).to(device).requires_grad_()
    gk = (0.5 + torch.rand(D, generator=g)).to(device).requires_grad_()
    out = attnc.load("qk_norm", **tiles)(q, k, v, pos_q=pos, pos_k=pos, gq=gq, gk=gk, scale=8.0)
    out.square().sum().backward()
    gq_fused, gk_fused = gq.grad.clone(), gk.grad.clone()
    gq.grad = gk.grad = None

    def norm(x, gain):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) * gain
    ref = F.scaled_dot_product_attention(
        rotate(norm(q, gq), pos), rotate(norm(k, gk), pos).repeat_interleave(2, 1),
        v.repeat_interleave(2, 1), is_causal=True, scale=8.0)
    ref.square().sum().backward()
    print(f"qk_norm: output error {rel(out, ref):.2e}, gain gradient errors "
          f"{rel(gq_fused, gq.grad):.2e} / {rel(gk_fused, gk.grad):.2e}")

    # MLA: naive (per-head up-projection of the latent) vs the absorbed `mla` spec
    Dn, Dr, Dc, Dv = 16, 16, 32, 16
    x_nope, x_rope = randn(B, H, T, Dn), randn(B, H, T, Dr)
    c, k_rope = randn(B, 1, T, Dc), randn(B, 1, T, Dr)
    w_uk, w_uv = randn(H, Dc, Dn) / math.sqrt(Dc), randn(H, Dc, Dv) / math.sqrt(Dc)
    scale = 1 / math.sqrt(Dn + Dr)
    k_nope = torch.einsum("bnc,hcd->bhnd", c[:, 0], w_uk)
    v_heads = torch.einsum("bnc,hcd->bhnd", c[:, 0], w_uv)
    s = (x_nope @ k_nope.transpose(-1, -2)
         + rotate(x_rope, pos, interleaved=True) @ rotate(k_rope, pos, interleaved=True)
         .transpose(-1, -2)) * scale
    naive = torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=device)
                                        .triu(1), -math.inf), -1) @ v_heads
    q_abs = torch.einsum("bhmd,hcd->bhmc", x_nope, w_uk)
    latent = attnc.load("mla", **tiles)(q_abs, c, qr=x_rope, kr=k_rope, pos_q=pos, pos_k=pos,
                                        scale=scale)
    out = torch.einsum("bhmc,hcd->bhmd", latent, w_uv)
    print(f"mla (absorbed, latent {Dc}, rope part {Dr}): relative error vs naive MLA "
          f"{rel(out, naive):.2e}")


if __name__ == "__main__":
    main()
