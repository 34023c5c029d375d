"""Trace FlexAttention-style mods (plain Python over torch) into sympy.

A mod is called once with proxies (`Traced`) in place of its arguments: `score` is QK[m, n]*scale,
`b`, `h`, `q_idx`, `kv_idx` are the index symbols b, h, m, n. Python operators and the torch
functions in `_UNARY` / `_CALLS` on proxies build sympy expressions in the IR's vocabulary, and
indexing a captured tensor with proxies (`bias[h, q_idx - kv_idx]`) records the tensor as a kernel
input. Nothing is evaluated per element. Anything the tracer cannot express (Python control flow
on a traced value, an unsupported torch function, slicing) raises a `ModError` naming the mod, the
operation and the source line.

Python numbers a mod closes over become constants of the expression (a new value is a new IR and
a new kernel); captured tensors become inputs (new values, same kernel).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import sympy
import torch

from attnc.backends.eager.evaluate import Evaluator
from attnc.errors import SpecError
from attnc.expr import symbols as S
from attnc.expr.functions import BY_FLEX, clamp
from attnc.ir.cascade import QK, TensorDecl, TensorKind

INT, FLOAT, BOOL = "int", "float", "bool"

# Names a captured tensor may not take: index/size symbols, operands and the cascade's own nodes.
# Names a captured tensor may not take: the index and size symbols and the operands (the names
# passes give their own tensors are chosen around whatever the captures are called).
RESERVED = {"b", "h", "m", "n", "e", "f", "B", "H", "M", "N", "q", "k", "v", "scale", "qk", "Q",
            "K", "V", QK}


class ModError(SpecError):
    """A mod uses something the tracer cannot turn into IR."""


@functools.lru_cache(maxsize=1)
def _package_dirs() -> tuple[str, ...]:
    """attnc's own directories and torch's: frames there are machinery, not the user's mod."""
    import attnc
    here = Path(__file__).resolve().parent
    return tuple(str(p) for p in (here, here.parent / "passes", here.parent / "backends",
                                  Path(attnc.__file__).resolve().parent,
                                  Path(torch.__file__).resolve().parent))


def _user_frame(skip: tuple[str, ...] | None = None):
    """The innermost frame outside the `skip` directories (default: attnc's and torch's): the
    mod's line that did the operation."""
    skip = _package_dirs() if skip is None else skip
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        path = str(Path(frame.f_code.co_filename).resolve())
        if not any(path.startswith(root) for root in skip):
            return frame
        frame = frame.f_back
    return None


@dataclass
class Captured:
    name: str
    tensor: torch.Tensor
    accesses: list = field(default_factory=list)

    @property
    def kind(self) -> TensorKind:
        return TensorKind.PARAM if self.tensor.is_floating_point() else TensorKind.INPUT


class Captures:
    """Tensors the traced mods read, named after the variable that holds them in the mod."""

    def __init__(self):
        self.by_id: dict[int, Captured] = {}
        self.derived: dict[tuple, Captured] = {}

    def register(self, tensor: torch.Tensor, frame) -> Captured:
        got = self.by_id.get(id(tensor))
        if got is not None:
            return got
        name = _variable_name(tensor, frame)
        taken = {c.name for c in self.by_id.values()} | RESERVED
        base = name if name and not name.startswith("_") else "buf"
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}{i}"
        got = Captured(name, tensor)
        self.by_id[id(tensor)] = got
        return got

    def derive(self, key: tuple, base: str, tensor: torch.Tensor) -> Captured:
        """A tensor computed from captured ones during tracing (a gather, see `_gather`), named
        from `base`; `key` says what it was computed from, so one trace computes it once."""
        got = self.derived.get(key)
        if got is not None:
            return got
        taken = {c.name for c in self.by_id.values()} | RESERVED
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}{i}"
        got = self.derived[key] = self.by_id[id(tensor)] = Captured(name, tensor)
        return got

    def named(self, name: str) -> Captured:
        return next(c for c in self.by_id.values() if c.name == name)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {c.name: c.tensor for c in self.by_id.values()}

    def decls(self, sizes: dict) -> tuple[TensorDecl, ...]:
        """A declaration per captured tensor. A dimension indexed by a bare b, h, m or n whose size
        equals that extent is declared symbolically (B, H, M, N), so one kernel serves every
        length; other dimensions keep their numeric size."""
        out = []
        for c in self.by_id.values():
            dims = []
            for axis, size in enumerate(c.tensor.shape):
                bare = {acc[axis] for acc in c.accesses if acc[axis] in S.SIZE_OF}
                dim = sympy.Integer(size)
                for sym in (S.n, S.m, S.h, S.b):
                    if sym in bare and sizes.get(S.SIZE_OF[sym]) == size:
                        dim = S.SIZE_OF[sym]
                        break
                dims.append(dim)
            out.append(TensorDecl(c.name, c.kind, tuple(dims)))
        return tuple(out)


def _variable_name(tensor, frame) -> str | None:
    if frame is None:
        return None
    for scope in (frame.f_locals, frame.f_globals):
        for name, value in scope.items():
            if value is tensor:
                return name
    return None


class Tracer:
    """One mod being traced: its role ("score_mod", "mask_mod") and function, for errors."""

    def __init__(self, role: str, fn, captures: Captures):
        self.role = role
        self.fn = fn
        self.captures = captures

    @property
    def label(self) -> str:
        return f"{self.role} {getattr(self.fn, '__qualname__', repr(self.fn))!r}"

    def error(self, what: str, hint: str = "") -> ModError:
        frame = _user_frame()
        if frame is None:
            return ModError(f"{self.label}: {what}", filename="<mod>", hint=hint)
        code = frame.f_code
        line, col = frame.f_lineno, 0
        positions = list(code.co_positions())
        index = frame.f_lasti // 2
        if 0 <= index < len(positions) and positions[index][0] is not None:
            line, col = positions[index][0], (positions[index][2] or 0) + 1
        try:
            source = Path(code.co_filename).read_text()
        except OSError:
            source = ""
        return ModError(f"{self.label}: {what}", source=source, filename=code.co_filename,
                        line=line, column=col, hint=hint)

    def wrap(self, value, what: str) -> "Traced":
        """A proxy for a Python number or bool, or a traced value as is."""
        if isinstance(value, Traced):
            return value
        if isinstance(value, bool):
            return Traced(sympy.true if value else sympy.false, BOOL, self)
        if isinstance(value, int):
            return Traced(sympy.Integer(value), INT, self)
        if isinstance(value, float):
            if math.isinf(value):
                return Traced(sympy.oo if value > 0 else -sympy.oo, FLOAT, self)
            if math.isnan(value):
                raise self.error(f"NaN as {what} is not supported")
            return Traced(sympy.Float(value), FLOAT, self)
        if isinstance(value, torch.Tensor):
            raise self.error(f"a captured tensor is used whole as {what}",
                             hint="index it with the mod's arguments (bias[h], doc[b, q_idx]); "
                                  "a Python number is a compile-time constant")
        raise self.error(f"{type(value).__name__} as {what} is not supported")

    def run(self, *args) -> "Traced":
        try:
            out = self.fn(*args)
        except ModError:
            raise
        except (TypeError, IndexError, RuntimeError, AttributeError) as exc:
            raise self.error(f"tracing failed: {type(exc).__name__}: {exc}",
                             hint="mods may use torch.where, exp, exp2, log, tanh, sin, cos, "
                                  "tan, abs, sqrt, sigmoid, clamp, minimum, maximum, "
                                  "comparisons, & | ~, arithmetic and indexed captured tensors"
                             ) from exc
        return self.wrap(out, "the result")


def _as_number(x: "Traced") -> sympy.Expr:
    """Arithmetic on a bool means 0/1, as in torch."""
    if x.kind == BOOL:
        return sympy.Piecewise((1, x.expr), (0, True))
    return x.expr


def _promote(*xs: "Traced") -> str:
    return FLOAT if any(x.kind == FLOAT for x in xs) else INT


_COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def _unary(f):
    """A traced call of an op-table function of one argument (attnc.expr.functions)."""
    return lambda x: (f.build(_as_number(x)), _promote(x) if f.keeps_kind else FLOAT)


_UNARY = {
    **{name: _unary(f) for name, f in BY_FLEX.items() if len(f.args) == 1},
    "neg": lambda x: (-_as_number(x), _promote(x)),
    "logical_not": lambda x: (sympy.Not(_bool(x)), BOOL),
}


def _bool(x: "Traced") -> sympy.Expr:
    if x.kind == BOOL:
        return x.expr
    return sympy.Ne(x.expr, 0)


class Traced:
    """A traced value: a sympy expression and its torch kind (int, float or bool)."""

    __slots__ = ("expr", "kind", "tracer")

    def __init__(self, expr, kind: str, tracer: Tracer):
        self.expr = expr
        self.kind = kind
        self.tracer = tracer

    def __repr__(self) -> str:
        return f"Traced({self.expr}, {self.kind})"

    # --- Python control flow cannot be traced ---------------------------------------------------
    def __bool__(self):
        raise self.tracer.error(
            "a traced value is used in Python control flow (if, and, or, not, min/max builtins)",
            hint="write torch.where(cond, a, b), & | ~ and torch.minimum/maximum instead")

    def __index__(self):
        raise self.tracer.error("a traced value is used as a Python integer",
                                hint="index captured tensors directly: table[q_idx - kv_idx]")

    def __float__(self):
        raise self.tracer.error("a traced value is converted to a Python float",
                                hint="use torch functions (torch.exp) rather than math.*")

    __int__ = __index__

    def __iter__(self):
        raise self.tracer.error("a traced value is iterated over")

    def __len__(self):
        raise self.tracer.error("len() of a traced value")

    # --- arithmetic -------------------------------------------------------------------------
    def _binary(self, other, op: str, reverse: bool = False) -> "Traced":
        t = self.tracer
        o = t.wrap(other, f"an operand of {op}")
        a, b = (o, self) if reverse else (self, o)
        x, y = _as_number(a), _as_number(b)
        if op in ("/", "//", "%") and y == 0:
            raise t.error(f"division by zero in {op}")
        if op == "+":
            return Traced(x + y, _promote(a, b), t)
        if op == "-":
            return Traced(x - y, _promote(a, b), t)
        if op == "*":
            return Traced(x * y, _promote(a, b), t)
        if op == "/":
            return Traced(x / y, FLOAT, t)
        if op == "//":
            return Traced(sympy.floor(x / y), _promote(a, b), t)
        if op == "%":
            return Traced(sympy.Mod(x, y), _promote(a, b), t)
        if op == "**":
            return Traced(x ** y, _promote(a, b), t)
        raise AssertionError(op)  # pragma: no cover

    def __add__(self, o): return self._binary(o, "+")
    def __radd__(self, o): return self._binary(o, "+", True)
    def __sub__(self, o): return self._binary(o, "-")
    def __rsub__(self, o): return self._binary(o, "-", True)
    def __mul__(self, o): return self._binary(o, "*")
    def __rmul__(self, o): return self._binary(o, "*", True)
    def __truediv__(self, o): return self._binary(o, "/")
    def __rtruediv__(self, o): return self._binary(o, "/", True)
    def __floordiv__(self, o): return self._binary(o, "//")
    def __rfloordiv__(self, o): return self._binary(o, "//", True)
    def __mod__(self, o): return self._binary(o, "%")
    def __rmod__(self, o): return self._binary(o, "%", True)
    def __pow__(self, o): return self._binary(o, "**")
    def __rpow__(self, o): return self._binary(o, "**", True)

    def __neg__(self):
        return Traced(-_as_number(self), _promote(self), self.tracer)

    def __pos__(self):
        return self

    def __abs__(self):
        return Traced(sympy.Abs(_as_number(self)), _promote(self), self.tracer)

    # --- comparisons and logic ------------------------------------------------------------------
    def _compare(self, other, op: str) -> "Traced":
        o = self.tracer.wrap(other, "a comparison operand")
        return Traced(S.compare(_COMPARE[op], _as_number(self), _as_number(o)), BOOL, self.tracer)

    def __lt__(self, o): return self._compare(o, "lt")
    def __le__(self, o): return self._compare(o, "le")
    def __gt__(self, o): return self._compare(o, "gt")
    def __ge__(self, o): return self._compare(o, "ge")
    def __eq__(self, o): return self._compare(o, "eq")  # noqa: E704
    def __ne__(self, o): return self._compare(o, "ne")  # noqa: E704

    __hash__ = None  # type: ignore[assignment]  # equality builds a comparison, not a bool

    def _logic(self, other, op: str, reverse: bool = False) -> "Traced":
        t = self.tracer
        o = t.wrap(other, f"an operand of {op}")
        if self.kind != BOOL or o.kind != BOOL:
            raise t.error(f"bitwise {op} on integers is not supported",
                          hint=f"{op} combines conditions (q_idx >= kv_idx) {op} (...)")
        a, b = (o.expr, self.expr) if reverse else (self.expr, o.expr)
        fn = {"&": sympy.And, "|": sympy.Or, "^": sympy.Xor}[op]
        return Traced(fn(a, b), BOOL, t)

    def __and__(self, o): return self._logic(o, "&")
    def __rand__(self, o): return self._logic(o, "&", True)
    def __or__(self, o): return self._logic(o, "|")
    def __ror__(self, o): return self._logic(o, "|", True)
    def __xor__(self, o): return self._logic(o, "^")
    def __rxor__(self, o): return self._logic(o, "^", True)

    def __invert__(self):
        if self.kind != BOOL:
            raise self.tracer.error("~ on an integer is not supported",
                                    hint="~ negates a condition: ~(q_idx >= kv_idx)")
        return Traced(sympy.Not(self.expr), BOOL, self.tracer)

    # --- tensor-like methods ----------------------------------------------------------------
    def __getitem__(self, index):
        raise self.tracer.error("indexing a traced value is not supported",
                                hint="only captured tensors can be indexed")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _ATTRIBUTES:
            return _ATTRIBUTES[name](self)
        if name in _UNARY:
            return lambda: _call_unary(self.tracer, name, self)
        if name in _METHODS:
            return lambda *a, **kw: _METHODS[name](self, *a, **kw)
        raise self.tracer.error(f"Tensor.{name} is not supported by the tracer",
                                hint="supported methods: "
                                     + ", ".join(sorted(set(_UNARY) | set(_METHODS))))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = next(a.tracer for a in _flat(args, kwargs) if isinstance(a, Traced))
        name = getattr(func, "__name__", str(func))
        if name == "__getitem__":
            return _index_captured(tracer, *args)
        name = name.strip("_")
        if name.startswith("r") and name[1:] in _REFLECTED:
            return _REFLECTED[name[1:]](args[1], args[0])
        if name in _REFLECTED:
            return _REFLECTED[name](args[0], args[1])
        if name in _UNARY and len(args) == 1 and not kwargs:
            return _call_unary(tracer, name, args[0])
        if name in _CALLS:
            return _CALLS[name](tracer, *args, **kwargs)
        raise tracer.error(f"torch.{name} is not supported by the tracer",
                           hint="supported: torch.where, " + ", ".join(
                               sorted(set(_UNARY) | set(_CALLS) - {"where"})))


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (tuple, list)):
            yield from a
        else:
            yield a


def _call_unary(tracer: Tracer, name: str, x) -> Traced:
    x = tracer.wrap(x, f"the argument of {name}")
    expr, kind = _UNARY[name](x)
    return Traced(expr, kind, tracer)


def _where(tracer, cond, a, b):
    c = tracer.wrap(cond, "where's condition")
    if c.kind != BOOL:
        raise tracer.error("torch.where needs a boolean condition")
    x, y = tracer.wrap(a, "where's second argument"), tracer.wrap(b, "where's third argument")
    if x.kind == BOOL and y.kind == BOOL:
        return Traced(sympy.Or(sympy.And(c.expr, x.expr), sympy.And(sympy.Not(c.expr), y.expr)),
                      BOOL, tracer)
    return Traced(sympy.Piecewise((_as_number(x), c.expr), (_as_number(y), True)),
                  _promote(x, y), tracer)


def _clamp(tracer, x, min=None, max=None):
    x = tracer.wrap(x, "clamp's input")
    bounds = [None if b is None else tracer.wrap(b, "a clamp bound") for b in (min, max)]
    lo, hi = (None if b is None else _as_number(b) for b in bounds)
    kind = _promote(x, *(b for b in bounds if b is not None))
    return Traced(clamp(_as_number(x), lo, hi), kind, tracer)


def _extreme(fn):
    def call(tracer, a, b):
        x, y = tracer.wrap(a, "an argument"), tracer.wrap(b, "an argument")
        return Traced(fn(_as_number(x), _as_number(y)), _promote(x, y), tracer)
    return call


def _kind_of(dtype, default: str) -> str:
    if dtype is None:
        return default
    if dtype == torch.bool:
        return BOOL
    return FLOAT if dtype.is_floating_point else INT


def _constant(value, kind: str, tracer) -> Traced:
    if kind == BOOL:
        return Traced(sympy.true if value else sympy.false, BOOL, tracer)
    if kind == INT:
        return Traced(sympy.Integer(int(value)), INT, tracer)
    return tracer.wrap(float(value), "a constant")


def _like(value):
    def call(tracer, x, *args, dtype=None, **kwargs):
        x = tracer.wrap(x, "the tensor")
        v = value if value is not None else args[0]
        return _constant(v, _kind_of(dtype, x.kind), tracer)
    return call


def _new(value):
    def call(x, *args, dtype=None, **kwargs):
        v = value
        if value is None:  # new_full(size, fill_value)
            v = args[1] if len(args) > 1 else kwargs["fill_value"]
        return _constant(v, _kind_of(dtype, x.kind), x.tracer)
    return call


def _to(x: Traced, *args, dtype=None, **kwargs) -> Traced:
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    return _convert(x, _kind_of(dtype, x.kind))


def _convert(x: Traced, kind: str) -> Traced:
    if kind == x.kind or (kind == FLOAT and x.kind == INT):
        return Traced(x.expr, kind, x.tracer)
    if kind == BOOL:
        return Traced(_bool(x), BOOL, x.tracer)
    if x.kind == BOOL:
        return Traced(_as_number(x), kind, x.tracer)
    raise x.tracer.error("converting a float to an integer is not supported",
                         hint="floor explicitly: (x // 1) keeps the value's type")


_CALLS = {
    "where": _where, "clamp": _clamp, "clip": _clamp,
    "minimum": _extreme(sympy.Min), "maximum": _extreme(sympy.Max),
    "zeros_like": _like(0), "ones_like": _like(1), "full_like": _like(None),
    "logical_and": lambda t, a, b: t.wrap(a, "an operand")._logic(b, "&"),
    "logical_or": lambda t, a, b: t.wrap(a, "an operand")._logic(b, "|"),
    "add": lambda t, a, b, alpha=1: t.wrap(a, "an operand") + t.wrap(b, "an operand") * alpha,
    "sub": lambda t, a, b, alpha=1: t.wrap(a, "an operand") - t.wrap(b, "an operand") * alpha,
    "mul": lambda t, a, b: t.wrap(a, "an operand") * b,
    "div": lambda t, a, b: t.wrap(a, "an operand") / b,
    "floor_divide": lambda t, a, b: t.wrap(a, "an operand") // b,
    "remainder": lambda t, a, b: t.wrap(a, "an operand") % b,
    "pow": lambda t, a, b: t.wrap(a, "an operand") ** b,
    "to": lambda t, x, *a, **kw: _to(t.wrap(x, "the tensor"), *a, **kw),
    "float": lambda t, x: _convert(t.wrap(x, "the tensor"), FLOAT),
    "long": lambda t, x: _convert(t.wrap(x, "the tensor"), INT),
    "int": lambda t, x: _convert(t.wrap(x, "the tensor"), INT),
    "bool": lambda t, x: _convert(t.wrap(x, "the tensor"), BOOL),
}

# Tensor methods reached through a captured tensor's operator (tensor + traced -> Tensor.add).
_REFLECTED = {
    "add": lambda a, b: _operand(a, b) + b, "sub": lambda a, b: _operand(a, b) - b,
    "mul": lambda a, b: _operand(a, b) * b, "truediv": lambda a, b: _operand(a, b) / b,
    "div": lambda a, b: _operand(a, b) / b, "floordiv": lambda a, b: _operand(a, b) // b,
    "mod": lambda a, b: _operand(a, b) % b, "pow": lambda a, b: _operand(a, b) ** b,
    "and": lambda a, b: _operand(a, b) & b, "or": lambda a, b: _operand(a, b) | b,
    "lt": lambda a, b: _operand(a, b) < b, "le": lambda a, b: _operand(a, b) <= b,
    "gt": lambda a, b: _operand(a, b) > b, "ge": lambda a, b: _operand(a, b) >= b,
    "eq": lambda a, b: _operand(a, b) == b, "ne": lambda a, b: _operand(a, b) != b,
}


def _operand(a, b) -> Traced:
    tracer = a.tracer if isinstance(a, Traced) else b.tracer
    return tracer.wrap(a, "an operand")


# Attributes mods read to build constants: `b.new_ones((), dtype=torch.bool, device=b.device)`.
_ATTRIBUTES = {
    "device": lambda x: None, "shape": lambda x: torch.Size(()), "ndim": lambda x: 0,
    "dtype": lambda x: {INT: torch.int64, FLOAT: torch.float32, BOOL: torch.bool}[x.kind],
}

_METHODS = {
    "to": _to, "float": lambda x: _convert(x, FLOAT), "long": lambda x: _convert(x, INT),
    "int": lambda x: _convert(x, INT), "bool": lambda x: _convert(x, BOOL),
    "clamp": lambda x, min=None, max=None: _clamp(x.tracer, x, min, max),
    "clip": lambda x, min=None, max=None: _clamp(x.tracer, x, min, max),
    "new_ones": _new(1), "new_zeros": _new(0), "new_full": _new(None),
    "type_as": lambda x, other: x,
}


def _index_captured(tracer: Tracer, tensor, index) -> Traced:
    if not isinstance(tensor, torch.Tensor):
        raise tracer.error("indexing a traced value is not supported")
    index = index if isinstance(index, tuple) else (index,)
    if len(index) != tensor.dim():
        raise tracer.error(f"a captured tensor of shape {tuple(tensor.shape)} is indexed with "
                           f"{len(index)} indices", hint="index every dimension: bias[h, q_idx]")
    if tensor.is_complex():
        raise tracer.error("complex captured tensors are not supported")
    idx = []
    for axis, i in enumerate(index):
        if isinstance(i, (slice, type(None), type(Ellipsis))) or isinstance(i, torch.Tensor):
            raise tracer.error("slices, None, ... and tensor indices are not supported here",
                               hint="index each dimension with an integer expression")
        i = tracer.wrap(i, "an index")
        if i.kind == FLOAT:
            raise tracer.error(f"index {axis} of a captured tensor is a float expression",
                               hint="use integer arithmetic (// instead of /)")
        expr = _as_number(i)
        if expr.is_Integer and expr < 0:  # a constant negative index counts from the end
            expr = expr + tensor.shape[axis]
        idx.append(expr)
    # name it from the frame that indexed it, which may be a mod defined inside attnc itself
    frame = _user_frame(_package_dirs()[:1] + _package_dirs()[-1:])
    if any(e.has(sympy.Indexed) for e in idx):
        captured, idx = _gather(tracer, tensor, idx, frame)
    else:
        captured = tracer.captures.register(tensor, frame)
    captured.accesses.append(tuple(idx))
    acc = S.access(captured.name, *idx)
    if tensor.dtype == torch.bool:
        return Traced(sympy.Ne(acc, 0), BOOL, tracer)
    return Traced(acc, FLOAT if tensor.is_floating_point() else INT, tracer)


_VALUE = sympy.Symbol("value", integer=True)  # stands for a captured read inside an index


def _gather(tracer: Tracer, tensor: torch.Tensor, idx: list, frame
            ) -> tuple[Captured, list]:
    """`tensor` indexed by the value of a captured read, per[lut[kv_idx]]: the composition
    D = per[g(lut)] is gathered here, with torch, and the kernel reads D[kv_idx] like any
    captured tensor. D has one dim per dim of `tensor` indexed without captured values (passed
    through: per[h, lut[kv_idx]] gives D[h, kv_idx] over [per.shape[0], *lut.shape]), then
    lut's dims. It is gathered again at every call (every call traces), and torch autograd
    carries D's gradient on to per. A kernel gathering per[lut[...]] itself would also need
    range checks and scattered gradients at loaded indices; D costs one tensor of lut's size."""
    inner = {a for e in idx for a in e.atoms(sympy.Indexed)}
    if len(inner) > 1:
        raise tracer.error(
            "a captured tensor is indexed by the values of more than one captured read "
            f"({', '.join(sorted(map(str, inner)))})",
            hint="index by one captured read (per[lut[kv_idx]]), or combine the tables "
                 "outside the mod")
    read = inner.pop()
    source = tracer.captures.named(str(read.base))
    passed = [axis for axis, e in enumerate(idx) if not e.has(read)]
    lead = len(passed)
    index: list = [None] * tensor.dim()
    for pos, axis in enumerate(passed):
        shape = [1] * (lead + source.tensor.dim())
        shape[pos] = tensor.shape[axis]
        index[axis] = torch.arange(tensor.shape[axis], device=tensor.device).view(shape)
    values = source.tensor.detach().long()
    templates = []
    for axis, e in enumerate(idx):
        if axis in passed:
            continue
        g = e.xreplace({read: _VALUE})
        templates.append(sympy.srepr(g))
        if g.free_symbols - {_VALUE}:
            raise tracer.error(
                f"index {axis} of a captured tensor mixes the value {read} with the mod's "
                "arguments",
                hint=f"index by a function of {read} alone (per[lut[kv_idx] + 1]), or fold "
                     "the arguments into the table outside the mod")
        at = torch.as_tensor(Evaluator({_VALUE: values}, values)(g), device=values.device)
        at = (at.round() if at.is_floating_point() else at).long().expand(values.shape)
        size = tensor.shape[axis]
        if at.numel() and (int(at.min()) < 0 or int(at.max()) >= size):
            raise ValueError(
                f"{tracer.label}: index {axis} ({e}) of a captured tensor of shape "
                f"{tuple(tensor.shape)} takes the values [{int(at.min())}, {int(at.max())}] "
                f"over {source.name}, but the dimension has size {size}; clamp the index in "
                "the mod")
        index[axis] = at.to(tensor.device).view([1] * lead + list(values.shape))
    name = _variable_name(tensor, frame) or "buf"
    key = (id(tensor), source.name, tuple(passed), tuple(templates))
    derived = tracer.captures.derive(key, f"{name}_{source.name}", tensor[tuple(index)])
    return derived, [idx[axis] for axis in passed] + list(read.indices)


# --- entry points ---------------------------------------------------------------------------

def _index_args(tracer: Tracer) -> list[Traced]:
    return [Traced(s, INT, tracer) for s in (S.b, S.h, S.m, S.n)]


def _check_arity(tracer: Tracer, fn, count: int) -> None:
    try:
        inspect.signature(fn).bind(*range(count))
    except TypeError:
        raise tracer.error(f"must take {count} arguments "
                           + ("(score, b, h, q_idx, kv_idx)" if count == 5
                              else "(b, h, q_idx, kv_idx)")) from None
    except ValueError:  # builtins without a signature: let the call decide
        pass


def trace_score_mod(fn, captures: Captures) -> sympy.Expr:
    """score_mod(score, b, h, q_idx, kv_idx) as a sympy score over QK[m, n]*scale."""
    tracer = Tracer("score_mod", fn, captures)
    _check_arity(tracer, fn, 5)
    score = Traced(S.access(QK, S.m, S.n) * S.scale, FLOAT, tracer)
    out = tracer.run(score, *_index_args(tracer))
    if out.kind == BOOL:
        raise tracer.error("returns a boolean; a score_mod returns a score",
                           hint="masks go in a mask_mod and create_block_mask")
    return out.expr


def trace_mask_mod(fn, captures: Captures) -> sympy.Expr:
    """mask_mod(b, h, q_idx, kv_idx) as a sympy condition (True = visible)."""
    tracer = Tracer("mask_mod", fn, captures)
    _check_arity(tracer, fn, 4)
    out = tracer.run(*_index_args(tracer))
    if out.kind != BOOL:
        raise tracer.error("returns a number; a mask_mod returns a boolean (True = visible)")
    return out.expr


def hoist_mask(score: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr | None]:
    """where(c, s, -inf) in a score is a mask: move c out (when it does not read q.k) so the
    mask analysis can prune keys. Semantics are unchanged: masking is where(mask, score, -inf)."""
    conds = []
    while (isinstance(score, sympy.Piecewise) and len(score.args) == 2
           and score.args[1] == (-sympy.oo, True)
           and not score.args[0][1].has(sympy.IndexedBase(QK))):
        conds.append(score.args[0][1])
        score = score.args[0][0]
    return score, (sympy.And(*conds) if conds else None)
