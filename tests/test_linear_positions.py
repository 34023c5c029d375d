"""Linear blocks whose updates read the step t and the head h as integers (t % 4, h % 2,
sqrt(t + 1), 2 ** (-h)): both kernels and their backward, against float64 loops written from
the math.

t and h are integers in the generated kernels, as sympy knows them: `t % 4` is integer modulo
(on a float copy of t the modulo helper failed inside the kernel), and where a float function
reads them the printer converts. A decay that is zero on some steps (a reset) has no log, so
the chunked form cannot carry it: that scan runs sequentially, with the generated backward.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.ir.linear_kernel import ScanBackward
from attnc.testing import rel_error

B, H, T, DK, DV = 2, 2, 45, 8, 12

RESET = """
linear reset_every_4 {
  state S[i, j]
  S[i, j] = where(t % 4 == 0, 0, S[i, j]) + k[i] * v[j]
  o[j] = sum(i) q[i] * scale * S[i, j]
}
"""

STEPPED = """
linear stepped {
  state S[i, j]
  let decay = where(t % 4 == 0, 0.5, 1) * where(h % 2 == 0, 1 - 2 ** (-2 - h), 1)
  S[i, j] = decay * S[i, j] + k[i] * v[j] / sqrt(t + 1)
  o[j] = sum(i) q[i] * scale * S[i, j]
}
"""


def _reset_loop(q, k, v, S0):
    S, out = S0, []
    for t in range(q.shape[2]):
        S = (torch.zeros_like(S) if t % 4 == 0 else S) + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((q[:, :, t, :, None] * S).sum(-2) / math.sqrt(q.shape[-1]))
    return torch.stack(out, 2), S


def _stepped_loop(q, k, v, S0):
    S, out = S0, []
    heads = torch.arange(q.shape[1], dtype=torch.float64)
    per_head = torch.where(heads % 2 == 0, 1 - 2.0 ** (-2 - heads), 1.0).view(1, -1, 1, 1)
    for t in range(q.shape[2]):
        decay = (0.5 if t % 4 == 0 else 1.0) * per_head
        S = decay * S + k[:, :, t, :, None] * v[:, :, t, None, :] / math.sqrt(t + 1)
        out.append((q[:, :, t, :, None] * S).sum(-2) / math.sqrt(q.shape[-1]))
    return torch.stack(out, 2), S


def _compare(kernel, loop, algorithm):
    gen = torch.Generator().manual_seed(31)
    q, k = (torch.randn(B, H, T, DK, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=gen)
    S0 = torch.randn(B, H, DK, DV, generator=gen)
    d_o, d_s = torch.randn(B, H, T, DV, generator=gen), torch.randn(B, H, DK, DV, generator=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, S0)]
    out, final = kernel(*leaves[:3], initial_state=leaves[3], output_final_state=True,
                        algorithm=algorithm)
    got = torch.autograd.grad((out * d_o).sum() + (final * d_s).sum(), leaves)
    ref = [x.double().requires_grad_() for x in (q, k, v, S0)]
    want_out, want_final = loop(*ref)
    want = torch.autograd.grad((want_out * d_o.double()).sum()
                               + (want_final * d_s.double()).sum(), ref, allow_unused=True)
    assert rel_error(out, want_out) < 1e-5
    assert rel_error(final, want_final) < 1e-5
    for name, a, b in zip(("q", "k", "v", "initial_state"), got, want):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        assert rel_error(a, b) < 1e-5, name


def test_a_reset_at_every_fourth_step():
    """The update zeroes its state where t % 4 == 0: not chunked (the decay vanishes), the
    recurrent kernel and the generated backward; the initial state is reset at t = 0, so its
    gradient is zero."""
    kernel = attnc.compile(RESET)
    assert not kernel.scan.schedule.chunked
    assert "not positive" in kernel.scan.schedule.reason
    assert kernel.plan.backward is ScanBackward.RECURRENT
    _compare(kernel, _reset_loop, None)


@pytest.mark.parametrize("algorithm", ["chunked", "recurrent"])
def test_decays_and_inputs_of_step_and_head(algorithm):
    """A positive decay halved where t % 4 == 0 and set per head by h % 2 and 2 ** (-2 - h), an
    input scaled by 1 / sqrt(t + 1): chunked (scalar decay) and recurrent, forward and
    backward."""
    kernel = attnc.compile(STEPPED)
    assert kernel.scan.schedule.chunked, kernel.scan.schedule.reason
    _compare(kernel, _stepped_loop, algorithm)
