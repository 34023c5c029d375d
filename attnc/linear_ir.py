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

After `chunk_scan`, a scan carries its `Schedule`: per state, the algebraic class of its update
and the pieces of the chunkwise-parallel form, or the reason the scan stays sequential.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.ir import TensorDecl

i, j = sympy.symbols("i j", integer=True, nonnegative=True)
t = sympy.Symbol("t", integer=True, nonnegative=True)
T, DK, DV, D = sympy.symbols("T DK DV D", integer=True, positive=True)
AXES = {"i": i, "j": j}
EXTENT = {i: DK, j: DV}
OPERAND_AXES = {"q": ("i",), "k": ("i",), "v": ("j",)}
MAPS = {"taylor2": 0, "hedgehog": 1}  # built-in feature maps and how many params each takes


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
    fn: str
    params: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"map {self.target} = {self.fn}({', '.join((self.target,) + self.params)})"


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

    `kind` is additive | scalar_decay | diagonal_decay | delta_rule | gated_delta_rule.
    `log_decay` is log a_t (scalar) or log a_t[i] (diagonal); `beta` is the delta rule's step size:
    for delta rules A_t(S) = a_t (I - beta key key^T) S and the input is beta key value^T.
    """

    state: str
    kind: str
    key: sympy.Expr
    value: sympy.Expr
    log_decay: sympy.Expr = sympy.Integer(0)
    beta: sympy.Expr = sympy.Integer(1)


@dataclass(frozen=True)
class Schedule:
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
    schedule: Schedule | None = None

    def state(self, name: str) -> StateDecl:
        return next(s for s in self.states if s.name == name)


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
        lines.append(f"    {p.state}: {p.kind}")
        lines.append(f"      key[i] = {sympy.sstr(p.key)};  value = {sympy.sstr(p.value)}")
        if p.kind != "additive" and p.kind != "delta_rule":
            lines.append(f"      log a_t = {sympy.sstr(p.log_decay)}")
        if p.kind in ("delta_rule", "gated_delta_rule"):
            lines.append(f"      beta = {sympy.sstr(p.beta)}  (WY/UT form: T = (I + tril(diag("
                         "beta) Gamma K K^T, -1))^-1 by forward substitution)")
    for r in sch.readouts:
        lines.append(f"    {r.symbol} = sum(i) {sympy.sstr(r.query)} * {_lhs(scan.state(r.state))}")
    lines.append(f"    o[j] = {sympy.sstr(sch.output)}")
    return "\n".join(lines)


def _lhs(s: StateDecl) -> str:
    return f"{s.name}[{', '.join(s.axes)}]" if s.axes else s.name
