"""Evaluate sympy expressions on broadcasting torch tensors.

One evaluator for every expression attnc compiles: sympy's core algebra (arithmetic, powers,
floor and modulo, min and max, Piecewise, comparisons and logic, finite sums over an axis) and
the op table's functions (attnc.expr.functions: each head's `torch` form). Python numbers in an
expression become tensors of the working float dtype (that of `like`, float64 when `like` is not
floating), so a scalar branch never changes the dtype of what it is combined with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import sympy
import torch
from sympy.logic.boolalg import BooleanFunction

from attnc.expr.functions import BY_HEAD
from attnc.expr.symbols import integral_relation

_RELATION = {sympy.Lt: torch.lt, sympy.Le: torch.le, sympy.Gt: torch.gt, sympy.Ge: torch.ge,
             sympy.Eq: torch.eq, sympy.Ne: torch.ne}
_ROUNDING = {sympy.floor: torch.floor, sympy.ceiling: torch.ceil}

Value = torch.Tensor | float | int | bool


class Evaluator:
    """`values` maps symbols (and any other expression, e.g. an access or a readout) to tensors
    or numbers; `access(indexed)` resolves the tensor accesses `values` does not hold; `axes`
    lays each summation axis along a tensor dim with its extent: a `sympy.Sum` over it sums
    that dim (keeping it), or multiplies by the extent where the body does not vary along it."""

    def __init__(self, values: Mapping, like: torch.Tensor,
                 access: Callable[[sympy.Indexed], torch.Tensor] | None = None,
                 axes: Mapping[sympy.Symbol, tuple[int, int]] | None = None):
        self.values = dict(values)
        self.like = like
        self.access = access
        self.axes = dict(axes or {})
        self.dtype = like.dtype if like.is_floating_point() else torch.float64

    def tensor(self, x: Value) -> torch.Tensor:
        """x as a tensor on the working device (a Python float in the working dtype)."""
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, float):
            return torch.tensor(x, dtype=self.dtype, device=self.like.device)
        return torch.as_tensor(x, device=self.like.device)

    def floating(self, x: Value) -> torch.Tensor:
        t = self.tensor(x)
        return t if t.is_floating_point() else t.to(self.dtype)

    def __call__(self, ex) -> Value:
        if ex in self.values:
            return self.values[ex]
        if ex is sympy.true or ex is sympy.false:
            return bool(ex)
        if ex.is_Number:
            if ex == sympy.oo or ex == -sympy.oo:
                return float(ex)
            return int(ex) if ex.is_Integer else float(ex)
        if isinstance(ex, sympy.Indexed):
            if self.access is None:
                raise KeyError(f"no value for {ex}")
            return self.access(ex)
        if ex.is_Symbol:
            raise KeyError(f"no value for the symbol {ex}")
        if isinstance(ex, sympy.Piecewise):
            return self._piecewise(ex)
        if isinstance(ex, sympy.Sum):
            return self._sum(ex)
        if ex.func in _RELATION:
            ex = integral_relation(ex)
        args = [self(a) for a in ex.args]
        if ex.is_Add:
            return _fold(lambda a, b: a + b, args)
        if ex.is_Mul:
            return _fold(lambda a, b: a * b, args)
        if ex.is_Pow:
            base, exp = args
            return torch.pow(self.floating(base), exp)
        if ex.func in BY_HEAD:
            return BY_HEAD[ex.func].torch(self.floating(args[0]))
        if ex.func in _ROUNDING:
            return _ROUNDING[ex.func](self.floating(args[0]))
        if isinstance(ex, sympy.Mod):
            return torch.remainder(self.tensor(args[0]), self.tensor(args[1]))
        if isinstance(ex, (sympy.Min, sympy.Max)):
            return self._extremum(isinstance(ex, sympy.Max), args)
        if ex.func in _RELATION:
            return _RELATION[ex.func](self.tensor(args[0]), self.tensor(args[1]))
        if isinstance(ex, sympy.And):
            return _fold(lambda a, b: torch.logical_and(self.tensor(a), self.tensor(b)), args)
        if isinstance(ex, sympy.Or):
            return _fold(lambda a, b: torch.logical_or(self.tensor(a), self.tensor(b)), args)
        if isinstance(ex, sympy.Not):
            return torch.logical_not(self.tensor(args[0]))
        if isinstance(ex, sympy.ITE):  # sympy's form of a comparison of a Piecewise
            cond, yes, no = (self.tensor(a) for a in args)
            return torch.where(cond, yes, no)
        if isinstance(ex, BooleanFunction):  # Xor, Implies, Equivalent, Nand, Nor
            return self(sympy.to_nnf(ex, simplify=False))
        raise NotImplementedError(f"cannot evaluate {ex.func.__name__} in {ex}")

    def _extremum(self, largest: bool, args: list) -> torch.Tensor:
        """min or max with torch autograd's gradient at ties, which attnc's derivatives follow
        (attnc.expr.derivatives): torch.maximum gives each of two equal arguments half, and
        amax over more arguments shares evenly among those equal to the result."""
        vals = [self.tensor(a) for a in args]
        if len(vals) == 2:
            return (torch.maximum if largest else torch.minimum)(*vals)
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in vals))
        stacked = torch.stack(torch.broadcast_tensors(*(v.to(dtype) for v in vals)))
        return stacked.amax(0) if largest else stacked.amin(0)

    def _piecewise(self, ex: sympy.Piecewise) -> torch.Tensor:
        result = self.tensor(self(ex.args[-1][0]))
        for value, cond in reversed(ex.args[:-1]):
            result = torch.where(self.tensor(self(cond)), self.tensor(self(value)), result)
        return result

    def _sum(self, ex: sympy.Sum) -> Value:
        """One limit per contraction (sympy merges nested sums into one)."""
        body = self(ex.args[0])
        for axis, *_ in ex.args[1:]:
            dim, extent = self.axes[axis]
            if not isinstance(body, torch.Tensor) or body.shape[dim] == 1:
                body = body * extent
            else:
                body = body.sum(dim=dim, keepdim=True)
        return body


def _fold(fn, args):
    out = args[0]
    for a in args[1:]:
        out = fn(out, a)
    return out


def gather(value: torch.Tensor, index: list) -> torch.Tensor:
    """value[index...] with broadcasting index tensors (float indices from floor are rounded)."""
    idx = []
    for i in index:
        i = torch.as_tensor(i, device=value.device)
        idx.append(i.round().long() if i.is_floating_point() else i.long())
    return value[tuple(idx)]


def extremum(val: torch.Tensor, axes: tuple[int, ...], largest: bool) -> torch.Tensor:
    """max (or min) over `axes`; over an empty range -inf (+inf), the identity of the monoid."""
    if any(val.shape[a] == 0 for a in axes):
        shape = [d for i, d in enumerate(val.shape) if i not in axes]
        return val.new_full(shape, -math.inf if largest else math.inf)
    return val.amax(dim=axes) if largest else val.amin(dim=axes)
