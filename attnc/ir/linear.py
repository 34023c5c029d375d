"""State-update IR: a `linear` block as a scan over the time rank t.

A `LinearScan` is batched over (b, h) and ordered over t. At every step the updates run in
statement order (an update that reads a state updated earlier in the same step sees its new
value; the state being updated is read at its old value), then the output `o[j]` is evaluated
from the updated states. Expressions are sympy in element form over two feature ranks:

    i  key features   (size DK: q's and k's last dimension, after any feature map)
    j  value features (size DV: v's last dimension)

`q[i]`, `k[i]`, `v[j]`, per-step inputs (`g[i]`, `beta`) and states (`S[i, j]`, `z[i]`, `c`) are
`sympy.Indexed` accesses (bare names are symbols); a contraction is a `sympy.Sum` over i or j.
Feature maps that change the feature dimension (taylor2, hedgehog) are `FeatureMap` prologues.

After `chunk_scan`, a scan carries its `ScanSchedule`: per state, the algebraic class of its
update and the pieces of the chunkwise-parallel form, or the reason the scan stays sequential.
`verify_scan` states what a well-formed scan is and runs after every pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy

from attnc.expr.symbols import AXES, DK, DV, EXTENT, D, T, i, j, t
from attnc.ir.cascade import TensorDecl

__all__ = ["AXES", "DK", "DV", "D", "T", "i", "j", "t", "OPERAND_AXES", "FeatureMapKind",
           "UpdateClass", "Gate", "read", "contract", "name_of", "reads", "StateDecl",
           "FeatureMap", "Update", "Readout", "StatePlan", "ScanSchedule", "LinearScan",
           "step_axes", "format_scan", "verify_scan"]

OPERAND_AXES = {"q": ("i",), "k": ("i",), "v": ("j",)}


class FeatureMapKind(enum.Enum):
    """Built-in feature maps; `params` is how many weight tensors each takes."""

    TAYLOR2 = "taylor2"
    HEDGEHOG = "hedgehog"

    @property
    def params(self) -> int:
        return {FeatureMapKind.TAYLOR2: 0, FeatureMapKind.HEDGEHOG: 1}[self]


class Gate(enum.IntEnum):
    """How a state decays between steps; the core kernels' GATE constexpr."""

    NONE = 0
    SCALAR = 1  # one log decay per step
    VECTOR = 2  # one log decay per step and key feature


class UpdateClass(enum.Enum):
    """The algebraic class chunk_scan finds for a state's update."""

    ADDITIVE = "additive"
    SCALAR_DECAY = "scalar_decay"
    DIAGONAL_DECAY = "diagonal_decay"
    DELTA_RULE = "delta_rule"
    GATED_DELTA_RULE = "gated_delta_rule"

    @property
    def delta(self) -> bool:
        return self in (UpdateClass.DELTA_RULE, UpdateClass.GATED_DELTA_RULE)

    @property
    def gate(self) -> Gate:
        if self is UpdateClass.DIAGONAL_DECAY:
            return Gate.VECTOR
        if self in (UpdateClass.SCALAR_DECAY, UpdateClass.GATED_DELTA_RULE):
            return Gate.SCALAR
        return Gate.NONE


def read(name: str, axes: tuple[str, ...]) -> sympy.Expr:
    """The element-form access of a per-step tensor or state with these feature axes."""
    if not axes:
        return sympy.Symbol(name, real=True)
    return sympy.IndexedBase(name, real=True)[tuple(AXES[a] for a in axes)]


def contract(body: sympy.Expr, axis: sympy.Symbol) -> sympy.Sum:
    return sympy.Sum(body, (axis, 0, EXTENT[axis] - 1))


def name_of(ex) -> str | None:
    """The tensor an access reads (None for anything else)."""
    if isinstance(ex, sympy.Indexed):
        return str(ex.base)
    if isinstance(ex, sympy.Symbol):
        return ex.name
    return None


def reads(ex: sympy.Expr) -> set[str]:
    """Tensors an expression reads (accesses and bare per-step symbols)."""
    out = {str(a.base) for a in ex.atoms(sympy.Indexed)}
    out |= {s.name for s in ex.free_symbols if isinstance(s, sympy.Symbol)}
    return out


@dataclass(frozen=True)
class StateDecl:
    name: str
    axes: tuple[str, ...]  # a subsequence of ("i", "j")

    def __str__(self) -> str:
        return f"state {self.name}[{', '.join(self.axes)}]" if self.axes else f"state {self.name}"


@dataclass(frozen=True)
class FeatureMap:
    """`map q = taylor2(q)`: a prologue replacing q (or k) by a feature map of it."""

    target: str
    fn: FeatureMapKind
    params: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (f"map {self.target} = {self.fn.value}"
                f"({', '.join((self.target,) + self.params)})")


@dataclass(frozen=True)
class Update:
    state: str
    expr: sympy.Expr


@dataclass(frozen=True)
class Readout:
    """`r[t, j] = sum(i) x[t, i] * state[t, i, j]` (j absent for a vector state)."""

    state: str
    query: sympy.Expr  # x, an expression in i over per-step tensors
    symbol: sympy.Symbol  # stands for the readout in the output expression


@dataclass(frozen=True)
class StatePlan:
    """How one state evolves: `state = A_t(state) + key[i] * value[j]`.

    `log_decay` is log a_t (scalar) or log a_t[i] (diagonal); `beta` is the delta rule's step size:
    for delta rules A_t(S) = a_t (I - beta key key^T) S and the input is beta key value^T.
    """

    state: str
    kind: UpdateClass
    key: sympy.Expr
    value: sympy.Expr
    log_decay: sympy.Expr = sympy.Integer(0)
    beta: sympy.Expr = sympy.Integer(1)


@dataclass(frozen=True)
class ScanSchedule:
    """chunk_scan's verdict: `chunked` with a plan per state and the readouts the output reads,
    or sequential (`reason` says why)."""

    chunked: bool
    reason: str = ""
    states: tuple[StatePlan, ...] = ()
    readouts: tuple[Readout, ...] = ()
    output: sympy.Expr | None = None  # the output over readout symbols and per-step tensors


@dataclass(frozen=True)
class LinearScan:
    name: str
    decls: tuple[TensorDecl, ...]  # param and input tensors
    maps: tuple[FeatureMap, ...]
    states: tuple[StateDecl, ...]
    updates: tuple[Update, ...]
    output: sympy.Expr
    options: tuple[tuple[str, sympy.Expr], ...] = ()
    schedule: ScanSchedule | None = None
    chunk_size: int | None = None  # the compile option: steps per chunk (None: the default)

    def state(self, name: str) -> StateDecl:
        return next(s for s in self.states if s.name == name)

    @property
    def step_tensors(self) -> tuple[TensorDecl, ...]:
        """Declared tensors the kernels read (a feature map's weights are the prologue's)."""
        mapped = {p for mp in self.maps for p in mp.params}
        return tuple(d for d in self.decls if d.name not in mapped)

    def atoms(self) -> set:
        """What a step reads: q, k, v, the per-step tensors and the states (element form)."""
        found = {read("q", ("i",)), read("k", ("i",)), read("v", ("j",))}
        found |= {read(d.name, step_axes(d)) for d in self.step_tensors}
        return found | {read(s.name, s.axes) for s in self.states}


def step_axes(decl: TensorDecl) -> tuple[str, ...]:
    """The feature axes a per-step tensor is indexed by inside the scan (its dims after b, h, t)."""
    return tuple("i" if d == DK else "j" for d in decl.dims if d in (DK, DV))


def format_scan(scan: LinearScan) -> str:
    """Deterministic text of a scan and, once scheduled, of its chunked form."""
    lines = [f"linear {scan.name}   (scan over t; per step: updates in order, then o)"]
    lines += [f"  option {k} = {v}" for k, v in scan.options]
    lines += [f"  {d}" for d in scan.decls]
    lines += [f"  {mp}" for mp in scan.maps]
    lines += [f"  {s}" for s in scan.states]
    for u in scan.updates:
        lines.append(f"  {_lhs(scan.state(u.state))} <- {sympy.sstr(u.expr)}")
    lines.append(f"  o[j] = {sympy.sstr(scan.output)}")
    sch = scan.schedule
    if sch is None:
        return "\n".join(lines)
    if not sch.chunked:
        lines.append(f"  schedule: recurrent (sequential over t) -- not chunked: {sch.reason}")
        return "\n".join(lines)
    lines.append("  schedule: chunked (intra-chunk masked products + inter-chunk state passing)")
    for p in sch.states:
        lines.append(f"    {p.state}: {p.kind.value}")
        lines.append(f"      key[i] = {sympy.sstr(p.key)};  value = {sympy.sstr(p.value)}")
        if p.kind not in (UpdateClass.ADDITIVE, UpdateClass.DELTA_RULE):
            lines.append(f"      log a_t = {sympy.sstr(p.log_decay)}")
        if p.kind.delta:
            lines.append(f"      beta = {sympy.sstr(p.beta)}  (WY/UT form: T = (I + tril(diag("
                         "beta) Gamma K K^T, -1))^-1 by forward substitution)")
    for r in sch.readouts:
        lines.append(f"    {r.symbol} = sum(i) {sympy.sstr(r.query)} * {_lhs(scan.state(r.state))}")
    lines.append(f"    o[j] = {sympy.sstr(sch.output)}")
    return "\n".join(lines)


def _lhs(s: StateDecl) -> str:
    return f"{s.name}[{', '.join(s.axes)}]" if s.axes else s.name


def verify_scan(scan: LinearScan) -> None:
    """What a well-formed scan is (checked after every pass): states have distinct names and
    axes from (i, j); each is updated exactly once, by an expression whose free feature axes
    are its own; the output's free axes are at most j; a chunked schedule plans every state
    once and its readouts read planned states."""
    names = [s.name for s in scan.states]
    if len(set(names)) != len(names):
        raise AssertionError(f"{scan.name}: two states share a name")
    if any(s.axes not in ((), ("i",), ("j",), ("i", "j")) for s in scan.states):
        raise AssertionError(f"{scan.name}: a state's axes are not a subsequence of (i, j)")
    if sorted(u.state for u in scan.updates) != sorted(names):
        raise AssertionError(f"{scan.name}: every state must be updated exactly once")
    for u in scan.updates:
        free = {a for a, sym in AXES.items() if sym in u.expr.free_symbols}
        if not free <= set(scan.state(u.state).axes):
            raise AssertionError(f"{scan.name}: the update of {u.state} has free axes {free}")
    if {a for a, sym in AXES.items() if sym in scan.output.free_symbols} - {"j"}:
        raise AssertionError(f"{scan.name}: the output has a free key axis")
    sch = scan.schedule
    if sch is not None and sch.chunked:
        if sorted(p.state for p in sch.states) != sorted(names):
            raise AssertionError(f"{scan.name}: the schedule must plan every state once")
        if any(r.state not in names for r in sch.readouts) or sch.output is None:
            raise AssertionError(f"{scan.name}: the schedule's readouts or output are missing")
    if sch is not None and not sch.chunked and not sch.reason:
        raise AssertionError(f"{scan.name}: a sequential schedule must say why")
