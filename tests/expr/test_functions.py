"""Every entry of the op table (attnc.expr.functions) in every place it is spelled: parsed in a
spec, traced in a FlexAttention mod, evaluated on torch tensors (the evaluator the production
path and the reference interpreters share), printed as Triton and run in a kernel, and
differentiated -- each against the entry's own torch meaning. A new entry is tested here
without editing this file."""

from __future__ import annotations

import functools
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
    return _printed_kernel(tmp_path_factory.mktemp("ops"),
                           [f.build(*_symbolic_args(f)) for f in FUNCTIONS])


@pytest.mark.parametrize("i, f", list(enumerate(FUNCTIONS)), ids=[str(f) for f in FUNCTIONS])
def test_triton_spelling(triton_module, i, f):
    values = _values(f, seed=2)
    y = triton_module[i](values)
    want = _reference(f, {s: values[s].float().double() for s in (X, Z, W)})
    torch.testing.assert_close(y, want, rtol=2e-6, atol=2e-6)
    assert math.isfinite(float(y.abs().max()))


# --- kinks: torch autograd's value where a derivative jumps -----------------------------------

def _numbers(f: Function) -> list:
    """The symbols of f's number arguments (where's condition is not one)."""
    return [s for s in _symbolic_args(f) if isinstance(s, sympy.Symbol)]


def _tied(f: Function) -> dict:
    """Values on every kink: x = z, x = w, z = w with x above them (a clamp with equal
    bounds; below them torch passes no gradient at all, attnc passes it to hi), all three
    equal, and unless f needs positive arguments x = 0 (relu, abs) and x = THRESHOLD (where's
    condition); the rest random."""
    v = _values(f, n=64, seed=3)
    x, z, w = (v[s].clone() for s in (X, Z, W))
    x[0:6] = z[0:6]
    x[6:12] = w[6:12]
    z[12:18] = w[12:18]
    x[12:18] = w[12:18] + 0.25
    z[18:24] = x[18:24]
    w[18:24] = x[18:24]
    if not f.positive:
        x[24:30] = 0.0
        x[30:36] = THRESHOLD
    return {X: x, Z: z, W: w}


def _autograd(fn, values: dict, wrt) -> torch.Tensor:
    """d sum(fn(values)) / d values[wrt], zeros where fn does not read it."""
    leaf = values[wrt].clone().requires_grad_()
    got, = torch.autograd.grad(torch.as_tensor(fn({**values, wrt: leaf})).sum(), leaf,
                               allow_unused=True)
    return torch.zeros_like(leaf) if got is None else got


def _printed_kernel(tmp_path, exprs: list) -> list:
    """One Triton kernel per expression over x, z, w, printed by the Triton printer: the
    functions that run them on float32 tensors."""
    pr = TritonPrinter({X: "x", Z: "z", W: "w"})
    bodies = [f"""
@triton.jit
def fn{i}(X, Z, W, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    z = tl.load(Z + offs)
    w = tl.load(W + offs)
    y = {pr(ex)} + tl.zeros([N], tl.float32)
    tl.store(Y + offs, y)
""" for i, ex in enumerate(exprs)]
    helpers = [HELPERS[name] for name in HELPERS if name in pr.helpers]
    path = tmp_path / f"kinks_{len(exprs)}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n"
                    + "\n\n".join(helpers + bodies))
    spec = importlib.util.spec_from_file_location(f"attnc_test_kinks_{tmp_path.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(i, values):
        ins = [values[s].float().contiguous() for s in (X, Z, W)]
        y = torch.empty_like(ins[0])
        getattr(module, f"fn{i}")[(1,)](*ins, y, N=len(y))
        return y.double()
    return [functools.partial(run, i) for i in range(len(exprs))]


@pytest.mark.parametrize("f", FUNCTIONS, ids=str)
def test_derivatives_at_kinks_are_torch_autograds(f, tmp_path):
    """At exact ties (max(x, z) with x == z, relu(0), |0|, clamp at a bound, where on its
    threshold) the derivative in each argument equals torch autograd's through the entry's
    meaning: as sympy gives it, evaluated, printed as Triton and run, and through autograd of
    the eager evaluator."""
    values = _tied(f)
    expr = f.build(*_symbolic_args(f))
    numbers = _numbers(f)
    kernels = _printed_kernel(tmp_path, [derivative(expr, s) for s in numbers])
    for s, kernel in zip(numbers, kernels):
        want = _autograd(lambda v: _reference(f, v), values, s)
        d = derivative(expr, s)
        got = torch.as_tensor(Evaluator(values, values[X])(d), dtype=torch.float64)
        torch.testing.assert_close(got.expand_as(want), want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"d/d{s}: {m}")
        evaluated = _autograd(lambda v: Evaluator(v, v[X])(expr), values, s)
        torch.testing.assert_close(evaluated, want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"evaluator d/d{s}: {m}")
        torch.testing.assert_close(kernel(values), want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"Triton d/d{s}: {m}")


@pytest.mark.parametrize("name", ["min", "max"])
def test_ties_of_min_and_max_share_the_gradient_evenly(name, tmp_path):
    """min/max of two equal values give each 1/2 (torch.minimum / torch.maximum); of three,
    each of the tied ones an equal share, as torch's amin / amax over them do (sympy's own
    derivative would give all three 1/2)."""
    f = BY_NAME[name]
    g = torch.Generator().manual_seed(4)
    x, z, w = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(3))
    beyond = 1.0 if name == "min" else -1.0  # the third argument loses
    x[:10] = z[:10]              # two-way ties
    w[:10] = x[:10] + beyond
    x[10:20] = w[10:20]
    z[10:20] = x[10:20] + beyond
    z[20:30] = x[20:30]          # three-way ties
    w[20:30] = x[20:30]
    values = {X: x, Z: z, W: w}
    a, b = x[:10].clone().requires_grad_(), z[:10].clone().requires_grad_()
    assert all(d.eq(0.5).all() for d in torch.autograd.grad(f.torch(a, b).sum(), (a, b)))
    expr = f.build(X, Z, W)
    reduce = torch.amax if name == "max" else torch.amin
    kernels = _printed_kernel(tmp_path, [derivative(expr, s) for s in (X, Z, W)])
    for s, kernel in zip((X, Z, W), kernels):
        want = _autograd(lambda v: reduce(torch.stack([v[X], v[Z], v[W]]), 0), values, s)
        got = torch.as_tensor(Evaluator(values, x)(derivative(expr, s)), dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_autograd(lambda v: Evaluator(v, v[X])(expr), values, s),
                                   want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kernel(values), want, rtol=1e-6, atol=1e-6)
    dx = Evaluator(values, x)(derivative(expr, X))
    assert dx[:10].eq(0.5).all() and (dx[20:30] - 1 / 3).abs().max() < 1e-15


def test_boolean_forms_sympy_produces_are_printed_and_evaluated(tmp_path):
    """A min/max/clamp of a where differentiates, and a where compared, simplify to sympy's
    ITE; mods may also build Xor, and sympy may rewrite conditions as Implies, Equivalent,
    Nand or Nor. Each is evaluated and printed as Triton, against torch."""
    pw = sympy.Piecewise((X, Z > 0), (2 * X, True))
    exprs = [
        derivative(sympy.Min(pw, 1.5), X),
        sympy.Piecewise((X, pw > 0.2), (W, True)),
        sympy.Piecewise((X, sympy.Xor(X > 0, Z > 0)), (W, True)),
        sympy.Piecewise((X, sympy.Implies(X > 0, Z > 0)), (W, True)),
        sympy.Piecewise((X, sympy.Equivalent(X > 0, Z > 0)), (W, True)),
        sympy.Piecewise((X, sympy.Nand(X > 0, Z > 0)), (W, True)),
        sympy.Piecewise((X, sympy.Nor(X > 0, Z > 0)), (W, True)),
    ]
    assert exprs[0].has(sympy.ITE) and exprs[1].has(sympy.ITE)

    def meanings(v):
        x, z, w = v[X], v[Z], v[W]
        p = torch.where(z > 0, x, 2 * x)
        return [torch.where(z > 0, 1.0, 2.0) * torch.where(p < 1.5, 1.0, torch.where(
                    p == 1.5, 0.5, 0.0)),
                torch.where(p > 0.2, x, w),
                torch.where((x > 0) ^ (z > 0), x, w),
                torch.where(~(x > 0) | (z > 0), x, w),
                torch.where((x > 0) == (z > 0), x, w),
                torch.where(~((x > 0) & (z > 0)), x, w),
                torch.where(~((x > 0) | (z > 0)), x, w)]

    g = torch.Generator().manual_seed(5)
    values = {s: torch.randn(64, generator=g, dtype=torch.float64) for s in (X, Z, W)}
    values[X][:8] = 1.5  # on min's tie where z > 0
    values[Z][:8] = 1.0
    kernels = _printed_kernel(tmp_path, exprs)
    for ex, want, kernel in zip(exprs, [m.double() for m in meanings(values)], kernels):
        got = torch.as_tensor(Evaluator(values, values[X])(ex), dtype=torch.float64)
        torch.testing.assert_close(got.expand_as(want), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kernel(values), want, rtol=1e-6, atol=1e-6)


def test_the_derivative_of_abs_is_real(tmp_path):
    """|u| for a u sympy cannot prove real (sqrt(x), log(x), x ** (1/3) of a real x): sympy's
    own derivative goes through re, im and atan2, which no backend spells; attnc's is torch's
    sign(u) u', evaluated and printed."""
    exprs = [sympy.Abs(sympy.sqrt(X)), sympy.Abs(X ** sympy.Float(0.5)),
             sympy.Abs(sympy.log(X)), sympy.Abs(X ** sympy.Rational(1, 3)) * Z]
    meanings = [lambda v: torch.abs(torch.sqrt(v[X])), lambda v: torch.abs(v[X] ** 0.5),
                lambda v: torch.abs(torch.log(v[X])), lambda v: torch.abs(v[X] ** (1 / 3)) * v[Z]]
    g = torch.Generator().manual_seed(6)
    values = {s: 0.25 + 2 * torch.rand(64, generator=g, dtype=torch.float64) for s in (X, Z, W)}
    values[X][:8] = 1.0  # log(x) = 0: |.| at its kink
    ds = [derivative(ex, X) for ex in exprs]
    assert not any(d.has(sympy.re, sympy.im, sympy.arg, sympy.atan2) for d in ds)
    for d, meaning, kernel in zip(ds, meanings, _printed_kernel(tmp_path, ds)):
        want = _autograd(meaning, values, X)
        got = torch.as_tensor(Evaluator(values, values[X])(d), dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kernel(values), want, rtol=1e-5, atol=1e-5)
