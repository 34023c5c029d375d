"""Comparisons of integer positions stay exact (attnc.expr.symbols.integral_relation): sympy
rewrites `m - n <= 6*h + 2` into `h >= m/6 - n/6 - 1/3`, which floating point gets wrong at ties;
the printer and the evaluator clear the denominators first."""

from __future__ import annotations

import math

import sympy
import torch

import attnc
from attnc.expr import symbols as S
from attnc.testing import rel_error


def test_denominators_are_cleared_only_for_integer_sides():
    rel = sympy.Ge(S.h, S.m / 6 - S.n / 6 - sympy.Rational(1, 3), evaluate=False)
    assert S.integral_relation(rel) == sympy.Ge(6 * S.h, S.m - S.n - 2, evaluate=False)
    real = sympy.Symbol("x", real=True)
    kept = sympy.Lt(real, S.m / 3, evaluate=False)
    assert S.integral_relation(kept) is kept
    whole = sympy.Lt(S.n, S.m + 1)
    assert S.integral_relation(whole) is whole


def test_a_window_that_grows_with_the_head_is_exact_at_its_edge():
    kernel = attnc.compile("attention head_window {\n  mask = n <= m and m - n <= 6 * h + 2\n}",
                           block_m=16, block_n=16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 37, 16) for _ in range(3))
    m, n = torch.arange(37)[:, None], torch.arange(37)[None, :]
    visible = (n <= m) & (m - n <= 6 * torch.arange(3)[:, None, None] + 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(16)).masked_fill(~visible, -math.inf)
    assert rel_error(kernel(q, k, v), torch.softmax(scores, -1) @ v) < 1e-5
