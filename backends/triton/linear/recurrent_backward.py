"""Generate the fused backward of the recurrent kernel: reverse-mode through any scan, with the
step's vector-Jacobian products derived by sympy (attnc.expr.derivatives.vjp_parts).

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
tile_scan decides that a scan gets this kernel (the same derivatives, `vjp_obstacle`).
"""

from __future__ import annotations

import sympy

from attnc.backends.triton.contract import Bind, GridRule, KernelContract, Param, ParamType, arg
from attnc.backends.triton.linear.forward import (_STATE_MASK, _STATE_SHAPE, ScanNames,
                                                  _decl_offset, _program_prologue, _step_load,
                                                  emit_step_loads, states, tensor_params)
from attnc.backends.triton.source import CodeBuilder
from attnc.expr.derivatives import fresh_symbol, symbol_names, vjp_parts
from attnc.expr.symbols import AXES, DK, DV, T
from attnc.ir.linear import LinearScan, contract, read, step_axes


def _axes(ex) -> tuple[str, ...]:
    return tuple(a for a, sym in AXES.items() if sym in ex.free_symbols)


class Adjoint:
    """Emits VJP statements; `acc[atom]` collects the printed contributions to each atom."""

    def __init__(self, c: CodeBuilder, pr, atoms: set, taken: set[str]):
        self.c, self.pr, self.atoms = c, pr, atoms
        self.taken = taken  # symbol names in use: the scan's and those made here
        self.acc: dict = {}
        self.count = 0

    def vjp(self, expr: sympy.Expr, lam: sympy.Symbol, lam_axes: tuple[str, ...]) -> None:
        parts = vjp_parts(expr, self.atoms, self.count, self.taken)
        self.count += 1
        for atom, d, body in parts:
            if d == 0:
                continue
            own = _axes(body) if body is not None else _axes(atom)
            contribution = lam * d
            for a in sorted((set(lam_axes) | set(_axes(d))) - set(own)):
                contribution = contract(contribution, AXES[a])
            if body is not None:
                name = fresh_symbol(f"lz{self.count}_{len(self.acc)}_{str(atom)[1:]}",
                                    self.taken)
                self.pr.names[name] = name.name
                self.c(f"{name.name} = {self.pr(contribution)}")
                self.vjp(body.args[0], name, own)  # into the summand, over its axes
            else:  # computed now: the adjoints it reads are reassigned later in the step
                temp = f"g{self.count}_{sum(map(len, self.acc.values()))}"
                self.c(f"{temp} = {self.pr(contribution)}")
                self.acc.setdefault(atom, []).append(temp)

    def take(self, atom) -> str | None:
        """The summed contributions to `atom` so far (and forget them)."""
        terms = self.acc.pop(atom, [])
        return " + ".join(f"({t})" for t in terms) if terms else None


def whole_grid(v) -> tuple[int, int, int]:
    """One program per (sequence, head), holding all of DK x DV."""
    return v["sequences"], v["H"], 1


def backward_contract(scan: LinearScan, nm: ScanNames) -> KernelContract:
    qk = ParamType.FP32_PTR if scan.maps else ParamType.DATA
    fp32 = ParamType.FP32_PTR
    pointers, strides = tensor_params(scan, nm)
    params = ([arg("q", qk), arg("k", qk), arg("v", ParamType.DATA)] + pointers
              + states(scan, "init", "init", nm)
              + [arg("cu_seqlens", ParamType.I32_PTR), arg("do", ParamType.DATA)]
              + states(scan, "dfinal", "dfinal", nm) + states(scan, "checkpoints", "ck", nm)
              + states(scan, "scratch", "sc", nm)
              + [arg("dq", fp32), arg("dk", fp32), arg("dv", fp32)]
              + [Param(f"dx_{nm(d.name)}", fp32, Bind("grad", d.name))
                 for d in scan.step_tensors]
              + states(scan, "dinit", "dinit", nm)
              + [arg(f"s{x}_{a}", ParamType.INT) for x in ("q", "k", "v", "do") for a in "bht"]
              + strides + [arg(x, ParamType.INT) for x in ("T", "H", "DK", "DV")]
              + [arg("scale", ParamType.FLOAT), arg("NSEG", ParamType.INT)]
              + [arg(x, ParamType.CONSTEXPR) for x in ("HAS_INIT", "VARLEN", "BK", "BV", "SEG",
                                                       "IEEE", "UPCAST")])
    return KernelContract("recurrent_bwd", f"{nm(scan.name)}_recurrent_bwd", tuple(params),
                          GridRule(whole_grid.__doc__ or "", whole_grid),
                          "the gradients of a sequential scan: replay, then reverse")


def emit(c: CodeBuilder, scan: LinearScan, names: dict, printer_cls, nm: ScanNames):
    """Append `{name}_recurrent_bwd` to `c`; returns its contract and printer (for the helpers
    it used)."""
    tensors = scan.step_tensors
    per_step = {d.name for d in tensors if T in d.dims}
    states = {s.name: s for s in scan.states}
    operand = {read("q", ("i",)): "q", read("k", ("i",)): "k", read("v", ("j",)): "v"}
    inputs = {read(d.name, step_axes(d)): d for d in tensors}
    atoms = set(operand) | set(inputs) | {read(n, s.axes) for n, s in states.items()}
    body = CodeBuilder()
    body.depth = 3
    pr = printer_cls(dict(names), "step")
    taken = symbol_names(*(u.expr for u in scan.updates), scan.output)
    adj = Adjoint(body, pr, atoms, taken)
    size = {n: {("i", "j"): "BK * BV", ("i",): "BK", ("j",): "BV", (): "1"}[s.axes]
            for n, s in states.items()}
    offs = {n: {("i", "j"): "offs_i[:, None] * BV + tl.arange(0, BV)[None, :]",
                ("i",): "offs_i[:, None]", ("j",): "tl.arange(0, BV)[None, :]",
                (): "tl.zeros([1, 1], tl.int32)"}[s.axes] for n, s in states.items()}

    def slot(kind: str, n: str, index: str) -> str:
        return (f"{kind}_{nm(n)} + (prog * {'NSEG' if kind == 'ck' else 'SEG'} + {index}) "
                f"* {size[n]}")

    # the reverse step, into `body`: recompute, output VJP, statement VJPs, per-step grads
    seen = {n: f"old_{nm(n)}" for n in states}
    for u in scan.updates:
        for n in states:
            pr.names[read(n, states[n].axes)] = seen[n]
        body(f"new_{nm(u.state)} = tl.where({_STATE_MASK[states[u.state].axes]}, "
             f"{pr(u.expr)}, 0.0)")
        seen[u.state] = f"new_{nm(u.state)}"
    for n in states:
        pr.names[read(n, states[n].axes)] = seen[n]
    lam_o = fresh_symbol("lam_o", taken)
    pr.names[lam_o] = "lam_o"
    adj.vjp(scan.output, lam_o, ("j",))
    lam = {n: fresh_symbol(f"lam_{n}", taken) for n in states}
    for n in states:
        pr.names[lam[n]] = f"lam_{nm(n)}"
    for n in states:  # the output read the new values
        got = adj.take(read(n, states[n].axes))
        if got:
            body(f"lam_{nm(n)} = lam_{nm(n)} + {got}")
    order = list(scan.updates)
    for pos in range(len(order) - 1, -1, -1):
        u = order[pos]
        before = {x.state for x in order[:pos]}
        for n in states:
            pr.names[read(n, states[n].axes)] = (f"new_{nm(n)}" if n in before
                                                 else f"old_{nm(n)}")
        adj.vjp(u.expr, lam[u.state], states[u.state].axes)
        own = adj.take(read(u.state, states[u.state].axes))
        body(f"lam_{nm(u.state)} = tl.where({_STATE_MASK[states[u.state].axes]}, "
             f"{own or '0.0'}, 0.0)")
        for n in states:
            if n == u.state:
                continue
            got = adj.take(read(n, states[n].axes))
            if got:
                body(f"lam_{nm(n)} = tl.where({_STATE_MASK[states[n].axes]}, "
                     f"lam_{nm(n)} + {got}, 0.0)")
    for atom, x in operand.items():
        got = adj.take(atom)
        if got:
            feature: tuple[str, ...] = ("i",) if x != "v" else ("j",)
            offs_, size_ = ("offs_i", "DK") if x != "v" else ("offs_j", "DV")
            body(f"tl.store(d{x} + ((bb * H + hh).to(tl.int64) * T + row) * {size_} + {offs_}, "
                 f"{_vector(feature, _shaped(feature, got))}, mask={offs_} < {size_})")
    for atom, d in inputs.items():
        got = adj.take(atom)
        if not got:
            continue
        axes = step_axes(d)
        if d.name in per_step:
            body(_grad_store(d, axes, _shaped(axes, got), "row", nm))
        else:
            body(f"acc_{nm(d.name)} = acc_{nm(d.name)} + {_place(axes, _shaped(axes, got))}")
    assert not adj.acc, f"unplaced gradients: {sorted(map(str, adj.acc))}"

    used_consts = [d for d in tensors if d.name not in per_step]
    bwd = backward_contract(scan, nm)
    c("@triton.jit")
    c.call(f"def {bwd.entry}(", [p.declaration for p in bwd.params], "):")
    with c.indented():
        _program_prologue(c)
        c("prog = (n * H + hh).to(tl.int64)")
        for d in used_consts:
            c(f"x_{nm(d.name)}_t = {_step_load(d, 'bos', nm)}")
            c(f"acc_{nm(d.name)} = tl.zeros([BK, BV], tl.float32)")
        for n, s in states.items():
            c(f"st_{nm(n)} = tl.zeros({_STATE_SHAPE[s.axes]}, tl.float32)")
            with c.block("if HAS_INIT:"):
                c(f"st_{nm(n)} = tl.load(init_{nm(n)} + prog * {size[n]} + {offs[n]})")
        with c.block("for tt in range(0, seq_len):"):
            with c.block("if tt % SEG == 0:"):
                for n in states:
                    c(f"tl.store({slot('ck', n, 'tt // SEG')} + {offs[n]}, st_{nm(n)})")
            _forward_step(c, scan, pr, nm)
        for n, s in states.items():
            c(f"lam_{nm(n)} = tl.load(dfinal_{nm(n)} + prog * {size[n]} + {offs[n]})")
        c("n_seg = tl.cdiv(seq_len, SEG)")
        with c.block("for it in range(0, n_seg):"):
            c("sg = n_seg - 1 - it")
            c("start = sg * SEG")
            c("stop = tl.minimum(seq_len, start + SEG)")
            for n in states:
                c(f"st_{nm(n)} = tl.load({slot('ck', n, 'sg')} + {offs[n]})")
            with c.block("for tt in range(start, stop):"):
                for n in states:
                    c(f"tl.store({slot('sc', n, 'tt - start')} + {offs[n]}, st_{nm(n)})")
                _forward_step(c, scan, pr, nm)
            with c.block("for back in range(0, stop - start):"):
                c("tt = stop - 1 - back")
                c("row = bos + tt")
                c("t_i = tt + tl.zeros([1, 1], tl.int64)")
                for n in states:
                    c(f"old_{nm(n)} = tl.load({slot('sc', n, 'tt - start')} + {offs[n]})")
                emit_step_loads(c, scan, _everything(scan), nm)
                c("lam_o = tl.load(do + bb * sdo_b + hh * sdo_h + row * sdo_t + offs_j, "
                  "mask=mask_j, other=0.0).to(tl.float32)[None, :]")
                c.lines.extend(body.lines)
        for n in states:
            c(f"tl.store(dinit_{nm(n)} + prog * {size[n]} + {offs[n]}, lam_{nm(n)})")
        for d in used_consts:
            c(f"tl.store(dx_{nm(d.name)} + prog * BK * BV + "
              "offs_i[:, None] * BV + tl.arange(0, BV)[None, :], "
              f"acc_{nm(d.name)} + tl.zeros([BK, BV], tl.float32))")
    c()
    return bwd, pr


def _shaped(axes, got: str) -> str:
    """A contribution as a tile of exactly its atom's shape, zero in the padding."""
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


def _grad_store(d, axes, tile: str, time: str, nm: ScanNames) -> str:
    off = _decl_offset(d, time, {DK: "offs_i", DV: "offs_j"}, nm)
    mask = {("i",): ", mask=mask_i", ("j",): ", mask=mask_j"}.get(axes, "")
    return f"tl.store(dx_{nm(d.name)} + {off}, {_vector(axes, tile)}{mask})"


def _everything(scan: LinearScan) -> set[str]:
    """What the backward loads per step: every operand and per-step input."""
    return {"q", "k", "v"} | {d.name for d in scan.step_tensors}


def _forward_step(c: CodeBuilder, scan: LinearScan, pr, nm: ScanNames) -> None:
    """One forward step on the st_* registers (the printer's state names are switched to them
    and back)."""
    saved = {read(s.name, s.axes): pr.names[read(s.name, s.axes)] for s in scan.states}
    for s in scan.states:
        pr.names[read(s.name, s.axes)] = f"st_{nm(s.name)}"
    c("row = bos + tt")
    c("t_i = tt + tl.zeros([1, 1], tl.int64)")
    emit_step_loads(c, scan, _everything(scan), nm)
    for u in scan.updates:
        s = scan.state(u.state)
        c(f"st_{nm(s.name)} = tl.where({_STATE_MASK[s.axes]}, {pr(u.expr)}, 0.0)")
    pr.names.update(saved)
