"""The softmax forward folds a score's factor (q·k * c, c one value per program) into exp2's
multiplier and takes each row's max (or, for c < 0, min) on raw q·k: every sign of c must give
the reference's out and lse, 0 included (uniform weights over the visible keys), whether c is
the runtime scale or a param per head (programs of one launch with different signs)."""

from __future__ import annotations

import pytest
import torch

import attnc
from tests.test_variants import check_variant

PER_HEAD = """attention signed_factor {
  param t[h]
  score = dot(q, k) * scale * t[h]
  mask = n <= m
}
"""


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_scale_of_any_sign(scale):
    check_variant("causal", torch.float32, (1, 1, 1, 33, 35, 16, 16), (16, 16), {}, scale, seed=3)


def test_factor_per_head_of_any_sign():
    """t[h] is negative, zero and positive."""
    g = torch.Generator().manual_seed(5)
    B, H, M, N, D = 1, 3, 33, 33, 16
    q, k, v = (torch.randn(B, H, x, D, generator=g) for x in (M, N, N))
    t = torch.tensor([-0.7, 0.0, 1.3])
    out, lse = attnc.compile(PER_HEAD, block_m=16, block_n=16)(
        q, k, v, scale=0.5, t=t, return_lse=True)
    m = torch.arange(M)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.5 * t.double()[:, None, None]
    s = s.masked_fill(m[None, :] > m[:, None], float("-inf"))
    torch.testing.assert_close(out, (s.softmax(-1) @ v.double()).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, s.logsumexp(-1).float(), rtol=1e-4, atol=1e-4)
