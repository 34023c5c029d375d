"""The token top-k benchmark's pieces: its key lists are causal top-k lists, and its two torch
glue versions (a gather, a dense boolean mask) agree with each other and with attnc's kernel."""

from __future__ import annotations

import math

import torch

import attnc
from attnc.testing import rel_error
from benchmarks import gather


def test_lists_are_causal_and_padded():
    idx = gather.lists(2, 12, 12, 4, "cpu")
    assert idx.shape == (2, 12, 4)
    m = torch.arange(12)[None, :, None]
    assert bool(((idx <= m) | (idx < 0)).all())
    assert bool((idx[:, 0] >= 0).sum(-1).eq(1).all())  # row 0 can list key 0 only


def test_the_glue_versions_match_the_kernel():
    torch.manual_seed(0)
    B, H, L, D, K = 1, 2, 20, 16, 5
    q, k, v = (torch.randn(B, h, L, D) for h in (H, 1, 1))
    idx = gather.lists(B, L, L, K, "cpu")
    mask = torch.zeros(B, L, L + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(idx < 0, L, idx), True)
    scale = 1 / math.sqrt(D)
    dense = gather.torch_dense(q, k, v, mask[:, None, :, :L], scale)
    glued = gather.torch_gather(q, k, v, idx, scale)
    fused = attnc.load("token_topk", topk=K)(q, k, v, idx=idx, scale=scale)
    assert rel_error(glued, dense) < 1e-5 and rel_error(fused, dense) < 1e-5
