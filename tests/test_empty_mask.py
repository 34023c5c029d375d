"""Masks that simplify to False (q_idx < 0, x & ~x) on the block-sparse path: a torch BlockMask,
an attnc BlockMask from explicit lists (`from_kv_blocks`) and a `block_sparse=True` spec.
Every row sees no key: out 0, lse -inf, and zero gradients for q, k, v and captured params,
as attnc's own create_block_mask path (the static kernel) gives."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

import attnc

B, H, M, N, D, BLOCK = 2, 2, 45, 37, 16, 16


def _negative_row(b, h, q_idx, kv_idx):
    return q_idx < 0


def _contradiction(b, h, q_idx, kv_idx):
    causal = q_idx >= kv_idx
    return ~causal & causal


def _every_block_partial(mask_mod):
    """Lists naming every key block of every query block as partial, so the kernel visits
    them all and evaluates the mask."""
    qb, kb = math.ceil(M / BLOCK), math.ceil(N / BLOCK)
    num = torch.full((B, H, qb), kb, dtype=torch.int32)
    idx = torch.arange(kb, dtype=torch.int32).expand(B, H, qb, kb).contiguous()
    return attnc.BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                          seq_lengths=(M, N))


ENTRIES = {
    "torch_create_block_mask": lambda mm: torch_block_mask(mm, B, H, M, N, device="cpu",
                                                           BLOCK_SIZE=BLOCK),
    "from_kv_blocks": _every_block_partial,
    "attnc_create_block_mask": lambda mm: attnc.create_block_mask(mm, B, H, M, N, device="cpu",
                                                                  BLOCK_SIZE=BLOCK),
}


def _assert_nothing_visible(out, lse, grads):
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("mask_mod", [_negative_row, _contradiction], ids=["q_idx<0", "x&~x"])
def test_an_always_false_mask_gives_zeros_and_no_gradient(mask_mod, entry):
    g = torch.Generator().manual_seed(41)
    q = torch.randn(B, H, M, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, H, N, D, generator=g, requires_grad=True) for _ in range(2))
    bias = torch.randn(N, generator=g, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    out, lse = attnc.flex_attention(q, k, v, score_mod=score_mod,
                                    block_mask=ENTRIES[entry](mask_mod), return_lse=True)
    d_out = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * d_out).sum(), (q, k, v, bias))
    _assert_nothing_visible(out, lse, grads)


def test_a_block_sparse_spec_whose_mask_is_false():
    kern = attnc.compile("attention never {\n  param w[h]\n  score = dot(q, k) * scale * w[h]\n"
                         "  mask = n < 0\n}\n", block_sparse=True, block_m=BLOCK, block_n=BLOCK)
    g = torch.Generator().manual_seed(42)
    q = torch.randn(B, H, M, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, H, N, D, generator=g, requires_grad=True) for _ in range(2))
    w = torch.rand(H, generator=g, requires_grad=True)
    out, lse = kern(q, k, v, w=w, block_mask=_every_block_partial(None), return_lse=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v, w))
    _assert_nothing_visible(out, lse, grads)
