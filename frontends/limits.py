"""What a spec may hold, so that every stage answers in bounded time and stack depth and every
constant the kernels see has a Triton spelling.

Size and nesting. A spec is at most MAX_SPEC_CHARS characters, and its parse tree nests at most
MAX_NESTING levels (every operator application and call is a level, so a chain `a + b + c` is
two: the lowering recurses once per level). A lowered expression (sympy, with `let`s inlined) is
at most MAX_EXPR_DEPTH deep and MAX_EXPR_NODES nodes, because sympy's algorithms and the printers
of the later passes recurse over it and their time grows with it; a call takes at most
MAX_CALL_ARGS arguments (sympy compares every pair of `max`'s arguments).

Unrolling. A cascade's extra rank (`rank c = 4`) has 1 to MAX_RANK_SIZE values and the einsums
it unrolls into (with the reductions hoisted out of expressions) number at most
MAX_CASCADE_EINSUMS; `normalize = sinkhorn(k)` takes 1 to MAX_SINKHORN_ITERATIONS iterations
(each is two passes over the scores).

Constants. Integers lie within +-INT_LIMIT: the kernels index, compare and take options in
int32. Floats lie within float32's range, which the kernels compute in. Nothing is infinite,
undefined (`0 ** -1`, `log(0)`) or complex (`sqrt(-1)`). A constant power is refused before
sympy computes it when its magnitude lies beyond 2**MAX_POWER_BITS (`2 ** 2 ** 2 ** 2 ** 2 ** 2`
would otherwise run for minutes). Constant subexpressions sympy keeps symbolic (`sqrt(2)`,
`exp(1)`, `log(3)`) are folded into floats, since Triton spells none of them.

Every check raises `Refused`; the lowering turns it into a SpecError at the node it lowered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lark
import sympy

MAX_SPEC_CHARS = 100_000
MAX_NESTING = 100
MAX_EXPR_DEPTH = 64
MAX_EXPR_NODES = 10_000
MAX_CALL_ARGS = 32
MAX_RANK_SIZE = 16
MAX_CASCADE_EINSUMS = 256
MAX_SINKHORN_ITERATIONS = 32
INT_LIMIT = 2**31 - 1
FLOAT_LIMIT = 3.4028234663852886e38  # float32's largest finite value
MAX_POWER_BITS = 1100  # a little past float64's range, so no float that fits is refused

# Digits an integer literal may have before its value is worth computing (Python refuses to
# parse integers of more than 4300 digits, without a location).
_INT_DIGITS = len(str(INT_LIMIT))
_UNDEFINED = (sympy.zoo, sympy.oo, -sympy.oo, sympy.nan)
_INT_HINT = "write a float (2147483648.0) for a larger factor"
_FLOAT_RANGE = "the kernels compute in float32, up to about 3.4e38"
_CONSTANT_HINT = "log and sqrt take positive arguments; nothing may be divided by zero"


class Refused(Exception):
    """An input beyond what a spec may hold: the message and a hint, without a location."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


# --- text -----------------------------------------------------------------------------------------

def oversize_offset(source: str) -> int | None:
    """The offset of the first character past MAX_SPEC_CHARS, or None when the spec fits."""
    return MAX_SPEC_CHARS if len(source) > MAX_SPEC_CHARS else None


def too_deep(tree: lark.Tree) -> lark.Tree | None:
    """The first node (depth first) below MAX_NESTING levels of `tree`, or None. Iterative: the
    point is to answer for trees too deep to recurse over."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            return node
        stack.extend((child, depth + 1) for child in reversed(node.children)
                     if isinstance(child, lark.Tree))
    return None


# --- numbers --------------------------------------------------------------------------------------

def literal(text: str) -> sympy.Number:
    """A NUMBER token's value: an int32 Integer, or a Float inside float32's range."""
    if any(c in text for c in ".eE"):
        if not _in_float_range(float(text)):  # float() overflows to inf: refused too
            raise Refused(f"number {text} is out of range ({_FLOAT_RANGE})")
        return sympy.Float(text)
    digits = text.lstrip("0")
    if len(digits) > _INT_DIGITS or int(digits or "0") > INT_LIMIT:
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
        raise Refused(f"integer {shown} is out of range (integers are at most {INT_LIMIT})",
                      hint=_INT_HINT)
    return sympy.Integer(int(text))


def _in_float_range(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= FLOAT_LIMIT


def check_power(base: sympy.Expr, exp: sympy.Expr) -> None:
    """Refuse a constant power whose magnitude is beyond 2**MAX_POWER_BITS (or below its
    inverse) before sympy computes it exactly."""
    # (sympy's Float 1.0 does not equal its Integer 1, hence the float comparison)
    if not (base.is_Number and exp.is_Number) or base.is_zero or float(abs(base)) == 1.0:
        return
    if abs(float(exp)) * abs(math.log2(abs(float(base)))) > MAX_POWER_BITS:
        raise Refused(f"the constant power {base} ** {exp} is out of range",
                      hint="constants stay within float32's range, up to about 3.4e38")


def check_option_override(name: str, value: object, integer: bool) -> sympy.Number:
    """A caller's value for option `name` (an int option when `integer`): a number, an integer
    for an int option, inside the ranges above. Refused messages name the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused(f"option {name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused(f"option {name} must be a finite number, got {value!r}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise Refused(f"option {name} is an integer option, got {value!r}")
        if abs(int(value)) > INT_LIMIT:
            raise Refused(f"option {name} = {_short(sympy.Integer(int(value)))} is out of range "
                          f"(integer options are at most {INT_LIMIT} in magnitude: the kernels "
                          "take them as int32)")
        return sympy.Integer(int(value))
    try:
        as_float = float(value)
    except OverflowError:  # an int past every float
        as_float = math.inf
    if not _in_float_range(as_float):
        shown = f"{as_float:.4g}" if math.isfinite(as_float) else _short(sympy.Integer(value))
        raise Refused(f"option {name} = {shown} is out of range ({_FLOAT_RANGE})")
    return sympy.Float(as_float)


# --- lowered expressions --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shape:
    """What the guard knows of one sympy subexpression."""

    depth: int
    nodes: int       # counted as a tree: a `let` read twice counts twice
    constant: bool   # no symbol or tensor inside: a number, perhaps one sympy keeps symbolic
    to_fold: bool    # holds a constant sympy keeps symbolic (sqrt(2)), to be folded


class ExprGuard:
    """Checks lowered expressions, one node at a time as the lowering builds them.

    Every subexpression is measured once (the memo is shared by the whole spec), bottom up and
    without recursion, so checking each node of an expression costs about as much as building
    it, and an expression that reads a `let` twice is not walked twice.
    """

    def __init__(self) -> None:
        self._shapes: dict[sympy.Basic, _Shape] = {}

    def admit(self, value):
        """`value` with its symbolic constants folded into floats; Refused when it is too
        deep or too large or holds a constant out of range, infinite, undefined or complex."""
        shape = self._measure(value)
        if shape.depth > MAX_EXPR_DEPTH:
            raise Refused(f"expression nests {shape.depth} levels deep, more than "
                          f"{MAX_EXPR_DEPTH}", hint="`let`s are inlined, so they count too")
        if shape.nodes > MAX_EXPR_NODES:
            raise Refused(f"expression has {shape.nodes} nodes (with `let`s inlined), more than "
                          f"{MAX_EXPR_NODES}")
        if not shape.to_fold:
            return value
        folded = self._fold(value)
        self._measure(folded)
        return folded

    def _measure(self, root) -> _Shape:
        shapes = self._shapes
        stack = [root]
        while stack:
            ex = stack[-1]
            if ex in shapes:
                stack.pop()
                continue
            pending = [a for a in ex.args if a not in shapes]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            shapes[ex] = self._shape(ex)
        return shapes[root]

    def _shape(self, ex) -> _Shape:
        kids = [self._shapes[a] for a in ex.args]
        if not kids:
            _check_atom(ex)
            constant = bool(getattr(ex, "is_number", False))
        else:
            constant = isinstance(ex, sympy.Expr) and all(k.constant for k in kids)
            _check_real(ex)
        to_fold = (constant and not ex.is_Number) or any(k.to_fold for k in kids)
        return _Shape(depth=1 + max((k.depth for k in kids), default=0),
                      nodes=1 + sum(k.nodes for k in kids), constant=constant, to_fold=to_fold)

    def _fold(self, value):
        """Replace each largest symbolic constant inside `value` by its float value."""
        values: dict = {}
        stack = [value]
        while stack:
            ex = stack.pop()
            shape = self._shapes[ex]
            if not shape.to_fold or ex in values:
                continue
            if shape.constant:
                values[ex] = _evaluate(ex)
            else:
                stack.extend(ex.args)
        return value.xreplace(values)


def _check_atom(ex) -> None:
    if ex in _UNDEFINED:
        raise Refused(f"this evaluates to an infinite or undefined constant ({ex})",
                      hint=_CONSTANT_HINT)
    if ex is sympy.I:
        raise Refused("this evaluates to a complex value", hint=_CONSTANT_HINT)
    if ex.is_Integer:
        if abs(int(ex)) > INT_LIMIT:
            raise Refused(f"this evaluates to the integer {_short(ex)}, out of range (integers "
                          f"are at most {INT_LIMIT} in magnitude)", hint=_INT_HINT)
    elif ex.is_Rational or ex.is_Float:
        _check_range(ex)


def _evaluate(ex) -> sympy.Float:
    """The float value of a constant sympy keeps symbolic, or Refused."""
    value = ex.evalf()
    if value in _UNDEFINED:
        raise Refused(f"this evaluates to an infinite or undefined constant ({value})",
                      hint=_CONSTANT_HINT)
    if not value.is_Float:
        kind = "a complex value" if value.has(sympy.I) else f"{_short(ex)}, not a real number"
        raise Refused(f"this evaluates to {kind}", hint=_CONSTANT_HINT)
    _check_range(value)
    return sympy.Float(float(value))


def _check_real(ex) -> None:
    """Refuse a power or a function that sympy knows is never real: `sqrt(-n - 1)`, which
    sympy cannot even compare (the functions of a spec make no complex number from real ones
    any other way)."""
    if isinstance(ex, (sympy.Pow, sympy.Function)) and ex.is_extended_real is False:
        raise Refused("this evaluates to a complex value", hint=_CONSTANT_HINT)


def _check_range(ex) -> None:
    """Refuse a Rational or Float beyond float32's range."""
    try:
        value = float(ex)
    except OverflowError:  # a Rational whose quotient no float holds
        value = math.inf
    if not _in_float_range(value):
        shown = f"{value:.4g}" if math.isfinite(value) else _short(ex)
        raise Refused(f"this evaluates to {shown}, out of range ({_FLOAT_RANGE})")


def _short(ex) -> str:
    if ex.is_Integer and abs(int(ex)) > 10**30:  # str() of a huge int is slow, or refused
        return f"about {'-' if ex < 0 else ''}2 ** {abs(int(ex)).bit_length() - 1}"
    text = str(ex)
    return text if len(text) <= 40 else text[:37] + "..."
