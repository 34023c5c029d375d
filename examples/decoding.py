"""Token-by-token decoding over a KV cache with attnc kernels, checked against SDPA.

    python examples/decoding.py [--steps 8] [--autotune]

A decoding step is one query row against the whole cache, so few programs would run (one per
query head and sequence); attnc divides the cache among programs ("key splits", flash-decoding)
and merges their partial results. On a GPU the number of splits follows the SM count; here it
is fixed with `kv_splits=` so the CPU run (Triton's interpreter) takes the same path. Two
kernels: plain attention over the cache, and a window over its last `window` entries written in
the spec language (`N` is the cache length, so `n >= N - window` keeps the newest keys).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import attnc

WINDOWED = """
attention decode_window {
  option window = 48
  mask = n >= N - window
}
"""


def sdpa(q, k, v, window=None):
    """The reference: SDPA over the cache (GQA by repeating kv heads), optionally windowed."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    mask = None
    if window is not None:
        mask = (torch.arange(k.shape[2], device=q.device) >= k.shape[2] - window).view(1, -1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=150)
    parser.add_argument("--autotune", action="store_true",
                        help="tune the kernels' launch configurations at their first call")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    B, Hq, Hkv, D = (8, 32, 8, 128) if gpu else (2, 4, 2, 32)
    splits = {} if gpu else {"kv_splits": 4}  # a GPU picks its own from the SM count
    full = attnc.load("full", autotune=args.autotune or None, **splits)
    windowed = attnc.compile(WINDOWED, autotune=args.autotune or None, **splits)

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    k_cache, v_cache = randn(B, Hkv, args.prompt, D), randn(B, Hkv, args.prompt, D)
    worst = {"full": 0.0, "window": 0.0}
    for step in range(args.steps):
        q = randn(B, Hq, 1, D)
        k_cache = torch.cat([k_cache, randn(B, Hkv, 1, D)], dim=2)  # this token's key and value
        v_cache = torch.cat([v_cache, randn(B, Hkv, 1, D)], dim=2)
        for name, kernel, window in (("full", full, None), ("window", windowed, 48)):
            out = kernel(q, k_cache, v_cache)
            ref = sdpa(q, k_cache, v_cache, window)
            err = float((out.float() - ref).norm() / ref.norm())
            worst[name] = max(worst[name], err)
        print(f"step {step}: cache {k_cache.shape[2]} tokens, relative error vs SDPA: "
              f"full {worst['full']:.1e}, window {worst['window']:.1e}")
    print(f"{args.steps} steps; worst relative error: full {worst['full']:.1e}, "
          f"window {worst['window']:.1e}")
    for record in full.launch_records:
        tuned = f", tuned over {len(record['trials'])} candidates" if "trials" in record else ""
        print(f"launch configuration ({record['kind']}): BLOCK_M={record['BLOCK_M']} "
              f"BLOCK_N={record['BLOCK_N']} num_warps={record['num_warps']}{tuned}")


if __name__ == "__main__":
    main()
