"""Generate the fused backward of the recurrent kernel: reverse-mode through any scan, with the
step's vector-Jacobian products derived by sympy.

One program per (sequence, head), all of j in one tile (a state without a j axis, z[i], then
gets its adjoint from every value feature at once). The program first runs the scan forward,
storing the states every SEG steps (`ck_*`); then, segment by segment from the last, it replays
the segment storing each step's incoming states (`sc_*`) and walks its steps in reverse:

    the step's updates are recomputed from the stored states (each statement sees what it saw
    in the forward), the output's VJP adds do_t's share to the adjoints of the new states, and
    the statements' VJPs, last to first, turn the adjoint of a state's new value into its old
    value's and add to the adjoints of what the statement read: other states, q, k, v,
    per-step inputs (stored per step) and params (summed over steps).

A VJP of `expr` with adjoint `lam` (a tile over the axes of the value it produced): each
outermost `sum(i) body` becomes a placeholder z; for every atom a (an access, a per-step
symbol, a placeholder) the contribution is lam * d expr / d a, summed over the axes that a
lacks. A placeholder's contribution is its own adjoint, and recursion continues into its body.
"""

from __future__ import annotations

import sympy

from attnc.backends.triton.codegen import CodeBuilder
from attnc.linear_ir import AXES, T, LinearScan, contract, read, step_axes


class NotDifferentiable(Exception):
    """The scan uses something this backward cannot differentiate (floor, %, ...)."""


def _axes(ex) -> tuple[str, ...]:
    return tuple(a for a, sym in AXES.items() if sym in ex.free_symbols)


def _clean(d: sympy.Expr) -> sympy.Expr:
    d = d.replace(sympy.Heaviside, lambda x, *_: sympy.Piecewise((1, x > 0), (0, True)))
    d = d.replace(sympy.sign, lambda x: sympy.Piecewise((1, x > 0), (-1, x < 0), (0, True)))
    if d.has(sympy.Derivative, sympy.Subs, sympy.DiracDelta) or d.has(sympy.floor, sympy.Mod):
        raise NotDifferentiable(f"cannot differentiate through {d}")
    return d


class Adjoint:
    """Emits VJP statements; `acc[atom]` collects the printed contributions to each atom."""

    def __init__(self, c: CodeBuilder, pr, atoms: set):
        self.c, self.pr, self.atoms = c, pr, atoms
        self.acc: dict = {}
        self.count = 0

    def vjp(self, expr: sympy.Expr, lam: sympy.Symbol, lam_axes: tuple[str, ...]) -> None:
        sums: dict = {}

        def hide(e):
            if isinstance(e, sympy.Sum):
                z = sympy.Symbol(f"_z{len(sums)}_{self.count}", real=True)
                sums[z] = e
                return z
            if e.args and not isinstance(e, sympy.Indexed):
                return e.func(*(hide(a) for a in e.args))
            return e

        flat = hide(expr)
        self.count += 1
        found = [a for a in flat.atoms(sympy.Indexed, sympy.Symbol)
                 if a in sums or a in self.atoms]
        stand = {a: sympy.Dummy(str(a)) for a in found}
        plain = flat.xreplace(stand)
        back = {v: k for k, v in stand.items()}
        for atom in sorted(found, key=sympy.default_sort_key):
            # the derivative may read other placeholders: they print as their sums again
            d = _clean(sympy.diff(plain, stand[atom]).xreplace(back).xreplace(sums))
            if d == 0:
                continue
            own = _axes(sums[atom]) if atom in sums else _axes(atom)
            contribution = lam * d
            for a in sorted((set(lam_axes) | set(_axes(d))) - set(own)):
                contribution = contract(contribution, AXES[a])
            if atom in sums:
                name = sympy.Symbol(f"lz{self.count}_{len(self.acc)}_{str(atom)[1:]}", real=True)
                self.pr.names[name] = name.name
                self.c(f"{name.name} = {self.pr(contribution)}")
                self.vjp(sums[atom].args[0], name, own)  # into the summand, over its axes
            else:  # computed now: the adjoints it reads are reassigned later in the step
                temp = f"g{self.count}_{sum(map(len, self.acc.values()))}"
                self.c(f"{temp} = {self.pr(contribution)}")
                self.acc.setdefault(atom, []).append(temp)

    def take(self, atom) -> str | None:
        """The summed contributions to `atom` so far (and forget them)."""
        terms = self.acc.pop(atom, [])
        return " + ".join(f"({t})" for t in terms) if terms else None


def kernel_args(scan: LinearScan, tensors) -> list[str]:
    names = [s.name for s in scan.states]
    args = ["q", "k", "v"] + [f"x_{d.name}" for d in tensors] + [f"init_{n}" for n in names]
    args += ["cu_seqlens", "do"] + [f"dfinal_{n}" for n in names] + [f"ck_{n}" for n in names]
    args += [f"sc_{n}" for n in names] + ["dq", "dk", "dv"] + [f"dx_{d.name}" for d in tensors]
    args += [f"dinit_{n}" for n in names]
    args += [f"s{x}_{a}" for x in ("q", "k", "v", "do") for a in "bht"]
    args += [f"sx_{d.name}_{n}" for d in tensors for n in range(len(d.dims))]
    return args + ["T", "H", "DK", "DV", "scale", "NSEG", "HAS_INIT: tl.constexpr",
                   "VARLEN: tl.constexpr", "BK: tl.constexpr", "BV: tl.constexpr",
                   "SEG: tl.constexpr", "IEEE: tl.constexpr", "UPCAST: tl.constexpr"]


def emit(c: CodeBuilder, scan: LinearScan, names: dict, printer_cls):
    """Append `{name}_recurrent_bwd` to `c` and return its printer (for the helpers it used);
    raises NotDifferentiable, having emitted nothing, when a VJP cannot be derived."""
    from attnc.backends.triton.linear_codegen import (_STATE_MASK, _STATE_SHAPE,
                                                      _program_prologue, _step_load,
                                                      emit_step_loads, tensor_args)
    tensors = tensor_args(scan)
    per_step = {d.name for d in tensors if T in d.dims}
    states = {s.name: s for s in scan.states}
    operand = {read("q", ("i",)): "q", read("k", ("i",)): "k", read("v", ("j",)): "v"}
    inputs = {read(d.name, step_axes(d)): d for d in tensors}
    atoms = set(operand) | set(inputs) | {read(n, s.axes) for n, s in states.items()}
    body = CodeBuilder()
    body.depth = 3
    pr = printer_cls(dict(names), "step")
    adj = Adjoint(body, pr, atoms)
    size = {n: {("i", "j"): "BK * BV", ("i",): "BK", ("j",): "BV", (): "1"}[s.axes]
            for n, s in states.items()}
    offs = {n: {("i", "j"): "offs_i[:, None] * BV + tl.arange(0, BV)[None, :]",
                ("i",): "offs_i[:, None]", ("j",): "tl.arange(0, BV)[None, :]",
                (): "tl.zeros([1, 1], tl.int32)"}[s.axes] for n, s in states.items()}

    def slot(kind: str, n: str, index: str) -> str:
        return f"{kind}_{n} + (prog * {'NSEG' if kind == 'ck' else 'SEG'} + {index}) * {size[n]}"

    # the reverse step, into `body`: recompute, output VJP, statement VJPs, per-step grads
    seen = {n: f"old_{n}" for n in states}
    for u in scan.updates:
        for n in states:
            pr.names[read(n, states[n].axes)] = seen[n]
        body(f"new_{u.state} = tl.where({_STATE_MASK[states[u.state].axes]}, {pr(u.expr)}, 0.0)")
        seen[u.state] = f"new_{u.state}"
    for n in states:
        pr.names[read(n, states[n].axes)] = seen[n]
    lam_o = sympy.Symbol("lam_o", real=True)
    pr.names[lam_o] = "lam_o"
    adj.vjp(scan.output, lam_o, ("j",))
    lam = {n: sympy.Symbol(f"lam_{n}", real=True) for n in states}
    for n in states:
        pr.names[lam[n]] = f"lam_{n}"
    for n in states:  # the output read the new values
        got = adj.take(read(n, states[n].axes))
        if got:
            body(f"lam_{n} = lam_{n} + {got}")
    order = list(scan.updates)
    for pos in range(len(order) - 1, -1, -1):
        u = order[pos]
        before = {x.state for x in order[:pos]}
        for n in states:
            pr.names[read(n, states[n].axes)] = f"new_{n}" if n in before else f"old_{n}"
        adj.vjp(u.expr, lam[u.state], states[u.state].axes)
        own = adj.take(read(u.state, states[u.state].axes))
        body(f"lam_{u.state} = tl.where({_STATE_MASK[states[u.state].axes]}, "
             f"{own or '0.0'}, 0.0)")
        for n in states:
            if n == u.state:
                continue
            got = adj.take(read(n, states[n].axes))
            if got:
                body(f"lam_{n} = tl.where({_STATE_MASK[states[n].axes]}, lam_{n} + {got}, 0.0)")
    for atom, x in operand.items():
        got = adj.take(atom)
        if got:
            axes = ("i",) if x != "v" else ("j",)
            offs_, size_ = ("offs_i", "DK") if x != "v" else ("offs_j", "DV")
            body(f"tl.store(d{x} + ((bb * H + hh).to(tl.int64) * T + row) * {size_} + {offs_}, "
                 f"{_vector(axes, _shaped(axes, got))}, mask={offs_} < {size_})")
    for atom, d in inputs.items():
        got = adj.take(atom)
        if not got:
            continue
        axes = step_axes(d)
        if d.name in per_step:
            body(_grad_store(d, axes, _shaped(axes, got), "row"))
        else:
            body(f"acc_{d.name} = acc_{d.name} + {_place(axes, _shaped(axes, got))}")
    if adj.acc:
        raise NotDifferentiable(f"unplaced gradients: {sorted(map(str, adj.acc))}")

    used_consts = [d for d in tensors if d.name not in per_step]
    c("@triton.jit")
    c.call(f"def {scan.name}_recurrent_bwd(", kernel_args(scan, tensors), "):")
    with c.indented():
        _program_prologue(c)
        c("prog = (n * H + hh).to(tl.int64)")
        for d in used_consts:
            c(f"x_{d.name}_t = {_step_load(d, 'bos')}")
            c(f"acc_{d.name} = tl.zeros([BK, BV], tl.float32)")
        for n, s in states.items():
            c(f"st_{n} = tl.zeros({_STATE_SHAPE[s.axes]}, tl.float32)")
            with c.block("if HAS_INIT:"):
                c(f"st_{n} = tl.load(init_{n} + prog * {size[n]} + {offs[n]})")
        with c.block("for tt in range(0, seq_len):"):
            with c.block("if tt % SEG == 0:"):
                for n in states:
                    c(f"tl.store({slot('ck', n, 'tt // SEG')} + {offs[n]}, st_{n})")
            _forward_step(c, scan, pr)
        for n, s in states.items():
            c(f"lam_{n} = tl.load(dfinal_{n} + prog * {size[n]} + {offs[n]})")
        c("n_seg = tl.cdiv(seq_len, SEG)")
        with c.block("for it in range(0, n_seg):"):
            c("sg = n_seg - 1 - it")
            c("start = sg * SEG")
            c("stop = tl.minimum(seq_len, start + SEG)")
            for n in states:
                c(f"st_{n} = tl.load({slot('ck', n, 'sg')} + {offs[n]})")
            with c.block("for tt in range(start, stop):"):
                for n in states:
                    c(f"tl.store({slot('sc', n, 'tt - start')} + {offs[n]}, st_{n})")
                _forward_step(c, scan, pr)
            with c.block("for back in range(0, stop - start):"):
                c("tt = stop - 1 - back")
                c("row = bos + tt")
                c("t_f = tt * 1.0")
                for n in states:
                    c(f"old_{n} = tl.load({slot('sc', n, 'tt - start')} + {offs[n]})")
                emit_step_loads(c, scan, _everything(scan))
                c("lam_o = tl.load(do + bb * sdo_b + hh * sdo_h + row * sdo_t + offs_j, "
                  "mask=mask_j, other=0.0).to(tl.float32)[None, :]")
                c.lines.extend(body.lines)
        for n in states:
            c(f"tl.store(dinit_{n} + prog * {size[n]} + {offs[n]}, lam_{n})")
        for d in used_consts:
            c(f"tl.store(dx_{d.name} + prog * BK * BV + "
              "offs_i[:, None] * BV + tl.arange(0, BV)[None, :], "
              f"acc_{d.name} + tl.zeros([BK, BV], tl.float32))")
    c()
    return pr


def _shaped(axes, got: str) -> str:
    """A contribution as a tile of exactly its atom's shape, zero in the padding."""
    from attnc.backends.triton.linear_codegen import _STATE_MASK, _STATE_SHAPE
    return (f"tl.where({_STATE_MASK[axes]}, {got} + tl.zeros({_STATE_SHAPE[axes]}, tl.float32), "
            "0.0)")


def _vector(axes, tile: str) -> str:
    """A [BK, 1] / [1, BV] / [1, 1] tile as the vector (or scalar) a store writes."""
    if axes == ("i",):
        return f"tl.sum({tile}, axis=1)"
    if axes == ("j",):
        return f"tl.sum({tile}, axis=0)"
    return f"tl.sum(tl.sum({tile}, axis=1), axis=0)"


def _place(axes, tile: str) -> str:
    """A param's contribution placed in its [BK, BV] accumulator: over its own axes, in row or
    column 0 for the axes it lacks."""
    if axes == ("i", "j"):
        return tile
    first_col = "tl.arange(0, BV)[None, :] == 0"
    first_row = "offs_i[:, None] == 0"
    cond = {("i",): first_col, ("j",): first_row, (): f"({first_row}) & ({first_col})"}[axes]
    return f"tl.where({cond}, {tile}, 0.0)"


def _grad_store(d, axes, tile: str, time: str) -> str:
    from attnc.backends.triton.linear_codegen import _decl_offset
    from attnc.linear_ir import DK, DV
    off = _decl_offset(d, time, {DK: "offs_i", DV: "offs_j"})
    mask = {("i",): ", mask=mask_i", ("j",): ", mask=mask_j"}.get(axes, "")
    return f"tl.store(dx_{d.name} + {off}, {_vector(axes, tile)}{mask})"


def _everything(scan: LinearScan) -> set[str]:
    """What the backward loads per step: every operand and per-step input."""
    from attnc.backends.triton.linear_codegen import tensor_args
    return {"q", "k", "v"} | {d.name for d in tensor_args(scan)}


def _forward_step(c: CodeBuilder, scan: LinearScan, pr) -> None:
    """One forward step on the st_* registers (the printer's state names are switched to them
    and back)."""
    from attnc.backends.triton.linear_codegen import _STATE_MASK, emit_step_loads
    saved = {read(s.name, s.axes): pr.names[read(s.name, s.axes)] for s in scan.states}
    for s in scan.states:
        pr.names[read(s.name, s.axes)] = f"st_{s.name}"
    c("row = bos + tt")
    c("t_f = tt * 1.0")
    emit_step_loads(c, scan, _everything(scan))
    for u in scan.updates:
        s = scan.state(u.state)
        c(f"st_{s.name} = tl.where({_STATE_MASK[s.axes]}, {pr(u.expr)}, 0.0)")
    pr.names.update(saved)
