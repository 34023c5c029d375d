"""attnc.sparse (MoBA, MInference vertical-slash) against dense eager references.

Kernel runs are few and small (each is a Triton-interpreter launch on the CPU); the block-list
properties are checked on many more shapes, since they need no kernel at all.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc import sparse
from attnc.testing import rel_error
from tests.sparse_reference import (masked_attention, moba_reference, moba_visible,
                                    vertical_slash_reference, vertical_slash_visible)

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _qkv(B, Hq, Hkv, M, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g)
    k = torch.randn(B, Hkv, M, D, generator=g)
    v = torch.randn(B, Hkv, M, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(out, lse, ref, ref_lse, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = rel_error(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 1e-4


# --- results against the references --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moba_gqa_ragged(dtype):
    # M = 130 with blocks of 32: 5 blocks, the last holding 2 keys; 4 query heads on 2 kv heads
    q, k, v = _qkv(2, 4, 2, 130, 32, seed=0, dtype=dtype)
    out, lse = sparse.moba(q, k, v, block_size=32, top_k=2, return_lse=True)
    assert out.dtype == dtype and out.shape == (2, 4, 130, 32)
    ref, ref_lse = moba_reference(q, k, v, 32, 2, return_lse=True)
    _check(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("top_k", [1, 9])
def test_moba_top_k_extremes(top_k):
    # top_k = 1: only the current block (block-diagonal causal); top_k = 9 > 5 blocks: every
    # earlier block, i.e. plain causal attention
    q, k, v = _qkv(1, 2, 2, 80, 16, seed=1)
    out, lse = sparse.moba(q, k, v, block_size=16, top_k=top_k, scale=0.3, return_lse=True)
    ref, ref_lse = moba_reference(q, k, v, 16, top_k, scale=0.3, return_lse=True)
    _check(out, lse, ref, ref_lse, torch.float32)
    m, n = torch.arange(80)[:, None], torch.arange(80)[None, :]
    expected = (n <= m) & ((n // 16 == m // 16) if top_k == 1 else True)
    assert rel_error(out, masked_attention(q, k, v, expected.expand(1, 2, 80, 80), 0.3)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vertical_slash_gqa_ragged(dtype):
    q, k, v = _qkv(2, 4, 2, 130, 32, seed=2, dtype=dtype)
    out, lse = sparse.vertical_slash(q, k, v, vertical=20, slash=8, last_q=32, block_size=32,
                                     return_lse=True)
    assert out.dtype == dtype and out.shape == (2, 4, 130, 32)
    ref, ref_lse = vertical_slash_reference(q, k, v, 20, 8, 32, return_lse=True)
    _check(out, lse, ref, ref_lse, dtype)


def test_vertical_slash_small_budget_and_everything():
    q, k, v = _qkv(1, 2, 1, 80, 16, seed=3)
    # vertical=0, slash=0: only the diagonal (offset 0) -> every row sees exactly itself
    out = sparse.vertical_slash(q, k, v, vertical=0, slash=0, last_q=16, block_size=16)
    assert rel_error(out, v.expand(1, 2, 80, 16)) <= 1e-6
    # budgets larger than the sequence keep every column: plain causal attention
    out, lse = sparse.vertical_slash(q, k, v, vertical=500, slash=500, last_q=500,
                                     block_size=16, scale=0.5, return_lse=True)
    ref, ref_lse = vertical_slash_reference(q, k, v, 500, 500, 500, scale=0.5, return_lse=True)
    _check(out, lse, ref, ref_lse, torch.float32)
    causal = (torch.arange(80)[None, :] <= torch.arange(80)[:, None]).expand(1, 2, 80, 80)
    assert rel_error(out, masked_attention(q, k, v, causal, 0.5)) <= 1e-4


# --- block lists ----------------------------------------------------------------------------------

def _eval_mask_mod(bm, B, H, M, N):
    """Evaluate the mask_mod eagerly on the whole [B, H, M, N] grid (test sizes only)."""
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)
    q_idx = torch.arange(M).view(1, 1, -1, 1)
    kv_idx = torch.arange(N).view(1, 1, 1, -1)
    return bm.mask_mod(b, h, q_idx, kv_idx).expand(B, H, M, N)


def _check_lists(bm, visible):
    B, H, M, N = visible.shape
    bq, bkv = bm.BLOCK_SIZE
    assert bm.seq_lengths == (M, N)
    QB, KB = math.ceil(M / bq), math.ceil(N / bkv)
    levels = bm.to_dense().expand(B, H, -1, -1)                # 0 skipped, 1 partial, 2 full
    assert levels.shape[-2:] == (QB, KB) and levels.max() <= 2
    m, n = torch.arange(M), torch.arange(N)
    per_elem = levels[:, :, m // bq][:, :, :, n // bkv]        # [B, H, M, N]
    missed = visible & (per_elem == 0)
    assert not missed.any(), f"visible but unlisted: {missed.nonzero()[:5].tolist()}"
    # a full block: every element of it exists (no ragged edge) and is visible
    padded = torch.zeros(B, H, QB * bq, KB * bkv, dtype=torch.bool)
    padded[:, :, :M, :N] = visible
    whole = padded.view(B, H, QB, bq, KB, bkv).all(5).all(3)
    assert not ((levels == 2) & ~whole).any(), "a block is listed full but is not fully visible"
    # the lists are also tight: no listed block is empty
    some = padded.view(B, H, QB, bq, KB, bkv).any(5).any(3)
    assert not ((levels > 0) & ~some).any(), "a listed block has no visible element"
    return levels


MOBA_CASES = [  # B, Hq, Hkv, M, D, block_size, top_k
    (1, 2, 2, 80, 16, 16, 1),
    (2, 4, 2, 130, 16, 32, 2),
    (1, 4, 1, 130, 32, 16, 3),
    (2, 2, 2, 128, 16, 16, 20),
    (1, 2, 2, 20, 16, 32, 3),    # one ragged block
    (1, 3, 1, 257, 16, 16, 4),
]


@pytest.mark.parametrize("case", MOBA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_moba_block_lists_cover_mask(case):
    B, Hq, Hkv, M, D, bs, top_k = case
    q, k, _ = _qkv(B, Hq, Hkv, M, D, seed=10 + M)
    bm = sparse.moba_block_mask(q, k, block_size=bs, top_k=top_k)
    visible = moba_visible(q, k, bs, top_k)
    assert torch.equal(_eval_mask_mod(bm, B, Hq, M, M), visible)
    levels = _check_lists(bm, visible)
    if top_k >= 3 and M >= 4 * bs:
        assert (levels == 2).any()   # the case exercises full blocks
    # the per-token selection has exactly min(top_k, c + 1) blocks for a row in block c
    chosen = torch.zeros(B, Hq, M, math.ceil(M / bs), dtype=torch.int64)
    chosen.scatter_add_(-1, (torch.arange(M) // bs).expand(B, Hq, M, M), visible.long())
    rows_blocks = (chosen > 0).sum(-1)
    assert torch.equal(rows_blocks, (torch.arange(M) // bs + 1).clamp(max=top_k).expand(B, Hq, M))


VS_CASES = [  # B, Hq, Hkv, M, D, block_size, vertical, slash, last_q
    (1, 2, 2, 80, 16, 16, 8, 4, 16),
    (2, 4, 2, 130, 16, 32, 20, 8, 32),
    (1, 4, 1, 130, 32, 16, 3, 2, 64),
    (1, 2, 2, 257, 16, 16, 30, 10, 40),
    (1, 2, 1, 20, 16, 32, 2, 1, 5),
    (1, 2, 2, 100, 16, 16, 0, 0, 100),
]


@pytest.mark.parametrize("case", VS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_vertical_slash_block_lists_cover_mask(case):
    B, Hq, Hkv, M, D, bs, vertical, slash, last_q = case
    q, k, _ = _qkv(B, Hq, Hkv, M, D, seed=20 + M)
    bm = sparse.vertical_slash_block_mask(q, k, vertical=vertical, slash=slash, last_q=last_q,
                                          block_size=bs)
    visible = vertical_slash_visible(q, k, vertical, slash, last_q)
    assert torch.equal(_eval_mask_mod(bm, B, Hq, M, M), visible)
    levels = _check_lists(bm, visible)
    assert not (levels == 2).any()
    # offset 0 is always kept: every row sees its own key
    assert visible.diagonal(dim1=-2, dim2=-1).all()


def test_block_list_layout():
    """Lists have torch's layout: [B, H, QB] counts and [B, H, QB, KB] int32 indices."""
    q, k, _ = _qkv(1, 2, 2, 130, 16, seed=5)
    for bm in (sparse.moba_block_mask(q, k, block_size=32, top_k=2),
               sparse.vertical_slash_block_mask(q, k, block_size=32, last_q=8)):
        assert bm.kv_num_blocks.shape == (1, 2, 5) and bm.kv_indices.shape == (1, 2, 5, 5)
        assert bm.kv_indices.dtype == torch.int32 and bm.device == q.device
        assert 0.0 <= bm.sparsity() < 100.0


# --- empty block lists ----------------------------------------------------------------------------

def test_empty_block_list_gives_zero_rows():
    B, H, M, D, bs = 1, 2, 80, 16, 16               # 5 x 5 blocks
    q, k, v = _qkv(B, H, H, M, D, seed=7)
    # per head, per query block: partial lists, full lists (listed in no particular order;
    # trailing entries past the count are junk on purpose)
    partial = [[[1, 0], [], [2], [], [4, 2, 3]],
               [[3], [1], [], [], [4]]]                  # head 1, block 0: only a masked block
    full = [[[], [], [0], [], [1, 0]],
            [[], [0], [], [], [3, 1, 2, 0]]]
    QB = KB = M // bs

    def lists(spec):
        num = torch.tensor([[len(row) for row in head] for head in spec], dtype=torch.int32)
        idx = torch.full((H, QB, KB), 3, dtype=torch.int32)
        for h, head in enumerate(spec):
            for i, row in enumerate(head):
                idx[h, i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return num[None], idx[None]

    num, idx = lists(partial)
    fnum, fidx = lists(full)
    bm = attnc.BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=bs,
                                        mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
                                        seq_lengths=(M, M))
    out, lse = attnc.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()

    blocks = torch.zeros(B, H, QB, KB, dtype=torch.bool)
    for h in range(H):
        for i in range(QB):
            blocks[0, h, i, partial[h][i] + full[h][i]] = True
    m = torch.arange(M)
    visible = blocks[:, :, m // bs][:, :, :, m // bs] & (m[None, :] <= m[:, None])
    empty = ~visible.any(-1)                                     # [B, H, M]
    assert empty[0, 0, 16:32].all() and empty[0, 0, 48:64].all() and empty[0, 1, 0:16].all()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    ref, ref_lse = masked_attention(q, k, v, visible, return_lse=True)
    _check(out, lse, ref, ref_lse, torch.float32)


# --- argument checks ------------------------------------------------------------------------------

def test_bad_arguments():
    q, k, v = _qkv(1, 2, 2, 40, 16, seed=8)
    for fn in (sparse.moba, sparse.vertical_slash):
        with pytest.raises(ValueError, match=r"M == N.*M=40 queries and N=32 keys"):
            fn(q, k[:, :, :32], v[:, :, :32])
        for bs in (24, 8, 0, True, 16.0):
            with pytest.raises(ValueError, match="block_size must be a power of two >= 16"):
                fn(q, k, v, block_size=bs)
        with pytest.raises(ValueError, match="must be a 4-D tensor"):
            fn(q[0], k, v)
        with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple"):
            fn(torch.randn(1, 3, 40, 16), k, v)
    for top_k in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="top_k must be an int >= 1"):
            sparse.moba(q, k, v, block_size=16, top_k=top_k)
    for name, bad in (("vertical", -1), ("slash", 1.5), ("last_q", 0)):
        with pytest.raises(ValueError, match=f"{name} must be an int >= "):
            sparse.vertical_slash(q, k, v, block_size=16, **{name: bad})
    with pytest.raises(ValueError, match="scale must be a Python number"):
        sparse.vertical_slash(q, k, v, block_size=16, scale="x")


def test_moba_gradients():
    """The block choice is piecewise constant, so gradients flow through the chosen blocks only:
    the block-sparse backward (dq over key lists, dk/dv over the transposed query lists)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 70, 16, seed=4))
    out = sparse.moba(q, k, v, block_size=16, top_k=2)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * d_out).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = moba_reference(*ref_leaves, 16, 2)
    (ref * d_out.double()).sum().backward()
    for got, want in zip((q, k, v), ref_leaves):
        assert rel_error(got.grad, want.grad) < 1e-5
