"""Every entry of the op table (attnc.expr.functions) in every place it is spelled: parsed in a
spec, traced in a FlexAttention mod, evaluated on torch tensors (the evaluator the production
path and the reference interpreters share), printed as Triton and run in a kernel, and
differentiated -- each against the entry's own torch meaning. A new entry is tested here
without editing this file."""

from __future__ import annotations

import importlib.util
import math

import pytest
import sympy
import torch

import attnc  # noqa: F401 -- first: on a CPU-only machine it selects Triton's interpreter
from attnc.backends.eager.evaluate import Evaluator
from attnc.backends.triton.printer import HELPERS, TritonPrinter
from attnc.expr import symbols as S
from attnc.expr.derivatives import derivative
from attnc.expr.functions import BY_FLEX, BY_NAME, FUNCTIONS, ArgKind, Function
from attnc.frontends.flex import Captures, trace_score_mod
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.cascade import QK

X, Z, W = sympy.symbols("x z w", real=True)
THRESHOLD = 0.1  # conditions are x > THRESHOLD


def _symbolic_args(f: Function) -> list:
    """x, then z, w for further numbers; a condition on x."""
    numbers = iter((X, Z, W))
    return [sympy.Gt(X, THRESHOLD) if kind is ArgKind.CONDITION else next(numbers)
            for kind in f.args]


def _values(f: Function, n: int = 64, seed: int = 0) -> dict:
    """Random float64 values for x, z, w: positive where the function needs it; z <= w so a
    clamp's bounds are ordered."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0.5, 2.0) if f.positive else (-2.0, 2.0)
    x = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    z, w = sorted((lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
                   for _ in range(2)), key=lambda t: float(t.mean()))
    return {X: x, Z: torch.minimum(z, w), W: torch.maximum(z, w)}


def _reference(f: Function, values: dict) -> torch.Tensor:
    """f's torch meaning on the same arguments as `_symbolic_args`."""
    if f.args[0] is ArgKind.CONDITION:  # where(x > THRESHOLD, x, z)
        return f.torch(values[X] > THRESHOLD, values[X], values[Z])
    return f.torch(*(values[s] for s in (X, Z, W)[:len(f.args)]))


@pytest.mark.parametrize("f", FUNCTIONS, ids=str)
def test_eager_evaluation(f):
    values = _values(f)
    got = Evaluator(values, values[X])(f.build(*_symbolic_args(f)))
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64),
                               _reference(f, values), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f", FUNCTIONS, ids=str)
def test_derivative(f):
    """The derivative in x that autodiff takes (sympy's, through the table's `derivative` for
    custom heads; kinks as Piecewise), evaluated, against torch autograd of the meaning."""
    values = _values(f, seed=1)
    d = derivative(f.build(*_symbolic_args(f)), X)
    got = torch.as_tensor(Evaluator(values, values[X])(d), dtype=torch.float64)
    x = values[X].clone().requires_grad_()
    want, = torch.autograd.grad(_reference(f, {**values, X: x}).sum(), x, allow_unused=True)
    torch.testing.assert_close(got.expand_as(x), torch.zeros_like(x) if want is None else want,
                               rtol=1e-10, atol=1e-10)


def _spec_args(f: Function) -> list[tuple[str, sympy.Expr]]:
    """(spec text, sympy) of each argument: q.k first, then numbers, a condition n <= m."""
    numbers = iter((("0.5", sympy.Float(0.5)), ("1.5", sympy.Float(1.5))))
    out = []
    for kind in f.args:
        if kind is ArgKind.CONDITION:
            out.append(("n <= m", sympy.Le(S.n, S.m)))
        elif not out or out[-1][0] == "n <= m":
            out.append(("dot(q, k)", S.access(QK, S.m, S.n)))
        else:
            out.append(next(numbers))
    return out


@pytest.mark.parametrize("f", list(BY_NAME.values()), ids=str)
def test_spec_spelling(f):
    args = _spec_args(f)
    text = f"attention t {{\n  score = {f.name}({', '.join(a for a, _ in args)})\n}}\n"
    assert lower(parse(text), text).score == f.build(*(x for _, x in args))


@pytest.mark.parametrize("name", sorted(BY_FLEX))
def test_flex_spelling(name):
    f = BY_FLEX[name]
    qk = S.access(QK, S.m, S.n) * S.scale
    fn = getattr(torch, name, None) or getattr(torch.nn.functional, name)
    assert trace_score_mod(lambda score, b, h, q_idx, kv_idx: fn(score), Captures()) \
        == f.build(qk)
    if hasattr(torch.Tensor, name):  # the Tensor method spelling too
        assert trace_score_mod(lambda score, b, h, q_idx, kv_idx: getattr(score, name)(),
                               Captures()) == f.build(qk)


def test_every_spec_function_is_in_the_table():
    """The spec language's functions are exactly the table's (and dot, its own)."""
    text = "attention t {\n  score = nosuch(dot(q, k))\n}\n"
    with pytest.raises(attnc.SpecError) as err:
        lower(parse(text), text)
    assert err.value.hint == "functions: " + ", ".join(sorted(set(BY_NAME) | {"dot"}))


@pytest.fixture(scope="module")
def triton_module(tmp_path_factory):
    """One kernel per function: y = f(x, z, w) elementwise, printed by the Triton printer."""
    pr = TritonPrinter({X: "x", Z: "z", W: "w"})
    bodies = []
    for i, f in enumerate(FUNCTIONS):
        bodies.append(f"""
@triton.jit
def fn{i}(X, Z, W, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    z = tl.load(Z + offs)
    w = tl.load(W + offs)
    y = {pr(f.build(*_symbolic_args(f)))} + tl.zeros([N], tl.float32)
    tl.store(Y + offs, y)
""")
    helpers = [HELPERS[name] for name in HELPERS if name in pr.helpers]
    path = tmp_path_factory.mktemp("ops") / "ops_kernels.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n"
                    + "\n\n".join(helpers + bodies))
    spec = importlib.util.spec_from_file_location("attnc_test_ops_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("i, f", list(enumerate(FUNCTIONS)), ids=[str(f) for f in FUNCTIONS])
def test_triton_spelling(triton_module, i, f):
    values = _values(f, seed=2)
    ins = [values[s].float().contiguous() for s in (X, Z, W)]
    y = torch.empty_like(ins[0])
    getattr(triton_module, f"fn{i}")[(1,)](*ins, y, N=len(y))
    want = _reference(f, {s: t.double() for s, t in zip((X, Z, W), ins)})
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=2e-6)
    assert math.isfinite(float(y.abs().max()))
