"""Eager references for attnc.sparse, written from the papers' definitions, not from its code.

Everything is dense: an explicit [B, Hq, M, N] visibility mask, then float64 softmax attention
(a row with no visible key gives zeros and lse = -inf).

The selections (MoBA's gates, MInference's estimate) are redone here independently: pooled keys
by slicing each block, selection by counting how many candidates beat each score (a rank), the
slash estimate by summing each diagonal through an explicit offset grid. They agree with
attnc.sparse's topk-based selection as long as scores have no ties, so tests use continuous
random data. The *scores* are computed in float32 from the same inputs in both, on purpose: a
float64 reference score could rank two nearly equal blocks differently from the float32 one and
flip a selection, which would be a difference of convention, not a bug. Only rounding-level
differences (summation order) remain, far below the gaps between random scores.
"""

from __future__ import annotations

import math

import torch


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    # kv head j serves query heads j * group .. (j + 1) * group - 1
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def masked_attention(q, k, v, visible, scale=None, return_lse=False):
    """softmax(q k^T * scale, restricted to `visible` [B, Hq, M, N]) @ v in float64."""
    Hq = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k64, v64 = _expand_heads(k, Hq).double(), _expand_heads(v, Hq).double()
    logits = (q.double() @ k64.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)                       # -inf on empty rows
    weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = weights @ v64                                          # empty rows: exp(-inf) = 0
    return (out, lse) if return_lse else out


def _rank_select(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """True where a candidate's score is among the `count` largest candidate scores of its row
    (last dimension): fewer than `count` candidates score strictly higher."""
    s = scores.masked_fill(~candidates, -math.inf)
    higher = (s[..., None, :] > s[..., :, None]).sum(-1)        # [..., j]: how many beat j
    return candidates & (higher < count)


# --- MoBA -----------------------------------------------------------------------------------------

def moba_visible(q, k, block_size, top_k):
    """[B, Hq, M, N] bool: MoBA's visibility."""
    B, Hq, M, _ = q.shape
    N = k.shape[2]
    nblocks = math.ceil(N / block_size)
    # gate in float32 (see module docstring)
    means = torch.stack([k[:, :, j * block_size:min((j + 1) * block_size, N)].float().mean(2)
                         for j in range(nblocks)], dim=2)                  # [B, Hkv, KB, D]
    gates = torch.einsum("bhmd,bhjd->bhmj", q.float(), _expand_heads(means, Hq))
    m = torch.arange(M)[:, None]
    j = torch.arange(nblocks)[None, :]
    own = j == m // block_size
    earlier = j < m // block_size
    chosen = own | _rank_select(gates, earlier.expand_as(gates), top_k - 1)   # [B, Hq, M, KB]
    n = torch.arange(N)
    blockwise = chosen[..., n // block_size]                                  # [B, Hq, M, N]
    return blockwise & (n[None, :] <= torch.arange(M)[:, None])


def moba_reference(q, k, v, block_size, top_k, scale=None, return_lse=False):
    return masked_attention(q, k, v, moba_visible(q, k, block_size, top_k), scale, return_lse)


# --- MInference vertical-slash -------------------------------------------------------------------

def vertical_slash_visible(q, k, vertical, slash, last_q, scale=None):
    """[B, Hq, M, N] bool: the vertical-slash visibility."""
    B, Hq, M, D = q.shape
    N = k.shape[2]
    last_q = min(last_q, M)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    m = torch.arange(M)[:, None]
    n = torch.arange(N)[None, :]
    causal = n <= m                                                          # [M, N]
    # estimate in float32 (see module docstring) from the last `last_q` query rows
    tail = slice(M - last_q, M)
    logits = torch.einsum("bhmd,bhnd->bhmn", q[:, :, tail].float(),
                          _expand_heads(k, Hq).float()) * scale
    probs = torch.softmax(logits.masked_fill(~causal[tail], -math.inf), dim=-1)
    col_score = probs.sum(2)                                                 # [B, Hq, N]
    offsets = (m - n)[tail]                                                  # [last_q, N]
    diag_score = torch.stack([(probs * (offsets == d)).sum((2, 3)) for d in range(M)], dim=-1)
    everything = torch.ones(B, Hq, N, dtype=torch.bool)
    cols = _rank_select(col_score, everything, vertical)                    # [B, Hq, N]
    diags = _rank_select(diag_score, everything[..., :M], slash)            # [B, Hq, M]
    diags[..., 0] = True
    on_diag = diags[..., (m - n).clamp(0, M - 1)]                            # [B, Hq, M, N]
    return causal & (cols[:, :, None, :] | on_diag)


def vertical_slash_reference(q, k, v, vertical, slash, last_q, scale=None, return_lse=False):
    visible = vertical_slash_visible(q, k, vertical, slash, last_q, scale)
    return masked_attention(q, k, v, visible, scale, return_lse)
