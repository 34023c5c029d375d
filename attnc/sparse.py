"""Content-sparse attention: key blocks chosen from the data, run by flex_attention's kernels.

Two recipes from the literature, each split into a *selection* step (cheap torch ops on the
inputs' device) and an *attention* step (`attnc.flex_attention` with a block-sparse BlockMask):

  * `moba` -- MoBA, Mixture of Block Attention (Lu et al., 2025). Causal self-attention in which
    every query token attends to its own key block plus the (top_k - 1) earlier key blocks whose
    mean-pooled key scores highest against the query.
  * `vertical_slash` -- MInference's vertical-slash pattern. The last `last_q` queries estimate
    which key columns ("vertical" lines) and which diagonals q_idx - kv_idx ("slash" lines)
    carry attention mass; every query then attends causally to the kept columns and diagonals.

Contract shared by both:
  * q [B, Hq, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], with M == N (self-attention; the
    selections are defined on positions of one sequence) and Hq a multiple of Hkv (query head h
    reads kv head h // (Hq // Hkv), as in grouped-query attention).
  * The result is exactly the dense masked softmax attention for the selected pattern: the block
    lists cover every visible element (and list no block without one), the per-element mask is
    applied inside partial blocks, and a block is "full" only if the mask is true on all of it.
    flex_attention's conventions hold: `out` [B, Hq, M, Dv] in q's dtype, or
    `(out, lse)` with `return_lse=True`; a row that sees no key would give 0 and lse = -inf
    (neither recipe produces such a row: the diagonal is always visible).
  * Selection work and memory are O(rows x key blocks) (MoBA's per-token block choice),
    O(last_q x N) (the vertical-slash estimate) and O(query blocks x key blocks) (block lists).
    No M x N mask is ever built; the kernel evaluates the mask_mod only inside listed blocks.
  * Selection scores (MoBA's gates, the vertical-slash estimate) are computed in float32
    whatever the input dtype, so a bf16 and an fp32 run of the same data choose the same blocks
    up to rounding of the inputs themselves.
  * `moba_block_mask` / `vertical_slash_block_mask` return the BlockMask alone, for inspection
    (sparsity, to_dense) or to reuse one selection across several calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnc.block_mask import BlockMask, dense_to_ordered

__all__ = ["moba", "vertical_slash", "moba_block_mask", "vertical_slash_block_mask"]


# --- argument checks -----------------------------------------------------------------------------

def _check_int(fn: str, name: str, value, lo: int) -> int:
    # bool is an int subclass; True as a block size is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {value!r}")
    return value


def _check_block_size(fn: str, block_size) -> int:
    # The block-sparse kernel tiles inside a mask block, so it needs the same sizes it accepts.
    if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16
            or block_size & (block_size - 1)):
        raise ValueError(f"{fn}: block_size must be a power of two >= 16, got {block_size!r}")
    return block_size


def _check_qkv(fn: str, q, k, v) -> tuple[int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a 4-D tensor [B, H, L, D], got {got}")
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if M != N:
        raise ValueError(f"{fn}: needs self-attention with as many queries as keys (M == N), got "
                         f"M={M} queries and N={N} keys; the selection is defined on positions of "
                         "one sequence")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{fn}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{fn}: k {tuple(k.shape)} does not match q {tuple(q.shape)} "
                         "(batch or head dim)")
    return B, Hq, Hkv, M, D


def _attend(q, k, v, block_mask, scale, return_lse):
    from attnc.flex import flex_attention
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale,
                          enable_gqa=q.shape[1] != k.shape[1], return_lse=return_lse)


# --- MoBA ----------------------------------------------------------------------------------------

def moba_block_mask(q, k, *, block_size: int = 64, top_k: int = 3) -> BlockMask:
    """MoBA's selection as a BlockMask (see `moba`). Its mask_mod reads the per-token selection
    `sel[B, Hq, M, key blocks]` and applies causality."""
    fn = "moba"
    B, Hq, Hkv, M, D = _check_qkv(fn, q, k, k)
    bs = _check_block_size(fn, block_size)
    top_k = _check_int(fn, "top_k", top_k, 1)
    N = M
    dev = q.device
    KB = -(-N // bs)
    group = Hq // Hkv

    # Mean-pool each key block. Zero-padding the ragged tail and dividing by the real count makes
    # the last block the mean of its real keys only, with one reshape instead of a loop.
    kf = F.pad(k.float(), (0, 0, 0, KB * bs - N))
    counts = (N - torch.arange(KB, device=dev) * bs).clamp(max=bs).to(torch.float32)
    pooled = kf.view(B, Hkv, KB, bs, D).sum(3) / counts[:, None]
    # Query head h gates against its kv head h // group: repeat the (small) pooled keys rather
    # than the queries' heads.
    pooled = pooled.repeat_interleave(group, dim=1)                        # [B, Hq, KB, D]
    gate = q.float() @ pooled.transpose(-1, -2)                            # [B, Hq, M, KB]

    rows = torch.arange(M, device=dev)
    blocks = torch.arange(KB, device=dev)
    current = (rows // bs)[:, None]                                        # [M, 1]
    past = blocks[None, :] < current                                       # [M, KB]
    sel = (blocks[None, :] == current).expand(B, Hq, M, KB).clone()
    extra = min(top_k - 1, KB - 1)  # at most KB - 1 blocks lie in any row's past
    if extra > 0:
        # Non-past blocks get -inf so they lose to every real gate; rows with fewer than `extra`
        # past blocks still get some of them from topk, and `& past` drops those again.
        ranked = gate.masked_fill(~past, -math.inf).topk(extra, dim=-1).indices
        picked = torch.zeros_like(sel).scatter_(-1, ranked, True)
        sel |= picked & past

    # Block lists: a query block visits the union of its rows' choices. Padding the ragged last
    # query block with unselected rows makes `all` false there, so it never gets full blocks.
    QB = KB
    padded = F.pad(sel, (0, 0, 0, QB * bs - M), value=False).view(B, Hq, QB, bs, KB)
    any_row, all_rows = padded.any(3), padded.all(3)
    qb = torch.arange(QB, device=dev)[:, None]
    # Full means the mask_mod is true on every element: every row chose the block, and causality
    # holds for all pairs only if the key block ends before the query block starts (j < i) and
    # lies wholly inside the keys.
    strictly_before = (blocks[None, :] < qb) & ((blocks[None, :] + 1) * bs <= N)
    full = all_rows & strictly_before
    partial = any_row & ~full
    kv_num, kv_idx = dense_to_ordered(partial)
    full_num, full_idx = dense_to_ordered(full)

    sel = sel.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return sel[b, h, q_idx, kv_idx // bs] & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs,
                                    mask_mod=mask_mod, seq_lengths=(M, N))


def moba(q, k, v, *, block_size: int = 64, top_k: int = 3, scale=None, return_lse: bool = False):
    """MoBA (Mixture of Block Attention), causal self-attention.

    Keys are split into blocks of `block_size`, each represented by the mean of its keys. Query
    token m (in block c = m // block_size) attends causally to block c and to the top (top_k - 1)
    earlier blocks j < c by gate q_m . mean(k_block_j) (all earlier blocks if fewer exist).
    Returns out [B, Hq, M, Dv] (and lse [B, Hq, M] with return_lse=True).
    """
    _check_qkv("moba", q, k, v)
    bm = moba_block_mask(q, k, block_size=block_size, top_k=top_k)
    return _attend(q, k, v, bm, scale, return_lse)


# --- MInference vertical-slash -------------------------------------------------------------------

def _estimate(q, k, last_q: int, scale: float):
    """Vertical (per key) and slash (per offset q_idx - kv_idx) attention mass of the last
    `last_q` queries under causal softmax, in float32: two [B, Hq, N] tensors."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dev = q.device
    # Fold the query heads of a group into the row axis so each kv head's keys are read once,
    # instead of repeating keys per query head.
    qs = q[:, :, M - last_q:].float().reshape(B, Hkv, group * last_q, D)
    logits = (qs @ k.float().transpose(-1, -2)).view(B, Hq, last_q, N) * scale
    rows = torch.arange(M - last_q, M, device=dev)[:, None]
    cols = torch.arange(N, device=dev)[None, :]
    causal = cols <= rows                                                  # [last_q, N]
    # Every estimating row sees key 0, so no row is all -inf and softmax stays finite.
    probs = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
    vertical = probs.sum(2)                                                # [B, Hq, N]
    # Offset of each (row, key); masked pairs carry probability 0, so sending them to offset 0
    # (any in-range slot would do) adds nothing.
    offset = (rows - cols).clamp(min=0).reshape(1, 1, -1).expand(B, Hq, -1)
    slash = torch.zeros(B, Hq, M, device=dev, dtype=torch.float32)
    slash.scatter_add_(-1, offset, probs.reshape(B, Hq, -1))
    return vertical, slash


def _top_indicator(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    count = min(count, scores.shape[-1])
    if count > 0:
        keep.scatter_(-1, scores.topk(count, dim=-1).indices, True)
    return keep


def vertical_slash_block_mask(q, k, *, vertical: int = 64, slash: int = 16, last_q: int = 64,
                              block_size: int = 64, scale=None) -> BlockMask:
    """The vertical-slash selection as a BlockMask (see `vertical_slash`). Its mask_mod reads
    `vcol[B, Hq, N]` (kept key columns) and `sdiag[B, Hq, M]` (kept offsets q_idx - kv_idx)."""
    fn = "vertical_slash"
    B, Hq, Hkv, M, D = _check_qkv(fn, q, k, k)
    bs = _check_block_size(fn, block_size)
    vertical = _check_int(fn, "vertical", vertical, 0)
    slash = _check_int(fn, "slash", slash, 0)
    last_q = _check_int(fn, "last_q", last_q, 1)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{fn}: scale must be a Python number or None, got {scale!r}")
    N = M
    dev = q.device
    last_q = min(last_q, M)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    vscore, sscore = _estimate(q, k, last_q, scale)
    vcol = _top_indicator(vscore, vertical)                                # [B, Hq, N]
    sdiag = _top_indicator(sscore, slash)                                  # [B, Hq, M]
    sdiag[..., 0] = True  # the diagonal: every query keeps its own key

    # Block lists, all pairs at once. Query block i holds rows [r0, r1], key block j keys
    # [c0, c1] (ragged last blocks end at M - 1 / N - 1).
    QB = KB = -(-N // bs)
    starts = torch.arange(QB, device=dev) * bs
    r0, r1 = starts[:, None], (starts + bs).clamp(max=M)[:, None] - 1      # [QB, 1]
    c0, c1 = starts[None, :], (starts + bs).clamp(max=N)[None, :] - 1      # [1, KB]
    causal = c0 <= r1
    # Vertical: block j matters for block i iff its first kept column is <= r1 (that column is
    # then visible to row r1). The sentinel N marks "no kept column".
    first_col = F.pad(torch.where(vcol, torch.arange(N, device=dev), N), (0, KB * bs - N),
                      value=N).view(B, Hq, KB, bs).amin(-1)                # [B, Hq, KB]
    by_vertical = first_col[:, :, None, :] <= r1                           # [B, Hq, QB, KB]
    # Slash: the pair's offsets m - n fill exactly the integer range [r0 - c1, r1 - c0]; clipped
    # to valid offsets [0, M - 1] it is non-empty only for causal-possible pairs. A prefix sum
    # over the kept-offset indicator counts kept offsets in every range with two gathers.
    lo = (r0 - c1).clamp(min=0)
    hi = (r1 - c0).clamp(max=M - 1)
    nonempty = hi >= lo
    prefix = F.pad(sdiag.to(torch.int32).cumsum(-1), (1, 0))               # [B, Hq, M + 1]
    lo_i = torch.where(nonempty, lo, 0)
    hi_i = torch.where(nonempty, hi + 1, 0)
    kept = prefix[:, :, hi_i] - prefix[:, :, lo_i]                         # [B, Hq, QB, KB]
    by_slash = nonempty & (kept > 0)
    partial = causal & (by_vertical | by_slash)
    kv_num, kv_idx = dense_to_ordered(partial)

    vcol, sdiag = vcol.contiguous(), sdiag.contiguous()
    last = M - 1

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (vcol[b, h, kv_idx]
                                    | sdiag[b, h, torch.clamp(q_idx - kv_idx, 0, last)])

    # Only partial blocks: a block is rarely wholly covered by lines, and the saving is small.
    return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(M, N))


def vertical_slash(q, k, v, *, vertical: int = 64, slash: int = 16, last_q: int = 64,
                   block_size: int = 64, scale=None, return_lse: bool = False):
    """MInference's vertical-slash sparse attention, causal self-attention.

    The last `last_q` queries' causal softmax (float32, per head) scores each key column (sum
    over those queries) and each offset d = q_idx - kv_idx >= 0 (sum along the diagonal). The
    top `vertical` columns and top `slash` offsets per (b, h) are kept, offset 0 always. Query m
    sees key n iff n <= m and (n is a kept column or m - n is a kept offset).
    Returns out [B, Hq, M, Dv] (and lse [B, Hq, M] with return_lse=True).
    """
    _check_qkv("vertical_slash", q, k, v)
    bm = vertical_slash_block_mask(q, k, vertical=vertical, slash=slash, last_q=last_q,
                                   block_size=block_size, scale=scale)
    return _attend(q, k, v, bm, scale, return_lse)
