"""autodiff: the backward cascade, run by the reference interpreter, is the derivative of the
forward cascade.

`torch.autograd.gradcheck` (float64, finite differences) checks an autograd Function whose
forward interprets the forward cascade and whose backward interprets autodiff's cascade, for
every library variant and for hand-written specs that stress the differentiation (a param read
twice, max/abs, q.k inside nonlinear functions). Nothing here is a kernel.
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch

from attnc.backends.reference.cascade import interpret, interpret_backward
from attnc.expr import symbols as S
from attnc.expr.derivatives import derivative
from attnc.pipeline import Source, frontend, read_spec, run_passes
from tests.test_variants import VARIANTS

# Small option values so masks and biases bite at M = 6, N = 7.
OPTIONS = {"sliding_window": {"window": 3}, "softcap": {"cap": 1.5},
           "streaming": {"sinks": 1, "window": 2},
           "prefix_lm": {"prefix": 2}, "rel_bias": {"max_distance": 2},
           "neighborhood_1d": {"kernel_size": 3}, "dilated": {"window": 2, "dilation": 2},
           "chunked_local": {"chunk": 3}}


def _scheduled(src: Source, options=None):
    _, ir = frontend(src, dict(options or {}))
    return dict(run_passes(ir))["autodiff"]


def _inputs(c, B, H, M, N, g):
    """Random params (positive, for log) and inputs (sorted small ids) for a cascade's decls."""
    out = {}
    for d in c.extra_inputs:
        shape = [int(x.subs({S.B: B, S.H: H, S.M: M, S.N: N})) for x in d.dims]
        if d.kind.value == "param":
            out[d.name] = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5)
        else:
            out[d.name] = torch.randint(0, 2, shape, generator=g).sort(-1).values
    return out


class _Interpreted(torch.autograd.Function):
    """out, lse (with -inf rows made 0) by the forward cascade; gradients by autodiff's."""

    @staticmethod
    def forward(ctx, c, names, q, k, v, *params_and_inputs):
        inputs = dict(zip(names, params_and_inputs))
        res = interpret(c, q, k, v, inputs=inputs)
        ctx.save_for_backward(q, k, v, res["out"], res["lse"], *params_and_inputs)
        ctx.c, ctx.names = c, names
        finite = torch.isfinite(res["lse"])
        return res["out"], torch.where(finite, res["lse"], torch.zeros_like(res["lse"]))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        inputs = dict(zip(ctx.names, rest))
        grads = interpret_backward(ctx.c.backward, q, k, v, inputs=inputs,
                          saved={"O": out, "LSE": lse, "dO": dout, "dLSE": dlse})
        extra = [grads.get(f"d_{n}") for n in ctx.names]
        return (None, None, grads["dq"], grads["dk"], grads["dv"], *extra)


def _gradcheck(c, B=1, H=2, Hkv=1, M=6, N=7, D=3, Dv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, N, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = _inputs(c, B, H, M, N, g)
    for d in c.extra_inputs:
        inputs[d.name].requires_grad_(d.kind.value == "param")
    names = tuple(inputs)
    assert torch.autograd.gradcheck(
        lambda q, k, v, *rest: _Interpreted.apply(c, names, q, k, v, *rest),
        (q, k, v, *inputs.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_library_variant_gradcheck(name):
    c = _scheduled(read_spec(name), OPTIONS.get(name))
    assert c.backward is not None, c.no_backward
    _gradcheck(c)


PARAM_TWICE = """\
attention twice {
  param bias[M]
  score = dot(q, k) * scale + bias[m] - 2 * bias[n]
  mask = n <= m
}
"""

NONLINEAR = """\
attention nonlinear {
  param w[h]
  score = max(dot(q, k) * scale, -1) + abs(w[h]) * sigmoid(dot(q, k)) + softplus(w[h] * (m - n))
}
"""


@pytest.mark.parametrize("spec", [PARAM_TWICE, NONLINEAR], ids=["param_twice", "nonlinear"])
def test_hand_written_gradcheck(spec):
    """FlexAttention refuses a captured tensor read at two indices; the scatter sums both."""
    c = _scheduled(Source(spec, "<test>"))
    assert c.backward is not None, c.no_backward
    _gradcheck(c, M=7, N=7)


def test_param_read_twice_has_two_terms():
    c = _scheduled(Source(PARAM_TWICE, "<test>"))
    scatter = c.backward.cascade.node("d_bias")
    assert len(scatter.terms) == 2
    assert {str(ix[0]) for ix, _ in scatter.terms} == {"m", "n"}


def test_gqa_sums_key_gradients_over_the_group():
    c = _scheduled(read_spec("alibi"))
    _gradcheck(c, H=4, Hkv=2, M=5, N=5)


def test_not_differentiable_score_keeps_the_forward():
    spec = "attention stepped {\n  param p[h]\n  score = dot(q, k) * scale + p[h] % 1.5\n}\n"
    c = _scheduled(Source(spec, "<test>"))
    assert c.backward is None and "unevaluated" in c.no_backward


def test_an_undefined_derivative_keeps_the_forward_and_says_why():
    """log(relu(s)) divides by zero where s <= 0: no backward, rather than a kernel generator
    that meets an infinite constant."""
    spec = "attention logrelu {\n  score = log(relu(dot(q, k)))\n}\n"
    c = _scheduled(Source(spec, "<test>"))
    assert c.backward is None and "infinite or undefined" in c.no_backward


def test_derivative_writes_steps_as_piecewise():
    x = S.access("QK", S.m, S.n)
    for ex, at_2, at_minus_2 in ((sympy.Max(x, 0), 1, 0), (sympy.Abs(x), 1, -1)):
        d = derivative(ex, x)
        assert not d.has(sympy.Heaviside, sympy.sign)
        assert d.subs(x, 2) == at_2 and d.subs(x, -2) == at_minus_2


def test_fully_masked_rows_get_zero_gradients():
    """Rows that see no key (out = 0, lse = -inf) pass no gradient to anything."""
    spec = "attention strict {\n  mask = n < m\n}\n"
    c = _scheduled(Source(spec, "<test>"))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    res = interpret(c, q, k, v)
    assert math.isinf(res["lse"][0, 0, 0].item())
    dout = torch.zeros_like(res["out"])
    dout[:, :, 0] = 1.0  # only the empty row gets a gradient
    grads = interpret_backward(c.backward, q, k, v, saved={"O": res["out"], "LSE": res["lse"],
                                                           "dO": dout,
                                                 "dLSE": torch.ones_like(res["lse"])})
    for role in ("dq", "dk", "dv"):
        assert torch.isfinite(grads[role]).all()
    assert torch.equal(grads["dv"], torch.zeros_like(grads["dv"]))
    assert torch.equal(grads["dq"][:, :, 0], torch.zeros_like(grads["dq"][:, :, 0]))
