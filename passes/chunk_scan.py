"""chunk_scan: recognize the algebraic class of each state update and schedule the scan.

Every update is written `X <- U(X, step)`. With X scaled by a symbol lam, U is linear in X when
d^2 U / d lam^2 = 0; then U = A(X) + B with B = U at X = 0, and A's terms are read off:

    A(X)[i, j] = a * X[i, j]                      a = 1: additive; a free of i: scalar decay;
                                                  a over i: diagonal (vector) decay (GLA)
    A(X)[i, j] = a * (X[i, j] - beta w[i] sum(i) w[i] X[i, j])
                                                  a = 1: delta rule; otherwise gated delta rule

and B must be an outer product key[i] * value[j] (for delta rules beta * w[i] * value[j]). The
output must read states only through readouts `sum(i) x[i] * X[i, j]`. Then the scan is
scheduled `chunked`: within a chunk, masked attention-like products with decay; across chunks,
the state is passed (for delta rules through the WY/UT form, a unit-triangular solve).
Anything else (an update that is not linear in its state, reads another state, has a rank-2
input, ...) stays a sequential recurrence and the schedule records why. The pass only analyses:
the scan's semantics are untouched, and `interpret_chunked` (backends/reference/linear.py) checks
that the chunked form computes what the recurrence computes.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from attnc.ir.linear import (LinearScan, Readout, ScanSchedule, StatePlan, UpdateClass, i, j,
                             name_of, read, reads)
from attnc.passes import Pass, PassKind

_LAM = sympy.Symbol("_lam")


class _Sequential(Exception):
    """The scan cannot be chunked; the message says why."""


def run(scan: LinearScan) -> LinearScan:
    return replace(scan, schedule=schedule(scan))


def schedule(scan: LinearScan) -> ScanSchedule:
    try:
        plans = tuple(classify(scan, u.state, u.expr) for u in scan.updates)
        readouts, output = _readouts(scan)
    except _Sequential as why:
        return ScanSchedule(chunked=False, reason=str(why))
    return ScanSchedule(chunked=True, states=plans, readouts=readouts, output=output)


def classify(scan: LinearScan, state: str, update: sympy.Expr) -> StatePlan:
    """The StatePlan of one state's update; raises _Sequential with the reason otherwise."""
    others = reads(update) & ({s.name for s in scan.states} - {state})
    if others:
        raise _Sequential(f"the update of {state} reads state {sorted(others)[0]} (coupled states)")
    x = read(state, scan.state(state).axes)
    scaled = update.xreplace({x: _LAM * x})
    if _simplify(sympy.diff(scaled, _LAM, 2)) != 0:
        raise _Sequential(f"the update of {state} is not linear in {state}")
    inputs = _simplify(scaled.xreplace({_LAM: 0}))
    linear = _split_sums(sympy.expand(_simplify(sympy.diff(scaled, _LAM))))
    direct, corrections = sympy.Integer(0), []
    for term in sympy.Add.make_args(linear):
        if term == 0:
            continue
        coeff, sums = _factor_out_sums(term, state)
        if not sums:
            c = _simplify(term / x)
            if _reads_state(c, state):
                raise _Sequential(f"a term of {state}'s update is not linear in {state}: {term}")
            direct += c
        elif len(sums) == 1 and not _reads_state(coeff, state):
            corrections.append((coeff, sums[0]))
        else:
            raise _Sequential(f"a term of {state}'s update is not linear in {state}: {term}")
    a = _simplify(direct)
    if j in a.free_symbols:
        raise _Sequential(f"the decay of {state} varies along the value axis j")
    if not corrections:
        kind = UpdateClass.ADDITIVE if a == 1 else (
            UpdateClass.SCALAR_DECAY if i not in a.free_symbols else UpdateClass.DIAGONAL_DECAY)
        key, value = _outer(inputs, state)
        return StatePlan(state, kind, key, value, log_decay=_log(a, state))
    return _delta(state, x, a, corrections, inputs)


def _delta(state, x, a, corrections, inputs) -> StatePlan:
    if len(corrections) != 1 or i in a.free_symbols or a == 0:
        raise _Sequential(f"the update of {state} mixes its rows in a way that is not a "
                          "(gated) delta rule")
    coeff, body = corrections[0]
    summand, limits = body.args[0], body.args[1:]
    weight = _simplify(summand / x)
    if [lim[0] for lim in limits] != [i] or j in weight.free_symbols \
            or _reads_state(weight, state):
        raise _Sequential(f"the update of {state} contracts its state in a way that is not a "
                          "(gated) delta rule")
    beta = _simplify(-coeff / (a * weight))
    if i in beta.free_symbols or j in beta.free_symbols:
        raise _Sequential(f"the correction of {state} is not a * beta * w[i] * sum(i) w[i] * "
                          f"{state}[i, j] with a scalar beta")
    value = _simplify(inputs / (beta * weight))
    if i in value.free_symbols:
        raise _Sequential(f"the input of {state} is not beta * w[i] * value[j] with the "
                          "correction's w")
    kind = UpdateClass.DELTA_RULE if a == 1 else UpdateClass.GATED_DELTA_RULE
    return StatePlan(state, kind, weight, value, log_decay=_log(a, state), beta=beta)


def _outer(inputs: sympy.Expr, state: str):
    """Split the input term into key[i] * value[j]."""
    for form in (inputs, sympy.factor(inputs)):
        key, value = sympy.Integer(1), sympy.Integer(1)
        ok = True
        for f in sympy.Mul.make_args(form):
            free = f.free_symbols & {i, j}
            if free == {i, j}:
                ok = False
                break
            if i in free:
                key *= f
            else:
                value *= f
        if ok:
            return key, value
    raise _Sequential(f"the input term of {state} is not an outer product key[i] * value[j]: "
                      f"{inputs}")


def _log(a: sympy.Expr, state: str) -> sympy.Expr:
    if a.is_positive is False or a.is_zero or _may_vanish(a):
        raise _Sequential(f"the decay of {state} is not positive: {a}")
    return sympy.expand_log(sympy.log(a), force=True)


def _may_vanish(a: sympy.Expr) -> bool:
    """A decay with a branch that is zero or negative on some steps (a reset such as
    where(t % 4 == 0, 0, 1)): the chunked form sums log decays, and log 0 = -inf turns the
    decay between two steps into -inf - -inf = NaN."""
    folded = sympy.piecewise_fold(a)
    return isinstance(folded, sympy.Piecewise) and any(
        value.is_zero or value.is_positive is False for value, _ in folded.args)


def _readouts(scan: LinearScan):
    """Replace each `sum(i) x[i] * X[i, j]` of the output by a readout symbol."""
    states = {s.name: s for s in scan.states}
    found: dict[tuple[str, sympy.Expr], Readout] = {}

    def readout(state: str, query: sympy.Expr) -> sympy.Symbol:
        key = (state, query)
        if key not in found:
            found[key] = Readout(state, query, sympy.Symbol(f"r{len(found)}", real=True))
        return found[key].symbol

    def visit(ex):
        if isinstance(ex, sympy.Sum) and _reads_any(ex, states):
            # sympy merges nested sums into one with several limits; finite sums commute, so
            # the sum over i becomes readouts and any sum over j wraps them
            others = [lim for lim in ex.args[1:] if lim[0] != i]
            if len(others) == len(ex.args) - 1:  # only over j: of readouts (an output norm)
                return sympy.Sum(visit(ex.args[0]), *others)
            value = over_i(ex.args[0])
            return sympy.Sum(value, *others) if others else value
        read_state = name_of(ex)
        if read_state is not None and read_state in states:
            if "i" in states[read_state].axes:
                raise _Sequential(f"the output reads state {read_state} without contracting i")
            return readout(read_state, sympy.Integer(1))
        if ex.args and not isinstance(ex, sympy.Indexed):
            return ex.func(*(visit(a) for a in ex.args))
        return ex

    def over_i(summand):
        """sum(i) summand, as readouts: one per state, its query the sum of its coefficients."""
        queries: dict[str, sympy.Expr] = {}
        for term in sympy.Add.make_args(sympy.expand(summand)):
            hits = [f for f in sympy.Mul.make_args(term) if name_of(f) in states]
            rest = sympy.Mul(*[f for f in sympy.Mul.make_args(term) if name_of(f) not in states])
            if len(hits) != 1 or _reads_any(rest, states):
                raise _Sequential("the output reads a state other than through "
                                  "sum(i) x[i] * state[i, j]")
            name = str(name_of(hits[0]))
            queries[name] = queries.get(name, sympy.Integer(0)) + rest
        return sympy.Add(*(readout(name, sympy.factor(x)) for name, x in queries.items()))

    output = visit(scan.output)
    return tuple(found.values()), output


def _split_sums(ex: sympy.Expr) -> sympy.Expr:
    """Sum(a + b) -> Sum(a) + Sum(b), and factors free of the bound indices pulled out (all of a
    sum's limits: sympy merges nested sums into one)."""
    def split(s: sympy.Sum):
        limits = s.args[1:]
        bound = {lim[0] for lim in limits}
        out = sympy.Integer(0)
        for term in sympy.Add.make_args(sympy.expand(s.args[0])):
            inner: list[sympy.Expr] = []
            outer: list[sympy.Expr] = []
            for f in sympy.Mul.make_args(term):
                (inner if f.free_symbols & bound else outer).append(f)
            out += sympy.Mul(*outer) * sympy.Sum(sympy.Mul(*inner), *limits)
        return out
    return ex.replace(lambda e: isinstance(e, sympy.Sum), split)


def _factor_out_sums(term: sympy.Expr, state: str):
    coeff: list[sympy.Expr] = []
    sums: list[sympy.Expr] = []
    for f in sympy.Mul.make_args(term):
        (sums if isinstance(f, sympy.Sum) and _reads_state(f, state) else coeff).append(f)
    return sympy.Mul(*coeff), sums


def _reads_state(ex: sympy.Expr, state: str) -> bool:
    return state in reads(ex)


def _reads_any(ex: sympy.Expr, states) -> bool:
    return bool(reads(ex) & set(states))


def _simplify(ex: sympy.Expr) -> sympy.Expr:
    return sympy.simplify(ex.doit()) if ex.has(sympy.Sum) else sympy.simplify(ex)


PASS = Pass("chunk_scan", PassKind.REWRITE, run,
            "classify each state update: its chunkwise-parallel form, or why it has none")
