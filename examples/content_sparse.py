"""Content-sparse attention with attnc.sparse: MoBA and MInference's vertical-slash pattern.

Both choose key blocks from the data (block gating, or an estimate from the last queries), hand
the choice to attnc.flex_attention as a BlockMask, and the block-sparse kernel visits only the
listed blocks. This script compares each with a dense float64 eager reference that makes its own
selection (tests/sparse_reference.py), and reports how many key blocks the kernel visited.

On a machine without CUDA the kernels run through Triton's interpreter (slow, exact), so sizes
are small; with CUDA they are increased.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.sparse_reference

from attnc import sparse  # noqa: E402
from attnc.testing import rel_error  # noqa: E402
from tests.sparse_reference import moba_reference, vertical_slash_reference  # noqa: E402


def visited(bm) -> str:
    """Visited key blocks, as a fraction of all blocks and of the causal (lower-triangle) ones."""
    qb, kb = bm.kv_indices.shape[-2:]
    used = (bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item()
    heads = bm.kv_num_blocks.shape[0] * bm.kv_num_blocks.shape[1]
    causal = heads * qb * (qb + 1) // 2
    full = bm.full_kv_num_blocks.sum().item()
    return (f"{used}/{heads * qb * kb} blocks visited ({100 * used / (heads * qb * kb):.0f}% of "
            f"all, {100 * used / causal:.0f}% of causal), {full} of them full")


def topic_data(B, Hq, Hkv, M, D, bs, g):
    """Data MoBA is made for: each key block has a topic (keys = topic + noise), and all queries of
    a block look for the topic of one earlier block, so their gates agree on where to go."""
    blocks = -(-M // bs)
    topics = torch.randn(B, Hkv, blocks, D, generator=g)
    k = 0.5 * torch.randn(B, Hkv, M, D, generator=g) + topics.repeat_interleave(bs, 2)[:, :, :M]
    target = torch.minimum(torch.randint(0, blocks, (blocks,), generator=g),
                           (torch.arange(blocks) - 1).clamp(min=0))
    wanted = topics[:, :, target].repeat_interleave(Hq // Hkv, 1)
    q = 0.5 * torch.randn(B, Hq, M, D, generator=g) + wanted.repeat_interleave(bs, 2)[:, :, :M]
    return q, k, torch.randn(B, Hkv, M, D, generator=g)


def line_data(B, Hq, Hkv, M, D, g):
    """Data vertical-slash is made for: a few "sink" keys every query likes (vertical lines) and
    keys that echo the query a fixed distance later (slash lines at offsets 0, 3 and 17)."""
    q = torch.randn(B, Hq, M, D, generator=g)
    k = torch.randn(B, Hkv, M, D, generator=g)
    u = torch.randn(D, generator=g)
    u = 3 * u / u.norm()
    q += u
    k[:, :, [0, 5, M // 2]] += 2 * u
    for d in (0, 3, 17):
        k[:, :, :M - d] += 0.7 * q[:, ::Hq // Hkv, d:]
    return q, k, torch.randn(B, Hkv, M, D, generator=g)


def main():
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, Hq, Hkv, M, D, bs = (2, 16, 4, 8192, 128, 64) if cuda else (1, 4, 2, 300, 32, 32)
    print(f"B={B} Hq={Hq} Hkv={Hkv} M=N={M} D={D} block={bs} on "
          f"{'CUDA' if cuda else 'CPU via the Triton interpreter'}")
    g = torch.Generator().manual_seed(0)
    vs = dict(vertical=4 * M // 300, slash=4 * M // 300, last_q=bs)
    runs = [
        ("moba", sparse.moba, sparse.moba_block_mask, dict(block_size=bs, top_k=2),
         topic_data(B, Hq, Hkv, M, D, bs, g),
         lambda q, k, v: moba_reference(q, k, v, bs, 2)),
        ("vertical_slash", sparse.vertical_slash, sparse.vertical_slash_block_mask,
         dict(vs, block_size=bs), line_data(B, Hq, Hkv, M, D, g),
         lambda q, k, v: vertical_slash_reference(q, k, v, vs["vertical"], vs["slash"],
                                                  vs["last_q"])),
    ]
    for name, fn, mask_fn, kwargs, (q, k, v), reference in runs:
        print(f"{name} {kwargs}: {visited(mask_fn(q.to(device), k.to(device), **kwargs))}")
        for dtype in (torch.float32, torch.bfloat16):
            qd, kd, vd = (t.to(device, dtype) for t in (q, k, v))
            start = time.perf_counter()
            out = fn(qd, kd, vd, **kwargs)
            took = time.perf_counter() - start
            # The reference selects from the same (rounded) inputs; it is dense, O(M x N) per
            # head, so it is skipped at the CUDA sizes.
            err = ("" if cuda else "relative error vs reference "
                   f"{rel_error(out, reference(*(t.cpu() for t in (qd, kd, vd)))):.2e}")
            print(f"  {str(dtype):15s} out {tuple(out.shape)}  {err}  ({took:.1f} s)")


if __name__ == "__main__":
    main()
