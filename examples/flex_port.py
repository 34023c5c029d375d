"""Bring FlexAttention code to attnc unchanged: the same mods, the same block masks.

    python examples/flex_port.py

Runs a few FlexAttention mods through attnc.flex_attention and through torch's own
flex_attention (eager, float64) and prints the error, the kernel attnc chose, and that a
re-created lambda reuses the compiled kernel. Small sizes: on a CPU the kernels run through
Triton's interpreter.
"""

import time
import warnings

import torch
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import attnc  # first: on a CPU-only machine attnc switches Triton to its interpreter
from attnc.testing import rel_error

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

B, H, H_KV, L, D = 2, 4, 2, 200, 64
g = torch.Generator().manual_seed(0)
q = torch.randn(B, H, L, D, generator=g)
k = torch.randn(B, H_KV, L, D, generator=g)
v = torch.randn(B, H_KV, L, D, generator=g)
bias = torch.randn(H, 2 * L - 1, generator=g) * 0.1
doc_ids = torch.randint(0, 4, (B, L), generator=g).sort(-1).values


def alibi(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * torch.exp2(-((h + 1) * 8.0 / H))


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + bias[h, q_idx - kv_idx + L - 1]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx < 64


def document(b, h, q_idx, kv_idx):
    return doc_ids[b, q_idx] == doc_ids[b, kv_idx]


cases = [
    ("alibi, causal", alibi, causal, 1),
    ("relative bias, sliding window", relative_bias, attnc.and_masks(causal, sliding_window), 1),
    ("causal document masking", None, attnc.and_masks(causal, document), B),
]
for name, score_mod, mask_mod, mask_b in cases:
    block_mask = attnc.create_block_mask(mask_mod, mask_b, None, L, L, BLOCK_SIZE=64)
    out = attnc.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                               enable_gqa=True)
    ref = torch_flex(q.double(), k.double(), v.double(), score_mod=score_mod,
                     block_mask=block_mask.to_torch(), enable_gqa=True)
    print(f"{name:32s} rel. error vs torch fp64 {rel_error(out, ref):.1e}   "
          f"blocks skipped {block_mask.sparsity():4.1f}%")

before = len(attnc.flex._KERNELS)
for step in range(3):  # a new lambda and new tensor values every step: traced, compiled once
    start = time.perf_counter()
    scale = torch.full((H,), 0.5 + step)
    attnc.flex_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64],
                         score_mod=lambda s, b, h, q_idx, kv_idx: s * scale[h], enable_gqa=True)
    print(f"step {step}: {time.perf_counter() - start:.2f} s, kernels compiled so far: "
          f"{len(attnc.flex._KERNELS) - before}")
