"""Generate the Triton source of a CascadePlan: one kernel per stage, forward and backward.

A stage kernel's program owns a tile of the parallel rank P (BLOCK_P rows) of one (b, h) and
walks the loop rank L in tiles of BLOCK_L. Every value lives at a layout, the axes among
(P, L, E, F) its ranks give, and a read broadcasts it into the layout of the expression that
reads it (`x[:, None]`, `x[None, :]`). The program:

    load what is indexed by P (or nothing) from memory; the nodes that need no loop result
    for each L tile in the stage's order:
        load what is indexed by L; the [P, L] / [L] / [L, e|f] nodes in cascade order;
        a max over L updates its running value (and the rescale factor of the sums it
        stabilizes), a sum over L adds the tile's visible part (a [P, e|f] sum is a dot with
        the [L, e|f] operand), a scan adds its carry to the scan inside the tile
    the nodes that read the loop's results; store the stage's writes (and the per-row partial
    sums of param gradients)

Visible pairs: inside the tile (p < size of P, l < size of L) and inside the cascade's mask;
reductions and scans leave the others out. All arithmetic is fp32; dot products go through the
prelude's `_dot` (IEEE / UPCAST constexprs as in the softmax kernels). Names the spec chose are
placeholders until `generate` spells them (backends/triton/names.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
import triton

from attnc.backends.triton.contract import (Bind, GeneratedModule, GridRule, KernelContract, Param,
                                            ParamType, arg)
from attnc.backends.triton.names import UserNames, choose
from attnc.backends.triton.prelude import module_head
from attnc.backends.triton.printer import TritonPrinter
from attnc.backends.triton.source import CodeBuilder
from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.cascade import Einsum, Order, Reduce, ScatterSum, TensorKind, exprs_of
from attnc.ir.kernel import Load
from attnc.ir.stage_kernel import CascadePlan, StageKernel

INT, PTR, DATA = ParamType.INT, ParamType.FP32_PTR, ParamType.DATA
CONSTEXPRS = ("BLOCK_P", "BLOCK_L", "BLOCK_D", "BLOCK_DV", "IEEE", "UPCAST", "LOWP", "SAVE")
# Dot products take their operands in the call's dtype (LOWP: 0 fp32, 1 bf16, 2 fp16), as
# FlashAttention's do; everything else is fp32.
LOWP_HELPER = '''@triton.jit
def _attnc_lowp(x, LOWP: tl.constexpr):
    """x in the dtype dot products take: the call's (bf16, fp16) or fp32."""
    if LOWP == 1:
        y = x.to(tl.bfloat16)
    elif LOWP == 2:
        y = x.to(tl.float16)
    else:
        y = x
    return y
'''
LOWP = {"float32": 0, "bfloat16": 1, "float16": 2}
# tensors the caller passes in its own dtype (everything else a stage reads is fp32)
CALLER_DTYPE = {"Q", "K", "V", "dO"}
KV_HEADS = {"K", "V"}  # read at the kv head of a GQA group
_AXIS = {"e": "E", "f": "F"}
_SIZE = {"m": "M", "n": "N", "E": "D", "F": "DV"}
_OFFS = {"P": "offs_p", "L": "offs_l", "E": "offs_e", "F": "offs_f"}


class PlanNames:
    """How the generated code spells the spec's names (placeholders in a draft)."""

    def __init__(self, p: CascadePlan, spelled: Mapping[str, str] | None = None):
        tensors = [d.name for d in p.decls + p.backward_decls]
        for sk in p.forward + p.backward:
            tensors += [nd.name for nd in sk.nodes]
        self.users = UserNames([p.name] + list(dict.fromkeys(tensors)), spelled)
        self.spec = self.users.of(p.name)

    def of(self, name: str) -> str:
        return self.users.of(name)

    def entry(self, backward: bool, index: int) -> str:
        return f"attnc_{self.spec}_{'b' if backward else 'k'}{index + 1}"


def role(backward: bool, index: int) -> str:
    return f"{'backward' if backward else 'forward'}{index + 1}"


def stage_grid(v) -> tuple[int, int]:
    """One program per (tile of the parallel rank, b * h)."""
    return triton.cdiv(v["P_SIZE"], v["BLOCK_P"]), v["B"] * v["H"]


def buffers(sk: StageKernel) -> list[tuple[str, int]]:
    """(param gradient, term) of each per-row partial-sum buffer the stage writes."""
    return [(nd.name, j) for nd in sk.nodes if isinstance(nd, ScatterSum)
            for j in range(len(nd.terms))]


def _strides(name: str, count: int, nm: PlanNames) -> list[Param]:
    return [Param(f"{nm.of(name)}_s{i}", INT, Bind("stride", name, i)) for i in range(count)]


def stage_contract(p: CascadePlan, sk: StageKernel, backward: bool, nm: PlanNames
                   ) -> KernelContract:
    """Pointers (memory, params/inputs, writes, partial sums), their strides, sizes, scale,
    then the constexprs."""
    decls = {d.name: d for d in p.inputs}
    loaded = list(dict.fromkeys(ld.tensor for ld in sk.loads))
    params: list[Param] = []
    for name, _ in sk.memory:
        params.append(Param(nm.of(name), DATA if name in CALLER_DTYPE or _saved_role(p, name)
                            == "dO" else PTR, Bind("tensor", name)))
    for name in loaded:
        kind = decls[name].kind
        params.append(Param(nm.of(name), PTR if kind is TensorKind.PARAM
                            else ParamType.INDEX_PTR, Bind("tensor", name)))
    params += [Param(nm.of(name), PTR, Bind("tensor", name)) for name, _ in sk.writes]
    params += [Param(f"D_{nm.of(name)}_{j}", PTR, Bind("buffer", name, j))
               for name, j in buffers(sk)]
    carries = sk.stage.checkpoints + sk.stage.resumes
    params += [Param(f"CK_{nm.of(name)}", PTR, Bind("checkpoint", name)) for name in carries]
    for name, ranks in sk.memory + sk.writes:
        params += _strides(name, 2 + len(ranks), nm)
    params += [Param(f"CK_{nm.of(name)}_s{i}", INT, Bind("cstride", name, i))
               for name in carries for i in range(4)]
    for name in loaded:
        params += _strides(name, len(decls[name].dims), nm)
    params += [arg(x, INT) for x in ("B", "H", "M", "N", "D", "DV", "GROUP", "P_SIZE")]
    params += [arg("scale", ParamType.FLOAT)] + [arg(x, ParamType.CONSTEXPR) for x in CONSTEXPRS]
    walk = f", loop over {sk.loop}" if sk.loop else ""
    return KernelContract(role(backward, sk.index), nm.entry(backward, sk.index), tuple(params),
                          GridRule(stage_grid.__doc__ or "", stage_grid),
                          f"stage {sk.index + 1}: {sk.parallel} tiles{walk}")


def _saved_role(p: CascadePlan, name: str) -> str | None:
    return dict(p.saved).get(name)


class _Stage:
    """The code of one stage kernel: layouts of its values and their printed reads."""

    def __init__(self, p: CascadePlan, sk: StageKernel, nm: PlanNames, backward: bool):
        self.p, self.sk, self.nm, self.backward = p, sk, nm, backward
        self.P, self.L = sk.parallel, sk.loop
        self.helpers: set[str] = set()
        # every value: (variable, layout)
        self.values: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.loads: dict[sympy.Indexed, Load] = {}
        for nd in sk.nodes:
            for ex in exprs_of(nd):
                for acc in sympy.sympify(ex).atoms(sympy.Indexed):
                    ld = next((x for x in sk.loads if x.tensor == str(acc.base)
                               and x.index == tuple(acc.indices)), None)
                    if ld is not None:
                        self.loads[acc] = ld

    # --- layouts ---------------------------------------------------------------------------
    def axis(self, rank: str) -> str:
        if rank == self.P:
            return "P"
        if rank == self.L:
            return "L"
        if rank in _AXIS:
            return _AXIS[rank]
        raise CompileError(f"{self.p.name}: kernel {self.sk.index + 1} iterates {rank}, "
                           f"which is neither its parallel rank {self.P} nor its loop rank")

    def layout(self, ranks) -> tuple[str, ...]:
        axes = {self.axis(r) for r in ranks}
        return tuple(a for a in ("P", "L", "E", "F") if a in axes)

    def size(self, axis: str) -> str:
        rank = {"P": self.P, "L": self.L}.get(axis, axis)
        assert rank is not None
        return _SIZE[rank]

    @staticmethod
    def ref(var: str, layout: tuple[str, ...], ctx: tuple[str, ...]) -> str:
        """`var` (laid out as `layout`) read inside an expression laid out as `ctx`."""
        if layout == ctx or not layout:
            return var
        if not set(layout) <= set(ctx):
            raise ValueError(f"{var} {layout} in {ctx}")
        return var + "[" + ", ".join(":" if a in layout else "None" for a in ctx) + "]"

    def load_layout(self, ld: Load) -> tuple[str, ...]:
        free = set().union(*(sympy.sympify(i).free_symbols for i in ld.index)) if ld.index \
            else set()
        return self.layout(r for r in ("m", "n", "e", "f") if S.RANKS[r] in free
                           and (r in (self.P, self.L)))

    def printer(self, ctx: tuple[str, ...]) -> TritonPrinter:
        names: dict = {S.b: "b", S.h: "h", S.B: "B", S.H: "H", S.M: "M", S.N: "N",
                       S.scale: "scale", S.m_lo: "p_lo", S.m_hi: "p_hi", S.n_lo: "p_lo",
                       S.n_hi: "p_hi"}
        tiled = set()
        for rank in ("m", "n", "e", "f"):
            if rank in (self.P, self.L) or rank in _AXIS:
                ax = self.axis(rank)
                if ax in ctx:
                    names[S.RANKS[rank]] = self.ref(_OFFS[ax], (ax,), ctx)
                    tiled.add(S.RANKS[rank])
        for acc, ld in self.loads.items():
            lay = self.load_layout(ld)
            if set(lay) <= set(ctx):
                names[acc] = self.ref(f"{self.nm.of(ld.tensor)}_{ld.ordinal}", lay, ctx)
                if lay:
                    tiled.add(acc)
        for name, (var, lay) in self.values.items():
            ranks = self.ranks_of(name)
            if set(lay) <= set(ctx):
                acc = S.at(name, *ranks) if ranks else sympy.Symbol(name)
                names[acc] = self.ref(var, lay, ctx)
                if lay:
                    tiled.add(acc)
        pr = TritonPrinter(names, frozenset(tiled))
        return pr

    def uses(self, ex, axis: str) -> bool:
        """Whether `ex` varies along `axis` (P or L): through the rank's symbol, a load or a
        value laid out along it."""
        rank = self.P if axis == "P" else self.L
        ex = sympy.sympify(ex)
        if rank is not None and ex.has(S.RANKS[rank]):
            return True
        for acc in ex.atoms(sympy.Indexed):
            ld = self.loads.get(acc)
            lay = self.load_layout(ld) if ld is not None else self.layout(
                self.ranks_of(str(acc.base)))
            if axis in lay:
                return True
        return False

    def ranks_of(self, name: str) -> tuple[str, ...]:
        for t, ranks in self.sk.memory + self.sk.writes:
            if t == name:
                return ranks
        for nd in self.sk.nodes:
            if nd.name == name and isinstance(nd, Einsum):
                return nd.ranks
        raise KeyError(name)

    def print(self, ex, ctx: tuple[str, ...], value: bool = True) -> str:
        """`ex` printed inside an expression laid out as `ctx`; a `value` is a float tensor of
        that layout (a constant is broadcast, an integer or a condition converted)."""
        pr = self.printer(ctx)
        try:
            text = pr(ex)
        except NotImplementedError as err:
            raise CompileError(f"{self.p.name}: {err}") from None
        self.helpers |= pr.helpers
        if not value:
            return text
        shaped = any(a in pr.tiled for a in sympy.sympify(ex).atoms(sympy.Symbol, sympy.Indexed))
        if ctx and not shaped:
            dims = ", ".join(f"BLOCK_{'P' if a == 'P' else 'L' if a == 'L' else _block(a)}"
                             for a in ctx)
            text = f"({text} + tl.zeros([{dims}], tl.float32))"
        if sympy.sympify(ex).is_integer or isinstance(ex, sympy.logic.boolalg.Boolean):
            text = f"({text}).to(tl.float32)"
        return text

    # --- memory ----------------------------------------------------------------------------
    def address(self, name: str, ranks: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]]:
        """(pointer expression, bounds mask, layout) of a whole-tensor read or write."""
        t = self.nm.of(name)
        head = "hk" if name in KV_HEADS else "h"
        lay = self.layout(ranks)
        parts = [t, f"b.to(tl.int64) * {t}_s0", f"{head} * {t}_s1"]
        masks = []
        for i, r in enumerate(ranks):
            ax = self.axis(r)
            offs = self.ref(_OFFS[ax], (ax,), lay)
            parts.append(f"{offs} * {t}_s{2 + i}")
            masks.append(f"({offs} < {self.size(ax)})")
        return " + ".join(parts), " & ".join(masks) or "True", lay

    def emit_read(self, c: CodeBuilder, name: str, ranks: tuple[str, ...]) -> None:
        addr, mask, lay = self.address(name, ranks)
        var = f"x_{self.nm.of(name)}"
        c.call(f"{var} = tl.load(", [addr, f"mask={mask}", "other=0.0"], ").to(tl.float32)")
        self.values[name] = (var, lay)

    def emit_load(self, c: CodeBuilder, ld: Load) -> None:
        decl = next(d for d in self.p.inputs if d.name == ld.tensor)
        lay = self.load_layout(ld)
        pr = self.printer(lay)
        idx = [pr(i) for i in ld.index]
        self.helpers |= pr.helpers
        t = self.nm.of(ld.tensor)
        addr = " + ".join([t] + [f"{i} * {t}_s{j}" for j, i in enumerate(idx)])
        # Dims indexed by m or n are bounds-checked (padding rows and keys reach past them);
        # dims indexed by b and h alone are validated at call time (attnc.runtime), except in a
        # scalar load: Triton's interpreter rejects a mask mixing scalars and tensors.
        checks = [f"({i} >= 0) & ({i} < {pr(d)})" for i, d, ix in zip(idx, decl.dims, ld.index)
                  if not lay or sympy.sympify(ix).has(S.m, S.n)]
        self.helpers |= pr.helpers
        cast = ".to(tl.float32)" if decl.kind is TensorKind.PARAM else ""
        c.call(f"{t}_{ld.ordinal} = tl.load(",
               [addr, f"mask={' & '.join(checks) or 'True'}", "other=0"], f"){cast}")


def _dot(a: str, b: str) -> str:
    return f"_dot(_attnc_lowp({a}, LOWP), _attnc_lowp({b}, LOWP), IEEE, UPCAST)"


def _block(axis: str) -> str:
    return {"E": "D", "F": "DV"}[axis]


def generate(p: CascadePlan, header: str = "") -> GeneratedModule:
    draft = PlanNames(p)
    spelled = choose(_generate(p, header, draft).source, draft.users)
    return _generate(p, header, PlanNames(p, spelled))


def contracts(p: CascadePlan, names: Mapping[str, str]) -> tuple[KernelContract, ...]:
    nm = PlanNames(p, names)
    return tuple(stage_contract(p, sk, bwd, nm) for bwd, kernels in ((False, p.forward),
                                                                      (True, p.backward))
                 for sk in kernels)


def _generate(p: CascadePlan, header: str, nm: PlanNames) -> GeneratedModule:
    body = CodeBuilder()
    helpers: set[str] = set()
    found = []
    for backward, kernels in ((False, p.forward), (True, p.backward)):
        for sk in kernels:
            st = _Stage(p, sk, nm, backward)
            found.append(_emit(body, st))
            helpers |= st.helpers
            body()
            body()
    return GeneratedModule(module_head(header, helpers, (LOWP_HELPER,)) + body.text(),
                           tuple(found), dict(nm.users.spelled or {}))


def _phases(st: _Stage) -> tuple[list, list, list]:
    """The stage's nodes before, inside and after the loop."""
    pre, loop, post = [], [], []
    after: set[str] = set()  # tensors known only once the loop is done
    for nd in st.sk.nodes:
        if isinstance(nd, ScatterSum) or (st.L is not None and st.L in nd.iteration + nd.over):
            loop.append(nd)
            if isinstance(nd, Einsum) and nd.reduce is not None and not nd.is_scan:
                after.add(nd.name)
        elif any(src in after for ex in exprs_of(nd)
                 for src in {str(a.base) for a in sympy.sympify(ex).atoms(sympy.Indexed)}):
            post.append(nd)
            after.add(nd.name)
        else:
            pre.append(nd)
    return pre, loop, post


def _emit(c: CodeBuilder, st: _Stage) -> KernelContract:
    p, sk, nm = st.p, st.sk, st.nm
    contract = stage_contract(p, sk, st.backward, nm)
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [x.declaration for x in contract.params], "):")
    pre, loop, post = _phases(st)
    with c.indented():
        c(f'"""{nm.spec}: {contract.doc}."""')
        c("pid_p = tl.program_id(0)")
        c("pid_bh = tl.program_id(1)")
        c("b = pid_bh // H")
        c("h = pid_bh % H")
        c("hk = h // GROUP")
        c("p_lo = pid_p * BLOCK_P")
        c("p_hi = tl.minimum(p_lo + BLOCK_P, P_SIZE) - 1")
        c("offs_p = p_lo + tl.arange(0, BLOCK_P)")
        c("offs_e = tl.arange(0, BLOCK_D)")
        c("offs_f = tl.arange(0, BLOCK_DV)")
        for name, ranks in sk.memory:
            if st.L not in ranks:
                st.emit_read(c, name, ranks)
        for ld in sk.loads:
            if "L" not in st.load_layout(ld):
                st.emit_load(c, ld)
        for nd in pre:
            _emit_map(c, st, nd)
        if st.L is not None:
            _emit_loop(c, st, loop)
        for nd in post:
            _emit_map(c, st, nd)
        for nd in sk.nodes:
            if isinstance(nd, ScatterSum):
                _emit_row_terms(c, st, nd)
        for name, ranks in sk.writes:
            addr, mask, lay = st.address(name, ranks)
            var, have = st.values[name]
            if name in sk.saves:  # read by the backward only: skipped when no gradient is due
                with c.block("if SAVE:"):
                    c.call("tl.store(", [addr, st.ref(var, have, lay), f"mask={mask}"])
            else:
                c.call("tl.store(", [addr, st.ref(var, have, lay), f"mask={mask}"])
        for name, j in buffers(sk):
            c(f"tl.store(D_{nm.of(name)}_{j} + pid_bh.to(tl.int64) * P_SIZE + offs_p, "
              f"part_{nm.of(name)}_{j}, mask=offs_p < P_SIZE)")
    return contract


def _emit_row_terms(c: CodeBuilder, st: _Stage, nd: ScatterSum) -> None:
    """A param gradient's terms that do not vary along L: one value per row (or, free of P
    too, one per (b, h), counted by the program holding row 0)."""
    for j, (_, value) in enumerate(nd.terms):
        if st.uses(value, "L"):
            continue
        part = f"part_{st.nm.of(nd.name)}_{j}"
        if st.uses(value, "P"):
            c(f"{part} += tl.where(offs_p < P_SIZE, {st.print(value, ('P',))}, 0.0)")
        else:
            c(f"{part} += tl.where(offs_p == 0, {st.print(value, ('P',))}, 0.0)")


def _emit_map(c: CodeBuilder, st: _Stage, nd) -> None:
    """A node outside the loop: a map, or a reduction over e or f of a [P, e|f] value."""
    if not isinstance(nd, Einsum) or nd.is_scan or (nd.reduce is not None
                                                    and set(nd.over) - {"e", "f"}):
        raise CompileError(f"{st.p.name}: {nd.name} cannot be computed outside the loop of "
                           f"kernel {st.sk.index + 1}", tensor=nd.name)
    var = f"v_{st.nm.of(nd.name)}"
    lay = st.layout(nd.ranks)
    if nd.reduce is None:
        c(f"{var} = {_pad(st, st.print(nd.expr, lay), lay)}")
    else:
        ctx = st.layout(nd.ranks + nd.over)
        c(f"{var} = {_reduce_axes(st, nd, st.print(nd.expr, ctx), ctx, lay)}")
    st.values[nd.name] = (var, lay)


def _pad(st: _Stage, text: str, lay: tuple[str, ...]) -> str:
    """Zero a head-dim value's padding columns, and an [L, e|f] value's padding rows: a dot
    or a sum over them must not see them (0 * inf is nan)."""
    axes: list[str] = [ax for ax in ("E", "F") if ax in lay]
    if axes and "L" in lay:
        axes.append("L")
    for ax in axes:
        text = f"tl.where({st.ref(_OFFS[ax], (ax,), lay)} < {st.size(ax)}, {text}, 0.0)"
    return text


def _reduce_axes(st: _Stage, nd: Einsum, text: str, ctx, lay) -> str:
    """Reduce `text` (laid out as ctx) over the head-dim axes nd reduces, down to `lay`."""
    assert nd.reduce is not None
    for r in nd.over:
        ax = st.axis(r)
        pos = ctx.index(ax)
        valid = st.ref(_OFFS[ax], (ax,), ctx)
        fn = {Reduce.SUM: "tl.sum", Reduce.MAX: "tl.max", Reduce.MIN: "tl.min"}[nd.reduce]
        fill = {Reduce.SUM: "0.0", Reduce.MAX: 'float("-inf")', Reduce.MIN: 'float("inf")'}[
            nd.reduce]
        text = f"{fn}(tl.where({valid} < {st.size(ax)}, {text}, {fill}), {pos})"
        ctx = tuple(a for a in ctx if a != ax)
    assert ctx == lay
    return text


def _dot_factors(st: _Stage, nd: Einsum, r: str):
    """X, Y, c of a q.k-like product sum(r) X[P|L, r] * Y[L|P, r] * c: (P-side access,
    L-side access, the factor free of r)."""
    sym = S.RANKS[r]
    with_r = [f for f in sympy.Mul.make_args(nd.expr) if f.has(sym)]
    rest = sympy.Mul(*[f for f in sympy.Mul.make_args(nd.expr) if not f.has(sym)])
    if len(with_r) == 2 and all(isinstance(f, sympy.Indexed) for f in with_r):
        sides = {st.layout(st.ranks_of(str(f.base)))[0]: f for f in with_r}
        if set(sides) == {"P", "L"}:
            return sides["P"], sides["L"], rest
    raise CompileError(f"{st.p.name}: {nd.name} sums over {r} something other than a product "
                       f"X[m, {r}]*Y[n, {r}] (times a factor free of {r}): {nd.expr}",
                       tensor=nd.name)


def _emit_loop(c: CodeBuilder, st: _Stage, loop: list) -> None:
    sk, nm = st.sk, st.nm
    tile = ("P", "L")
    stabilized: dict[str, list[str]] = {}
    for nd in loop:
        if isinstance(nd, Einsum) and nd.stabilizer:
            stabilized.setdefault(nd.stabilizer, []).append(nd.name)
    # accumulators and carries
    for nd in loop:
        if isinstance(nd, ScatterSum):
            for j in range(len(nd.terms)):
                c(f"part_{nm.of(nd.name)}_{j} = tl.zeros([BLOCK_P], tl.float32)")
        elif nd.is_scan and nd.over == (st.L,):
            c(f"carry_{nm.of(nd.name)} = tl.zeros([BLOCK_P], tl.float32)")
        elif nd.reduce is not None and st.L in nd.over:
            lay = st.layout(nd.ranks)
            dims = ", ".join("BLOCK_P" if a == "P" else f"BLOCK_{_block(a)}" for a in lay)
            init = {Reduce.SUM: "tl.zeros", Reduce.MAX: "tl.full", Reduce.MIN: "tl.full"}[
                nd.reduce]
            fill = {Reduce.SUM: "", Reduce.MAX: ', float("-inf")', Reduce.MIN: ', float("inf")'}[
                nd.reduce]
            c(f"v_{nm.of(nd.name)} = {init}([{dims}]{fill}, tl.float32)")
            st.values[nd.name] = (f"v_{nm.of(nd.name)}", lay)
    bound = st.printer(())
    L_SIZE = st.size("L")
    if sk.segments:
        lo = sympy.Min(*(s.lo for s in sk.segments))
        hi = sympy.Max(*(s.hi for s in sk.segments))
        c(f"lo = tl.maximum({bound(lo)}, 0)")
        c(f"hi = tl.minimum({bound(hi)}, {L_SIZE})")
        st.helpers |= bound.helpers
    else:
        c("lo = 0")
        c(f"hi = {L_SIZE}")
    c("start = lo // BLOCK_L * BLOCK_L")
    c("tiles = (hi - start + BLOCK_L - 1) // BLOCK_L")
    with c.block("for it in range(0, tiles):"):
        if sk.stage.order is Order.DESCENDING:
            c("start_l = start + (tiles - 1 - it) * BLOCK_L")
        else:
            c("start_l = start + it * BLOCK_L")
        c("offs_l = start_l + tl.arange(0, BLOCK_L)")
        mask = f" & {st.print(sk.mask, tile, value=False)}" if sk.mask is not None else ""
        c(f"vis = (offs_p[:, None] < P_SIZE) & (offs_l[None, :] < {L_SIZE}){mask}")
        for name, ranks in sk.memory:
            if st.L in ranks:
                st.emit_read(c, name, ranks)
        for ld in sk.loads:
            if "L" in st.load_layout(ld):
                st.emit_load(c, ld)
        rounded = _dot_weights(st, loop)
        for nd in loop:
            _emit_loop_node(c, st, nd, stabilized, rounded)
    for name in stabilized:  # after the loop, a max is its final value again
        st.values[name] = (f"v_{st.nm.of(name)}", st.values[name][1])


def _weighted(st: _Stage, nd: Einsum) -> tuple[sympy.Expr, sympy.Indexed]:
    """(g, Y) of a [P, e|f] sum over L of g[P, L] * Y[L, e|f]."""
    lay = st.layout(nd.ranks)
    r = "e" if lay[1] == "E" else "f"
    sym = S.RANKS[r]
    ys = [f for f in sympy.Mul.make_args(nd.expr) if f.has(sym)]
    if len(ys) != 1 or not isinstance(ys[0], sympy.Indexed) or \
            st.layout(st.ranks_of(str(ys[0].base))) != ("L", lay[1]):
        raise CompileError(f"{st.p.name}: {nd.name} must be a sum over {st.L} of "
                           f"a weight times an [{st.L}, {r}] tensor, got {nd.expr}",
                           tensor=nd.name)
    return sympy.Mul(*[f for f in sympy.Mul.make_args(nd.expr) if not f.has(sym)]), ys[0]


def _dot_weights(st: _Stage, loop: list) -> set:
    """The weights g of the stage's [P, e|f] sums (the dots round them to the call's dtype)."""
    return {_weighted(st, nd)[0] for nd in loop
            if isinstance(nd, Einsum) and nd.reduce is Reduce.SUM and st.L in nd.over
            and len(st.layout(nd.ranks)) == 2}


def _emit_loop_node(c: CodeBuilder, st: _Stage, nd, stabilized, rounded) -> None:
    nm = st.nm
    tile = ("P", "L")
    if isinstance(nd, ScatterSum):
        for j, (_, value) in enumerate(nd.terms):
            if st.uses(value, "L"):  # a per-row term is added once, after the loop
                c(f"part_{nm.of(nd.name)}_{j} += tl.sum(tl.where(vis, "
                  f"{st.print(value, tile)}, 0.0), 1)")
        return
    var = f"v_{nm.of(nd.name)}"
    name = nm.of(nd.name)
    lay = st.layout(nd.ranks)
    if nd.is_scan:
        x = f"tl.where(vis, {st.print(nd.expr, tile)}, 0.0)"
        reverse = ", reverse=True" if nd.reduce is Reduce.RCUMSUM else ""
        c(f"w_{name} = {x}")
        ck = f"CK_{name}"
        if nd.over == (st.P,):  # resumed: the carry before this program's tile, per row
            c.call(f"ck_{name} = tl.load(", [
                f"{ck} + b.to(tl.int64) * {ck}_s0 + h * {ck}_s1 + offs_l * {ck}_s2 + pid_p * "
                f"{ck}_s3", f"mask=offs_l < {st.size('L')}", "other=0.0"], ")")
            c(f"{var} = ck_{name}[None, :] + tl.cumsum(w_{name}, 0{reverse})")
        else:
            if nd.name in st.sk.stage.checkpoints:  # the carry before this tile, for later
                c.call("tl.store(", [
                    f"{ck} + b.to(tl.int64) * {ck}_s0 + h * {ck}_s1 + offs_p * {ck}_s2 + "
                    f"(start_l // BLOCK_L) * {ck}_s3", f"carry_{name}", "mask=offs_p < P_SIZE"])
            c(f"{var} = carry_{name}[:, None] + tl.cumsum(w_{name}, 1{reverse})")
            c(f"carry_{name} += tl.sum(w_{name}, 1)")
        st.values[nd.name] = (var, tile)
        return
    if nd.reduce is None:
        c(f"{var} = {_pad(st, st.print(nd.expr, lay), lay)}")
        st.values[nd.name] = (var, lay)
        return
    if st.L not in nd.over:  # a dot product over e or f: a [P, L] tile
        if lay != tile or len(nd.over) != 1:
            ctx = st.layout(nd.ranks + nd.over)
            c(f"{var} = {_reduce_axes(st, nd, st.print(nd.expr, ctx), ctx, lay)}")
        else:
            x, y, rest = _dot_factors(st, nd, nd.over[0])
            px = st.print(x, st.layout(st.ranks_of(str(x.base))))
            py = st.print(y, st.layout(st.ranks_of(str(y.base))))
            factor = "" if rest == 1 else f" * {st.print(rest, tile)}"
            c(f"{var} = {_dot(px, f'tl.trans({py})')}{factor}")
        st.values[nd.name] = (var, lay)
        return
    # a reduction over L: update the accumulator
    if lay == ("P",):
        ctx = tile
        x = st.print(nd.expr, ctx)
        if nd.reduce is Reduce.SUM:
            if nd.expr in rounded:
                # the same weights as a dot of this stage: summed as the dot rounds them, so
                # that sums of a row agree exactly (a standardized row of one key is 0)
                x = f"_attnc_lowp({x}, LOWP).to(tl.float32)"
            step = f"tl.sum(tl.where(vis, {x}, 0.0), 1)"
        else:
            fill = 'float("-inf")' if nd.reduce is Reduce.MAX else 'float("inf")'
            fn = "tl.max" if nd.reduce is Reduce.MAX else "tl.min"
            step = f"{fn}(tl.where(vis, {x}, {fill}), 1)"
    elif len(lay) == 2 and lay[0] == "P" and nd.reduce is Reduce.SUM:
        g, y = _weighted(st, nd)
        gy = st.print(y, ("L", lay[1]))
        step = _dot(f"tl.where(vis, {st.print(g, tile)}, 0.0)", gy)
    else:
        raise CompileError(f"{st.p.name}: {nd.name} reduces over {st.L} to ranks {nd.ranks}, "
                           "which a stage kernel cannot hold", tensor=nd.name)
    if nd.reduce is Reduce.SUM:
        if nd.stabilizer:
            alpha = f"a_{nm.of(nd.stabilizer)}" + ("[:, None]" if len(lay) == 2 else "")
            c(f"{var} = {var} * {alpha} + {step}")
        else:
            c(f"{var} += {step}")
    else:
        fn = "tl.maximum" if nd.reduce is Reduce.MAX else "tl.minimum"
        if nd.name in stabilized:
            c(f"old_{name} = {var}")
        c(f"{var} = {fn}({var}, {step})")
        if nd.name in stabilized:
            # inside the loop the sums it stabilizes read it as 0 while no key was visible
            # (their terms are all left out then), so no -inf - -inf is ever computed; the
            # accumulators, still 0, take any factor
            c(f"s_{name} = tl.where({var} == float(\"-inf\"), 0.0, {var})")
            c(f"a_{name} = tl.exp(old_{name} - s_{name})")
            st.values[nd.name] = (f"s_{name}", lay)
