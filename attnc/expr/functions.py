"""The op table: every function a spec or a FlexAttention mod may call, defined once.

A `Function` says how the function is spelled in the spec language (`name`, its argument kinds)
and in a mod (`flex`: the torch functions and Tensor methods the tracer accepts), its sympy
form (`build`), what it means on torch tensors (`torch`), how Triton spells it (`triton`, a
template over the printed argument, with the `helper` it needs) and its derivative.

Functions come in two sorts. Those with a sympy head of their own (`head`: exp, tanh, sigmoid,
...) are evaluated, printed and differentiated through this table: the eager evaluator
(backends/eager) maps the head to `torch`, the Triton printer to `triton`, and the custom heads'
`fdiff` to `derivative` (sympy differentiates its own heads). The others lower to sympy's core
algebra at parse time (relu and clamp are Piecewise forms, or Max and Min of integers; sqrt is
x**(1/2); where is a Piecewise): the core algebra's rules in the evaluator and the printer cover
them, and `torch` is only their meaning, checked against those rules by
tests/expr/test_functions.py for every entry and every backend.
Adding a function is one entry here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F


class ArgKind(enum.Enum):
    """What an argument (or result) of a spec function is."""

    NUMBER = "number"
    CONDITION = "boolean"


class sigmoid(sympy.Function):
    """Logistic function 1 / (1 + exp(-x))."""

    def fdiff(self, argindex=1):
        return _derivative(sigmoid, self.args[0])

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))
        return None


class softplus(sympy.Function):
    """log(1 + exp(x))."""

    def fdiff(self, argindex=1):
        return _derivative(softplus, self.args[0])

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sympy.log(1 + sympy.exp(x))
        return None


class elu(sympy.Function):
    """x for x > 0, exp(x) - 1 otherwise (the +1 of linear attention's feature map is outside)."""

    def fdiff(self, argindex=1):
        return _derivative(elu, self.args[0])

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return x if x > 0 else sympy.exp(x) - 1
        return None


def _derivative(head: type, x: sympy.Expr) -> sympy.Expr:
    """A custom head's derivative, from its table entry."""
    d = BY_HEAD[head].derivative
    assert d is not None, head
    return d(x)


N, C = ArgKind.NUMBER, ArgKind.CONDITION


@dataclass(frozen=True)
class Function:
    name: str                              # the spec language's spelling
    args: tuple[ArgKind, ...]              # argument kinds; `variadic`: the last one repeats
    build: Callable[..., sympy.Expr]       # the sympy form, from sympy arguments
    torch: Callable[..., torch.Tensor]     # the meaning on tensors
    head: type | None = None               # the sympy head `build` produces, if its own
    triton: str | None = None              # Triton spelling of a head, "{x}" its argument
    helper: str | None = None              # the source of a @triton.jit helper `triton` calls
    derivative: Callable[[sympy.Expr], sympy.Expr] | None = None  # d/dx of a custom head
    flex: tuple[str, ...] = ()             # torch spellings a mod may use (torch.exp, x.exp())
    in_spec: bool = True                   # callable in a spec (else a mod's spelling only)
    variadic: bool = False
    keeps_kind: bool = False               # an integer argument gives an integer result (abs)
    positive: bool = False                 # defined for positive arguments only (log, sqrt)

    def __str__(self) -> str:
        shown = ", ".join(a.value for a in self.args) + (", ..." if self.variadic else "")
        return f"{self.name}({shown})"


# Triton helpers of the functions Triton has no spelling for (each is copied into the modules
# that call it).
_TANH = '''@triton.jit
def _tanh(x):
    # no cancellation near 0 (where tanh(x) ~ x): an odd series below 1/4, (1 - e) / (1 + e)
    # with e = exp(-2|x|) above; neither overflows
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                  + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(a < 0.25, series, tl.where(x < 0, -t, t))
'''
_SOFTPLUS = '''@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow for large x
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
'''
_ELU = '''@triton.jit
def _elu(x):
    return tl.where(x > 0, x, tl.exp(tl.minimum(x, 0.0)) - 1.0)
'''


def _where(c, a, b):
    return sympy.Piecewise((a, c), (b, True))


# relu and clamp of integers (positions, indices) stay sympy's Max and Min, which the mask and
# index analyses understand; nothing differentiates them. Of floats they are Piecewise forms
# whose derivatives are torch autograd's at the kinks, where a plain Max/Min would share the
# gradient (as torch.maximum does): relu passes nothing at x == 0, clamp passes the gradient
# to x when x equals a bound, to lo where x < lo < hi and to hi otherwise outside [lo, hi].
def relu(x):
    if x.is_integer:
        return sympy.Max(x, 0)
    return sympy.Piecewise((x, x > 0), (0, True))


def clamp(x, lo=None, hi=None):
    """torch.clamp(x, lo, hi) = min(max(x, lo), hi); a missing bound is no bound."""
    if all(a is None or a.is_integer for a in (x, lo, hi)):
        out = x if lo is None else sympy.Max(x, lo)
        return out if hi is None else sympy.Min(out, hi)
    if hi is None:
        return sympy.Piecewise((x, x >= lo), (lo, True))
    if lo is None:
        return sympy.Piecewise((x, x <= hi), (hi, True))
    # lo > hi gives hi everywhere, as torch does
    return sympy.Piecewise((x, (lo <= x) & (x <= hi)), (lo, (x < lo) & (lo < hi)), (hi, True))


FUNCTIONS: tuple[Function, ...] = (
    Function("exp", (N,), sympy.exp, torch.exp, head=sympy.exp, triton="tl.exp({x})",
             flex=("exp",)),
    Function("exp2", (N,), lambda x: 2 ** x, torch.exp2, flex=("exp2",)),
    Function("log", (N,), sympy.log, torch.log, head=sympy.log, triton="tl.log({x})",
             flex=("log",), positive=True),
    Function("tanh", (N,), sympy.tanh, torch.tanh, head=sympy.tanh, triton="_tanh({x})",
             helper=_TANH, flex=("tanh",)),
    Function("sqrt", (N,), sympy.sqrt, torch.sqrt, flex=("sqrt",), positive=True),
    Function("rsqrt", (N,), lambda x: 1 / sympy.sqrt(x), torch.rsqrt, flex=("rsqrt",),
             in_spec=False, positive=True),
    Function("abs", (N,), sympy.Abs, torch.abs, head=sympy.Abs, triton="tl.abs({x})",
             flex=("abs",), keeps_kind=True),
    Function("square", (N,), lambda x: x ** 2, torch.square, flex=("square",), in_spec=False,
             keeps_kind=True),
    Function("sin", (N,), sympy.sin, torch.sin, head=sympy.sin, triton="tl.sin({x})",
             flex=("sin",)),
    Function("cos", (N,), sympy.cos, torch.cos, head=sympy.cos, triton="tl.cos({x})",
             flex=("cos",)),
    Function("tan", (N,), sympy.tan, torch.tan, head=sympy.tan,
             triton="(tl.sin({x}) / tl.cos({x}))", flex=("tan",)),
    Function("sigmoid", (N,), sigmoid, torch.sigmoid, head=sigmoid, triton="tl.sigmoid({x})",
             derivative=lambda x: sigmoid(x) * (1 - sigmoid(x)), flex=("sigmoid",)),
    Function("softplus", (N,), softplus, F.softplus, head=softplus, triton="_softplus({x})",
             helper=_SOFTPLUS, derivative=sigmoid, flex=("softplus",)),
    Function("elu", (N,), elu, F.elu, head=elu, triton="_elu({x})", helper=_ELU,
             derivative=lambda x: sympy.Piecewise((1, x > 0), (sympy.exp(x), True))),
    Function("relu", (N,), relu, torch.relu, flex=("relu",), keeps_kind=True),
    Function("clamp", (N, N, N), clamp, torch.clamp),
    Function("min", (N, N), sympy.Min, torch.minimum, variadic=True),
    Function("max", (N, N), sympy.Max, torch.maximum, variadic=True),
    Function("where", (C, N, N), _where, torch.where),
)

BY_NAME = {f.name: f for f in FUNCTIONS if f.in_spec}
BY_HEAD = {f.head: f for f in FUNCTIONS if f.head is not None}
BY_FLEX = {name: f for f in FUNCTIONS for name in f.flex}


def helper_name(f: Function) -> str:
    """The name of the function `f.helper` defines."""
    assert f.helper is not None
    return f.helper.split("def ", 1)[1].split("(", 1)[0]
