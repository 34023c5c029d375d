"""Token top-k sparse attention, DeepSeek-V3.2 style: a cheap indexer picks each query's keys,
the `token_topk` kernel attends to those only.

DeepSeek Sparse Attention scores every (query, key) pair with a small "lightning indexer"
(a few low-dimensional heads, ReLU, weighted per head), keeps the top-k keys of each query, and
runs attention over those keys alone, the list shared by the query heads. Here the indexer is a
stand-in of the same shape: a random rank-16 projection of the head-averaged q and k, ReLU, the
causal pairs only. The list goes to the library variant `token_topk`
(`mask = n <= m and n in idx[b, m, :]`), whose kernels gather the listed K/V rows by index and
never walk the other keys; entries -1 pad the lists of early queries that have fewer than k
keys. The script compares out and the gradients with torch over a dense mask built from the same
lists, and reports how many keys each query visited.

On a machine without CUDA the kernels run through Triton's interpreter (slow, exact), so sizes
are small; with CUDA they are larger.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

import attnc
from attnc.testing import rel_error


def indexer_topk(q, k, topk: int, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """[B, M, topk] key indices per query (shared by the heads), -1 where a query has fewer than
    `topk` causal keys: the top of ReLU(q_I . k_I) over keys n <= m, q_I and k_I rank-`rank`
    projections of the head-averaged q and k."""
    B, _, M, D = q.shape
    N = k.shape[2]
    proj = torch.randn(D, rank, generator=torch.Generator().manual_seed(seed)).to(q.device)
    qi = q.float().mean(1) @ proj / math.sqrt(D)
    ki = k.float().mean(1) @ proj / math.sqrt(D)
    score = F.relu(qi @ ki.transpose(-1, -2))                               # [B, M, N]
    causal = torch.arange(N, device=q.device)[None, :] <= torch.arange(M, device=q.device)[:, None]
    score = score.masked_fill(~causal, -math.inf)
    top = score.topk(min(topk, N), dim=-1)
    return torch.where(torch.isinf(top.values), -1, top.indices)


def reference(q, k, v, idx, scale: float) -> torch.Tensor:
    """torch's SDPA over the dense mask of the lists (and causality), in float32."""
    B, H, M, _ = q.shape
    N = k.shape[2]
    mask = torch.zeros(B, M, N + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, torch.where(idx < 0, N, idx), True)
    mask = mask[:, None, :, :N]
    group = H // k.shape[1]
    kk, vv = (t.float().repeat_interleave(group, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask, scale=scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topk", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, H, Hkv, M, D = (2, 16, 1, 4096, 128) if cuda else (1, 4, 1, 48, 32)
    topk = args.topk or (512 if cuda else 12)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, M, D, generator=g).to(device, dtype).requires_grad_()
               for h in (H, Hkv, Hkv))
    idx = indexer_topk(q.detach(), k.detach(), topk)
    kernel = attnc.load("token_topk", topk=topk)
    scale = 1 / math.sqrt(D)

    t0 = time.perf_counter()
    out = kernel(q, k, v, idx=idx, scale=scale)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    elapsed = time.perf_counter() - t0
    ref = reference(q, k, v, idx, scale)
    want = torch.autograd.grad(ref, (q, k, v), dout.float())

    visited = (idx >= 0).sum().item() / (B * M)
    print(f"token_topk: B={B} Hq={H} Hkv={Hkv} M=N={M} D={D} topk={topk} ({dtype}, {device})")
    print(f"keys visited per query: {visited:.1f} of {(M + 1) / 2:.1f} causal on average")
    print(f"relative error vs torch over the same lists: out {rel_error(out, ref):.2e}, "
          + ", ".join(f"d{n} {rel_error(a, b):.2e}" for n, a, b in zip("qkv", grads, want)))
    print(f"forward + backward: {elapsed:.2f} s (first call, compilation included)")


if __name__ == "__main__":
    main()
