"""The kernel IR's verifier: what fuse must produce."""

from __future__ import annotations

from dataclasses import replace

import pytest
import sympy

from attnc.expr import symbols as S
from attnc.ir.kernel import LoadLevel, verify_kernel
from attnc.pipeline import frontend, read_spec, run_passes

SPEC = """attention k {
  param bias[h, 9]
  input doc[b, n]
  score = dot(q, k) * scale + bias[h, clamp(n - m, -4, 4) + 4]
  mask = n <= m and doc[b, m] == doc[b, n]
}
"""


def _kernel():
    return run_passes(frontend(read_spec(SPEC))[1])[-1][1]


def test_loads_sit_at_the_level_their_index_allows():
    k = _kernel()
    verify_kernel(k)
    assert {ld.name: ld.level for ld in k.loads} == {
        "bias_0": LoadLevel.TILE, "doc_0": LoadLevel.ROW, "doc_1": LoadLevel.KEY}
    with pytest.raises(AssertionError, match="wrong level"):
        verify_kernel(replace(k, loads=(replace(k.loads[0], level=LoadLevel.ROW),
                                        *k.loads[1:])))


def test_verify_kernel_rejects_stray_symbols_and_bad_loads():
    k = _kernel()
    with pytest.raises(AssertionError, match="reads"):
        verify_kernel(replace(k, score=k.score + sympy.Symbol("stray")))
    with pytest.raises(AssertionError, match="reads"):
        verify_kernel(replace(k, score=k.score + S.access("bias", S.h, 0)))
    with pytest.raises(AssertionError, match="does not match a declared tensor"):
        verify_kernel(replace(k, loads=(replace(k.loads[0], tensor="nope"), *k.loads[1:])))
    with pytest.raises(AssertionError, match="share a name"):
        verify_kernel(replace(k, loads=(k.loads[1], k.loads[1], k.loads[0])))
    with pytest.raises(AssertionError, match="mask reads q.k"):
        verify_kernel(replace(k, mask=sympy.And(k.mask, S.qk > 0)))
