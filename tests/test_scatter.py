"""attnc.scatter.scatter_sum: a param gradient's final, deterministic reduction."""

from __future__ import annotations

import torch

from attnc.scatter import scatter_sum


def test_matches_a_plain_loop_and_drops_out_of_range():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, 7, generator=g)
    rows = torch.randint(-1, 4, (3, 1, 1), generator=g)  # -1 is outside [0, 3)
    cols = torch.randint(0, 6, (1, 5, 7), generator=g)  # 5 is outside [0, 5)
    got = scatter_sum(values, [rows, cols], (3, 5))
    want = torch.zeros(3, 5, dtype=torch.float64)
    r, c = torch.broadcast_tensors(rows, cols)
    for v, i, j in zip(values.reshape(-1).tolist(), r.reshape(-1).tolist(), c.reshape(-1).tolist()):
        if 0 <= i < 3 and 0 <= j < 5:
            want[i, j] += v
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scalar_and_float_indices():
    values = torch.arange(6.0).view(2, 3)
    got = scatter_sum(values, [torch.tensor(1), torch.tensor([[0.0, 1.0, 1.0]])], (2, 2))
    assert got.tolist() == [[0.0, 0.0], [3.0, 12.0]]


def test_repeated_calls_are_bitwise_equal():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, 200, 300, generator=g)
    index = [torch.randint(0, 17, (4, 200, 300), generator=g)]
    first = scatter_sum(values, index, (17,))
    assert all(torch.equal(first, scatter_sum(values, index, (17,))) for _ in range(3))
