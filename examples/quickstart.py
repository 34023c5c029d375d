"""Compile an attention variant written inline, run it on random inputs, and compare it with an
eager PyTorch computation of the same math.

On a machine without CUDA the kernel runs through Triton's interpreter (slow, exact); with CUDA
it runs natively and the sizes below are increased.
"""

import math

import torch

import attnc

SPEC = """
# ALiBi with a sliding window: linear distance penalty per head, causal, at most `window` keys
attention alibi_window {
  option window = 48
  param slopes[h]
  score = dot(q, k) * scale + slopes[h] * (n - m)
  mask = n <= m and m - n < window
}
"""


def eager(q, k, v, slopes, window):
    """The same variant, materialized: scores, mask, softmax, weighted sum (float64)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).double()
    v = v.repeat_interleave(group, 1).double()
    M, N = q.shape[2], k.shape[2]
    m = torch.arange(M, device=q.device)[:, None]
    n = torch.arange(N, device=q.device)[None, :]
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores + slopes.double()[None, :, None, None] * (n - m)
    scores = scores.masked_fill(~((n <= m) & (m - n < window)), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def main():
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, Hq, Hkv, M, D = (4, 16, 4, 2048, 128) if cuda else (1, 4, 2, 150, 64)
    kernel = attnc.compile(SPEC)
    print(f"compiled {kernel!r} (cache {'hit' if kernel.cache_hit else 'miss'}) "
          f"on {'CUDA' if cuda else 'CPU via the Triton interpreter'}")
    print("key loop per query tile [m_lo, m_hi]:", kernel.kernel_ir.segments[0])

    torch.manual_seed(0)
    slopes = torch.rand(Hq, device=device) * 0.1
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(B, Hq, M, D, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, M, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, M, D, device=device, dtype=dtype)
        out = kernel(q, k, v, slopes=slopes)
        ref = eager(q, k, v, slopes, window=48)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"{str(dtype):15s} out {tuple(out.shape)}  relative error vs eager: {err:.2e}")


if __name__ == "__main__":
    main()
