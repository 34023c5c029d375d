"""Generate the Triton source of an AttentionKernel's forward (and, with a Gradient, its
backward: backends/triton/softmax/backward.py) as one module with its kernels' contracts.

The source is built statement by statement with a CodeBuilder (no template with holes): a
header, the prelude and the helpers the expressions need, a key-tile step function (`MASKED` and
`EDGE` are constexprs, so full tiles compile without the mask and only the tile that reaches
past N bounds-checks its keys), and the program that walks the key segments (or, for a
block-sparse kernel, the key blocks its block mask lists). The online softmax runs in base 2:
exp2 with log2(e) folded into one multiplier, and for a score q·k * c (c one value per program,
the scale) c too, with each row's max taken on raw q·k; the running max is in base-2 units and
the stored lse is a natural logarithm. A kernel with an Around (attnc.ir.around: prologues,
several dots, a value alias, a gate, a kv-head map) loads each operand tile through
prologue.py's emitters, sums its dots into qk, reads its K/V head from the head map and gates
its output at the store; a plain kernel's text is unchanged by any of it. The text depends
only on the kernel IR, so it is shared by every dtype and device; dtype-dependent choices are
constexprs picked at launch. Names the spec chose are placeholders until `generate` spells
them out (backends/triton/names.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext

import sympy
import triton

from attnc.backends.triton.contract import (Bind, GeneratedModule, GridRule, KernelContract, Param,
                                            ParamType, arg)
from attnc.backends.triton.names import UserNames, choose
from attnc.backends.triton.prelude import module_head
from attnc.backends.triton.printer import TritonPrinter
from attnc.backends.triton.softmax import prologue as P
from attnc.backends.triton.softmax.scores import LN2, LOG2E, row_factor
from attnc.backends.triton.source import CodeBuilder
from attnc.expr import symbols as S
from attnc.ir.around import Around, Side
from attnc.ir.cascade import TensorKind
from attnc.ir.kernel import AttentionKernel, Load, LoadLevel

TILE_NAMES = {S.m: "offs_m[:, None]", S.n: "offs_n[None, :]", S.qk: "qk"}
INT, PTR = ParamType.INT, ParamType.FP32_PTR


class KernelNames:
    """How the generated code spells what the spec named (placeholders in a draft, else as
    `spelled`): the spec's name, its tensors and their strides, loads and the backward's
    partial-sum buffers and accumulators."""

    def __init__(self, k: AttentionKernel, spelled: Mapping[str, str] | None = None):
        self.users = UserNames([k.name] + [d.name for d in k.inputs]
                               + [o.name for o in k.around.operands], spelled)
        self.spec = self.users.of(k.name)

    def tensor(self, name: str) -> str:
        return self.users.of(name)

    def stride(self, name: str, dim: int) -> str:
        return f"{self.users.of(name)}_s{dim}"

    def load(self, ld: Load) -> str:
        return f"{self.users.of(ld.tensor)}_{ld.ordinal}"

    def buffer(self, ld: Load) -> str:
        return f"D_{self.load(ld)}"

    def acc(self, ld: Load) -> str:
        return f"dacc_{self.load(ld)}"

    def entry(self, role: str) -> str:
        return {"forward": f"attnc_{self.spec}_fwd", "step": f"_attnc_{self.spec}_step",
                "dq": f"attnc_{self.spec}_bwd_dq", "dkdv": f"attnc_{self.spec}_bwd_dkdv",
                "dq_step": f"_attnc_{self.spec}_bwd_dq_step",
                "dkdv_step": f"_attnc_{self.spec}_bwd_dkdv_step"}[role]


def tensor_params(k: AttentionKernel, nm: KernelNames) -> list[Param]:
    """The spec's params and inputs: fp32 params, integer inputs."""
    return [Param(nm.tensor(d.name), PTR if d.kind is TensorKind.PARAM else ParamType.INDEX_PTR,
                  Bind("tensor", d.name)) for d in k.inputs]


def stride_params(k: AttentionKernel, nm: KernelNames) -> list[Param]:
    return [Param(nm.stride(d.name, i), INT, Bind("stride", d.name, i))
            for d in k.inputs for i in range(len(d.dims))]


def strides(prefix: str, tensors: str) -> list[Param]:
    """stride_<t><r> of operand-like tensors: q/do/dq/o laid out bhmd, k/v/dk/dv bhnd."""
    return [arg(f"{prefix}{t}{r}", INT) for t in tensors.split()
            for r in ("bhmd" if t in ("q", "o", "do", "dq") else "bhnd")]


def load_stmt(ld: Load, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> str:
    decl = next(d for d in k.inputs if d.name == ld.tensor)
    idx = [pr(i) for i in ld.index]
    addr = " + ".join([nm.tensor(ld.tensor)] + [f"{i} * {nm.stride(ld.tensor, j)}"
                                                 for j, i in enumerate(idx)])
    # Padding rows/keys may index out of range, so dims indexed by m or n are bounds-checked.
    # Dims indexed by b and h alone are validated at call time (attnc.runtime); checking them
    # here would mix scalar and tensor masks, which Triton's interpreter rejects.
    checks = [f"({i} >= 0) & ({i} < {pr(d)})" for i, d, ix in zip(idx, decl.dims, ld.index)
              if ld.level is LoadLevel.PROGRAM or ix.has(S.m) or ix.has(S.n)]
    mask = f", mask={' & '.join(checks)}, other=0" if checks else ""
    cast = ".to(tl.float32)" if decl.kind is TensorKind.PARAM else ""
    return f"{nm.load(ld)} = tl.load({addr}{mask}){cast}"


def printer(k: AttentionKernel, nm: KernelNames) -> TritonPrinter:
    """Tile-level expressions: m and n as the tile's offsets, loads by their names."""
    tiled = {S.m, S.n, S.qk} | {ld.symbol for ld in k.loads if ld.level is not LoadLevel.PROGRAM}
    names = {**TILE_NAMES, **{ld.symbol: nm.load(ld) for ld in k.loads}}
    return TritonPrinter(names, frozenset(tiled))


def generate(k: AttentionKernel, header: str = "") -> GeneratedModule:
    """The module of `k`'s kernels: the forward, and the backward's when `k` has a Gradient
    (a draft with placeholders picks the spellings of the spec's names, backends/triton/names)."""
    draft = KernelNames(k)
    spelled = choose(_generate(k, header, draft).source, draft.users)
    return _generate(k, header, KernelNames(k, spelled))


def _generate(k: AttentionKernel, header: str, nm: KernelNames) -> GeneratedModule:
    from attnc.backends.triton.softmax.backward import emit_backward  # it builds on this module
    P.check_prologues(k.around, k.name)
    pr = printer(k, nm)
    body = CodeBuilder()
    _emit_step(body, k, pr, nm)
    body()
    body()
    contracts = [_emit_program(body, k, pr, nm)]
    if k.grad is not None:
        contracts += emit_backward(body, k, pr, nm)
    return GeneratedModule(module_head(header, pr.helpers, P.helpers(k.around)) + body.text(),
                           tuple(contracts),
                           dict(nm.users.spelled or {}))


def _inner_loads(k: AttentionKernel) -> list[Load]:
    return [ld for ld in k.loads if ld.level in (LoadLevel.KEY, LoadLevel.TILE)]


def qk_factor(k: AttentionKernel) -> sympy.Expr | None:
    """The factor c of a score q·k * c whose c is one value per program (the scale, a param per
    head: scores.row_factor), which the forward folds into exp2's multiplier c2 so that it
    takes each row's max on raw q·k; None for any other score."""
    return row_factor(k.score, frozenset({S.m, S.n} | {
        ld.symbol for ld in k.loads if ld.level is not LoadLevel.PROGRAM}))


def _sign_at_launch(factor: sympy.Expr) -> bool:
    """Whether the factor has the runtime scale's sign (the scale times something positive),
    which the launcher passes as the constexpr SCALE_POS; other factors (a param per head)
    find their sign in the kernel."""
    ratio = sympy.simplify(factor / S.scale)
    return not ratio.has(S.scale) and bool(ratio.is_positive)


def _step_args(k: AttentionKernel, nm: KernelNames) -> list[str]:
    """What the key-tile step reads from the program: state, operands, indices, hoisted loads,
    and the tensors (with strides) it loads per key; the constexprs follow."""
    tensors = sorted({ld.tensor for ld in _inner_loads(k)})
    stride_names = [nm.stride(d.name, i) for d in k.inputs if d.name in tensors
                    for i in range(len(d.dims))]
    hoisted = [nm.load(ld) for ld in k.loads if ld.level in (LoadLevel.PROGRAM, LoadLevel.ROW)]
    return (["acc", "l_i", "m_i", "q", "k_base", "v_base", "start_n", "offs_m", "offs_d",
             "offs_dv", "stride_kn", "stride_kd", "stride_vn", "stride_vd", "b", "h", "B", "H", "M",
             "N", "D", "DV", "scale"] + (["c2"] if qk_factor(k) is not None else [])
            + hoisted + [nm.tensor(t) for t in tensors] + stride_names
            + ([] if k.around.plain else _around_step_args(k.around, nm))
            + ["BLOCK_M", "BLOCK_N"]
            + [P.operand_names(x, nm.tensor).block for x in _key_operands(k.around)
               if x not in P.BASE_OPERANDS])


def query_operands(a: Around) -> list[str]:
    """The query-side operands the dots read, in order of first use."""
    return list(dict.fromkeys(t.query for t in a.dots))


def _key_operands(a: Around) -> list[str]:
    """The key-side operands a key tile reads: those the dots read, then the value."""
    return list(dict.fromkeys([t.key for t in a.dots] + [a.value]))


def query_var(name: str, nm: KernelNames) -> str:
    """The program's name of a query-side operand's (prologue-applied) tile."""
    return "q" if name == "q" else f"x_{nm.tensor(name)}"


def key_var(name: str, nm: KernelNames) -> str:
    """The key step's name of a key-side operand's transposed tile [D_x, BLOCK_N]."""
    return "kt" if name == "k" else f"xt_{nm.tensor(name)}"


def _around_step_args(a: Around, nm: KernelNames) -> list[str]:
    """What a key step of a kernel with an Around reads besides the plain step's: the head it
    reads (kvh), the extra query tiles, the extra key operands' bases, strides and head dims,
    and the key side's row values."""
    out = ["kvh"] + [query_var(x, nm) for x in query_operands(a) if x != "q"]
    for x in _key_operands(a):
        if x not in P.BASE_OPERANDS:
            n = P.operand_names(x, nm.tensor)
            out += [n.base, n.strides[2], n.strides[3], n.dim]
    return out + P.row_value_args(P.side_row_values(a, Side.KEY))


def step_header(c: CodeBuilder, name: str, args: list[str], flags: tuple[str, ...]) -> None:
    """`@triton.jit def name(...)` of a tile step: the BLOCK_* sizes and the `flags` are
    constexprs, so each (masked, dtype path) combination compiles to its own code."""
    params = [f"{a}: tl.constexpr" if a.startswith("BLOCK") else a for a in args]
    c("@triton.jit")
    c.call(f"def {name}(", params + [f"{f}: tl.constexpr" for f in flags], "):")


def step_flags(k: AttentionKernel) -> tuple[str, ...]:
    """The forward step's constexpr flags. MASKED: the tile needs the mask. EDGE: the tile may
    reach past N, so keys are bounds-checked (only the last tile can, and it is a masked one:
    a full tile ends at or before its segment's full range, inside the keys). A block-sparse
    kernel has MASKED and MASK_MOD instead: a full block's last tile may reach past N yet must
    run without the mask (full blocks skip the mask, as FlexAttention's do), so there MASKED
    bounds-checks and MASK_MOD says whether to mask. SCALE_POS (a score q·k * scale * g, g > 0):
    the runtime scale is > 0, so a row's largest score has the largest q·k."""
    factor = qk_factor(k)
    known = factor is not None and _sign_at_launch(factor)
    return (("MASKED", "MASK_MOD") if k.block_sparse else ("MASKED", "EDGE")) + (
        ("SCALE_POS",) if known else ()) + ("IEEE", "UPCAST")


def _emit_step(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> None:
    step_header(c, nm.entry("step"), _step_args(k, nm), step_flags(k))
    with c.indented():
        c('"""One key tile: scores, optional mask, online-softmax update."""')
        c("offs_n = start_n + tl.arange(0, BLOCK_N)")
        if not k.around.plain:
            _emit_key_tiles(c, k, nm)
        else:
            _emit_plain_key_tiles(c, k)
        emit_tile_update(c, k, pr, nm, lambda fill: _emit_masking(c, k, pr, fill))


def emit_tile_update(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames,
                     masking: Callable[[str], None]) -> None:
    """The part of a key step after its tiles are loaded (qk in scope): the per-key loads, the
    score, `masking(fill)` under `if MASKED:` (fill: the s of an invisible score), the online
    softmax update and the return. The paged forward (paged.py) shares it with its own masking."""
    for ld in _inner_loads(k):
        c(load_stmt(ld, k, pr, nm))
    # exp(score - max) = exp2(s * c2 - max * c2): s is the score and c2 log2(e), or s is
    # q.k and c2 the factor times log2(e) (emit_factor); one FMA and one exp2 per score,
    # and m_i is each row's max of s * c2
    factor = qk_factor(k)
    if factor is not None:
        c("s = qk")
        c2, fill = "c2", "fill"
        positive = "SCALE_POS" if _sign_at_launch(factor) else "c2 > 0"
        ninf, inf = 'float("-inf")', 'float("inf")'
        c(f"fill = {ninf} if SCALE_POS else {inf}" if positive == "SCALE_POS" else
          f"fill = tl.where(c2 > 0, {ninf}, {inf})")
        c("# fill: the q.k whose score is -inf")
    else:
        c2, fill = repr(LOG2E), 'float("-inf")'
        if k.score.has(S.qk):
            c(f"s = {pr(k.score)}")
        else:  # a score without q.k still needs the tile's shape
            c(f"s = {pr(k.score)} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32)")
    with c.block("if MASKED:"):
        masking(fill)
    if factor is not None:
        c("# the row max of s * c2: max(s) * c2 for c2 > 0, min(s) * c2 for c2 < 0 (rounding")
        c("# is monotone); a constexpr branch, or a uniform one for a sign known in the kernel")
        with c.block(f"if {positive}:"):
            c("s_max = tl.max(s, 1)")
        with c.block("else:"):
            c("s_max = tl.min(s, 1)")
    else:
        c("s_max = tl.max(s, 1)")
    c(f"m_new = tl.maximum(m_i, s_max * {c2})")
    c("# rows that have seen no visible key keep max -inf; shift by 0 there to avoid inf - inf")
    c('m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)')
    c(f"p = tl.exp2(s * {c2} - m_safe[:, None])")
    c("alpha = tl.exp2(m_i - m_safe)")
    c("l_i = l_i * alpha + tl.sum(p, 1)")
    c("acc = acc * alpha[:, None] + _dot(_round(p, v.dtype, UPCAST), v, IEEE, UPCAST)")
    c("return acc, l_i, m_new")


def _emit_masking(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, fill: str) -> None:
    """A dense or block-sparse forward step's masking of a masked tile."""
    if k.block_sparse:
        c(f"s = tl.where({pr(S.n < S.N)}, s, {fill})")
        if k.mask is not None:
            with c.block("if MASK_MOD:"):
                c(f"s = tl.where({pr(k.mask)}, s, {fill})")
    else:
        with c.block("if EDGE:"):
            emit_visible(c, pr, sympy.And(S.n < S.N, k.mask if k.mask is not None
                                           else sympy.true), fill)
        if k.mask is not None:
            with c.block("else:"):
                emit_visible(c, pr, k.mask, fill)


def _emit_plain_key_tiles(c: CodeBuilder, k: AttentionKernel) -> None:
    """kt and v of a plain kernel's key tile (bounds-checked on keys in edge tiles) and q.k."""
    c("kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd")
    c("v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd")
    with c.block(f"if {'MASKED' if k.block_sparse else 'EDGE'}:"):
        c("kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < N) & (offs_d[:, None] < "
          "D), other=0.0)")
        c("v = tl.load(v_ptrs, mask=(offs_n[:, None] < N) & (offs_dv[None, :] < "
          "DV), other=0.0)")
    with c.block("else:"):
        c("kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)")
        c("v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)")
    c("qk = _dot(q, kt, IEEE, UPCAST)")


def value_tile(a: Around, nm: KernelNames, n_rows: str | None, rows: str = "offs_n") -> P.Tile:
    """The value's [BLOCK_N, DV] tile, read through V (the call passes the aliased operand as
    V when the value is not v) with the prologue of the operand `a.value` names."""
    n = P.operand_names("v", nm.tensor)
    return P.Tile(a.value, n.base, rows, n.strides[2], n.offs, n.strides[3], n.dim, n_rows,
                  False, "kvh")


def emit_dots(c: CodeBuilder, a: Around, nm: KernelNames) -> None:
    """qk = Σ weight · dot(query tile, key tile) over the dots."""
    terms = []
    for t in a.dots:
        dot = f"_dot({query_var(t.query, nm)}, {key_var(t.key, nm)}, IEEE, UPCAST)"
        terms.append(dot if t.weight == 1 else f"{float(t.weight)!r} * {dot}")
    c(f"qk = {' + '.join(terms)}")


def _emit_key_tiles(c: CodeBuilder, k: AttentionKernel, nm: KernelNames) -> None:
    """The key-side tiles of a kernel with an Around, each with its prologue (in edge tiles
    bounds-checked on keys), the value (the transposed key tile of the operand it aliases when
    a dot reads that operand), and q.k as the sum of the dots."""
    a = k.around
    P.emit_offsets(c, _key_operands(a), nm.tensor)
    dotted = list(dict.fromkeys(t.key for t in a.dots))
    for edge in (True, False):
        with c.block(f"if {'MASKED' if k.block_sparse else 'EDGE'}:" if edge else "else:"):
            bound = "N" if edge else None
            for x in dotted:
                P.emit_tile(c, P.key_tile(x, nm.tensor, True, bound), key_var(x, nm), a)
            if a.value in dotted:
                c(f"v = tl.trans({key_var(a.value, nm)})")
            else:
                P.emit_tile(c, value_tile(a, nm, bound), "v", a)
    emit_dots(c, a, nm)


def _key_bounds(cond) -> tuple[list[sympy.Expr], list[sympy.Expr], list[sympy.Expr]]:
    """The conjuncts of `cond` that bound the key from one side, as (lower bounds lo: n >= lo,
    upper bounds hi: n < hi, the other conjuncts): a bound is a comparison linear in n with
    coefficient 1 whose other side is an integer (so n <= x is n < x + 1)."""
    los: list[sympy.Expr] = []
    his: list[sympy.Expr] = []
    rest: list[sympy.Expr] = []
    for part in sympy.And.make_args(cond):
        found = None
        if isinstance(part, (sympy.StrictLessThan, sympy.LessThan, sympy.StrictGreaterThan,
                             sympy.GreaterThan)):
            below = isinstance(part, (sympy.StrictLessThan, sympy.LessThan))
            d = part.lhs - part.rhs if below else part.rhs - part.lhs  # cond is d < 0 (or <=)
            strict = isinstance(part, (sympy.StrictLessThan, sympy.StrictGreaterThan))
            a = sympy.diff(d, S.n)
            r = sympy.expand(d - a * S.n)
            if a in (1, -1) and not r.has(S.n) and r.is_integer:
                # n + r < 0: n < -r; -n + r < 0: n >= r + 1 (<= moves the bound by one)
                found = (his, -r + (0 if strict else 1)) if a == 1 else \
                    (los, r + (1 if strict else 0))
        if found is None:
            rest.append(part)
        else:
            found[0].append(found[1])
    return los, his, rest


def emit_visible(c: CodeBuilder, pr: TritonPrinter, cond, fill: str) -> None:
    """s = where(cond, s, fill) on a tile. The key's bounds in `cond` (_key_bounds) are taken
    per row and compared with the key's offset in the tile, so they cost one compare per score
    each (not a compare per bound, and no key index per element)."""
    los, his, rest = _key_bounds(cond)
    key = sympy.Symbol("key_offset", integer=True)
    offset = TritonPrinter({**pr.names, key: "tl.arange(0, BLOCK_N)[None, :]"},
                           pr.tiled | {key})
    start = sympy.Symbol("start_n", integer=True)
    parts = ([sympy.Ge(key, sympy.Max(*los) - start)] if los else []) + \
        ([sympy.Lt(key, sympy.Min(*his) - start)] if his else [])
    visible = sympy.And(*parts, *rest)
    if visible is not sympy.true:
        c(f"s = tl.where({offset(visible)}, s, {fill})")
    pr.helpers |= offset.helpers


PROGRAM_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "SCALE_POS", "IEEE",
                      "UPCAST")
# A block-sparse kernel's lists: (number of blocks [B, H, QB], block indices [B, H, QB, KB]) for
# the partial and the full blocks, each with its strides; the block sizes are constexprs.
BLOCK_LISTS = (("KV_NUM", "kvn", "bhq"), ("KV_IDX", "kvi", "bhqk"),
               ("FULL_NUM", "fn", "bhq"), ("FULL_IDX", "fi", "bhqk"))
SPARSE_CONSTEXPRS = ("SPARSE_Q", "SPARSE_KV")
# A gated kernel's: GATED multiplies the stored out by the gate, SAVE also stores the ungated
# out to OutU, SKIP skips the key loop of a query tile whose gates are all 0 (prologue.py).
GATE_CONSTEXPRS = ("GATED", "SAVE", "SKIP")


def list_params(lists) -> tuple[list[Param], list[Param]]:
    """A block mask's list pointers and their strides (`lists`: BLOCK_LISTS or the backward's
    transposed Q_LISTS)."""
    pointers = [arg(name, ParamType.I32_PTR) for name, _, _ in lists]
    list_strides = [arg(f"{short}_s{r}", INT) for _, short, dims in lists for r in dims]
    return pointers, list_strides


def constexprs(names) -> list[Param]:
    return [arg(name, ParamType.CONSTEXPR) for name in names]


def forward_grid(v) -> tuple[int, int, int]:
    """One program per (query tile, b * h, key split)."""
    return triton.cdiv(v["M"], v["BLOCK_M"]), v["B"] * v["H"], v["splits"]


def forward_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    """The forward kernel's signature: pointers, strides, sizes, scale, then the constexprs."""
    sparse = k.block_sparse
    lists, list_strides = list_params(BLOCK_LISTS) if sparse else ([], [])
    a = k.around
    ops, blocks = P.operand_params(a, nm.tensor)
    extra = ops + P.row_value_params(a) + (P.kv_map_params() if a.kv_head is not None else [])
    gated = a.gate is not None
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "Out")] + [arg("Lse", PTR)]
              + ([arg("OutU", ParamType.DATA)] if gated else [])
              + tensor_params(k, nm) + extra + lists + strides("stride_", "q k v o")
              + stride_params(k, nm) + list_strides
              + [arg(x, INT) for x in ("B", "H", "M", "N", "D", "DV", "GROUP")]
              + [arg("scale", ParamType.FLOAT), arg("KV_SPLIT", INT), arg("stride_os", INT)]
              + constexprs(PROGRAM_CONSTEXPRS + (SPARSE_CONSTEXPRS if sparse else ()))
              + blocks + constexprs(GATE_CONSTEXPRS if gated else ()))
    return KernelContract("forward", nm.entry("forward"), tuple(params),
                          GridRule(forward_grid.__doc__ or "", forward_grid),
                          "softmax attention forward: out and lse per key split")


def query_tile_prologue(c: CodeBuilder, first_tile: str = "", kv_map: bool = False) -> None:
    """Which (query tile, b, h) a program owns, for the forward and the dq kernel alike (the dq
    kernel may be launched on a slab of query tiles starting at `first_tile`); with `kv_map`
    the K/V head is read from the head map KV_MAP (prologue.kv_map_params)."""
    c("pid_m = tl.program_id(0)" + (f" + {first_tile}" if first_tile else ""))
    c("pid_bh = tl.program_id(1)")
    c("b = pid_bh // H")
    c("h = pid_bh % H")
    c("kvh = tl.load(KV_MAP + b * kvm_sb + h * kvm_sh)" if kv_map else "kvh = h // GROUP")
    c("m_lo = pid_m * BLOCK_M")
    c("m_hi = tl.minimum(m_lo + BLOCK_M, M) - 1")
    c("zero = m_lo * 0  # a runtime integer, so bound arithmetic never folds to constants")
    c("offs_m = m_lo + tl.arange(0, BLOCK_M)")
    c("offs_d = tl.arange(0, BLOCK_D)")
    c("offs_dv = tl.arange(0, BLOCK_DV)")


def _emit_program(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter,
                  nm: KernelNames) -> KernelContract:
    contract = forward_contract(k, nm)
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{nm.spec}: softmax attention forward; one program per (query tile, b * h, key '
          'split).')
        c("Split s sees keys [s * KV_SPLIT, (s + 1) * KV_SPLIT) and writes its own normalized "
          "out and lse")
        c('(at Out + s * stride_os, Lse + s * B * H * M), which the launcher merges."""')
        a = k.around
        query_tile_prologue(c, kv_map=a.kv_head is not None)
        c("split_lo = tl.program_id(2) * KV_SPLIT")
        c("split_hi = split_lo + KV_SPLIT")
        if a.plain:
            c("q_ptrs = (Q + b.to(tl.int64) * stride_qb + h * stride_qh")
            c("          + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)")
            c("q = tl.load(q_ptrs, mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), "
              "other=0.0)")
        else:
            _emit_query_tiles(c, a, nm)
        c("k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh")
        c("v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh")
        for x in _key_operands(a):
            if x not in P.BASE_OPERANDS:
                P.emit_base(c, x, Side.KEY, nm.tensor)
        for ld in k.loads:
            if ld.level in (LoadLevel.PROGRAM, LoadLevel.ROW):
                c(load_stmt(ld, k, pr, nm))
        emit_factor(c, k, pr)
        c('m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)')
        c("l_i = tl.zeros([BLOCK_M], tl.float32)")
        c("acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)")
        if a.gate is not None:
            _emit_gate(c, a, nm)
        with c.block("if live:") if a.gate is not None else nullcontext():
            if k.block_sparse:
                _emit_block_lists(c, k, nm)
            else:
                emit_segment_walk(c, k.segments, lambda c, masked, edge: _step_call(
                    c, k, nm, masked, edge=edge), "N", "BLOCK_N", "start_n", pr, split=True,
                    edge=True)
        c("empty = l_i == 0.0")
        c("l_safe = tl.where(empty, 1.0, l_i)")
        c("out = acc / l_safe[:, None]")
        c("# m_i is in base-2 units; the lse is stored as a natural logarithm")
        c(f'lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * {LN2!r})')
        c("# a +inf score makes l_i inf - inf = NaN; its logsumexp is +inf (out stays NaN, as")
        c("# torch's softmax gives it)")
        c('lse = tl.where(m_i == float("inf"), m_i, lse)')
        c("split = tl.program_id(2).to(tl.int64)")
        c("o_ptrs = (Out + split * stride_os + b.to(tl.int64) * stride_ob + h * stride_oh")
        c("          + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)")
        if a.gate is not None:
            _emit_gated_store(c)
        c("tl.store(o_ptrs, _round(out, Out.dtype.element_ty, UPCAST), "
          "mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV))")
        c("tl.store(Lse + (split * B * H + pid_bh) * M + offs_m, lse, mask=offs_m < M)")
    return contract


def _emit_query_tiles(c: CodeBuilder, a: Around, nm: KernelNames) -> None:
    """The query-side tiles the dots read, each with its prologue."""
    names = query_operands(a)
    P.emit_offsets(c, names, nm.tensor)
    for x in names:
        P.emit_base(c, x, Side.QUERY, nm.tensor)
        P.emit_tile(c, P.query_tile(x, nm.tensor), query_var(x, nm), a)


def _emit_gate(c: CodeBuilder, a: Around, nm: KernelNames) -> None:
    """gate: the rows' gates; live: whether the key loop runs (with SKIP, only for a tile
    with a nonzero gate; a NaN gate counts as nonzero, so it still reaches the output)."""
    gate = next(rv for rv in P.row_values(a) if rv.key == "gate")
    P.emit_row_value(c, P.query_tile("q", nm.tensor), gate, "gate")
    c("live = True")
    with c.block("if SKIP:"):
        c("live = tl.sum((gate != 0.0).to(tl.int32), 0) > 0")


def _emit_gated_store(c: CodeBuilder) -> None:
    """With SAVE, the ungated out to OutU (the backward's out); with GATED, out *= gate."""
    with c.block("if SAVE:"):
        c("u_ptrs = (OutU + b.to(tl.int64) * stride_ob + h * stride_oh")
        c("          + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)")
        c("tl.store(u_ptrs, _round(out, OutU.dtype.element_ty, UPCAST), "
          "mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV))")
    with c.block("if GATED:"):
        c("out = out * gate[:, None]")


def emit_factor(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter) -> None:
    """For a score q·k * f (f one value per program, qk_factor): c2 = f * log2(e). f == 0
    becomes a tiny c2 (every score still rounds to 0, and a masked score stays -inf rather than
    inf * 0 = NaN), of the sign SCALE_POS gives when the step reads its sign from there."""
    factor = qk_factor(k)
    if factor is None:
        return
    c(f"c2 = {pr(factor)} * {LOG2E!r}")
    tiny = "(1e-30 if SCALE_POS else -1e-30)" if _sign_at_launch(factor) else "1e-30"
    c(f"c2 = tl.where(c2 == 0, {tiny}, c2)  # keeps the sign the step assumes")


def _step_call(c: CodeBuilder, k: AttentionKernel, nm: KernelNames, masked: str,
               mask_mod: str | None = None, edge: str = "True") -> None:
    """A step call; `mask_mod` (block-sparse kernels) defaults to `masked`; `edge` (dense
    kernels): whether the tile may reach past N."""
    flags = [f"MASKED={masked}"] + ([f"MASK_MOD={mask_mod or masked}"] if k.block_sparse
                                    else [f"EDGE={edge}"])
    flags += ["SCALE_POS=SCALE_POS"] if "SCALE_POS" in step_flags(k) else []
    c.call(f"acc, l_i, m_i = {nm.entry('step')}(", _step_args(k, nm) + flags + [
        "IEEE=IEEE", "UPCAST=UPCAST"])


def emit_segment_walk(c: CodeBuilder, segments, call, extent: str, block: str, var: str,
                      pr: TritonPrinter, split: bool = False, edge: bool = False,
                      floor: str | None = None) -> None:
    """Walk the tiles of `segments` along one axis (keys for the forward and dq kernels, queries
    for the dk/dv kernel): per segment, masked / full / masked ranges, each tile emitted by
    call(c, masked). The bounds are scalars; helpers they need are added to `pr`'s. With
    `split`, only the tiles inside [split_lo, split_hi) are walked (the forward's key split).
    With `edge`, the tile that reaches past `extent` (always a masked one) is walked on its own
    and each tile is emitted by call(c, masked, edge), so the others skip the bounds checks.
    With `floor` (a scalar), each segment starts at that lower bound at the earliest (the paged
    forward's oldest key): a tile straddling it is a masked one, so its masking must drop the
    keys below it."""
    scalar = TritonPrinter({})
    c("prev_end = zero")
    if edge:
        c(f"edge_start = {extent} // {block} * {block}  # tiles from here on reach past {extent}")
    for i, seg in enumerate(segments):
        c(f"# segment {i}: [{seg.lo}, {seg.hi}), all of the tile sees [{seg.full_lo}, "
          f"{seg.full_hi})")
        for name, ex in (("lo", seg.lo), ("hi", seg.hi), ("flo", seg.full_lo),
                         ("fhi", seg.full_hi)):
            c(f"{name} = {scalar(ex)} + zero")
        if floor is not None:
            c(f"lo = tl.maximum(lo, {floor})")
            c(f"flo = tl.maximum(flo, {floor})")
        c(f"t0, t1, t2, t3 = _key_tiles(lo, hi, flo, fhi, prev_end, {extent}, {block})")
        if split:
            c("t0, t1, t2, t3 = _split_tiles(t0, t1, t2, t3, split_lo, split_hi)")
        for lo_name, hi_name, masked in (("t0", "t1", "True"), ("t1", "t2", "False"),
                                         ("t2", "t3", "True")):
            if not edge:
                with c.block(f"for {var} in range({lo_name}, {hi_name}, {block}):"):
                    call(c, masked)
            elif masked == "False":
                with c.block(f"for {var} in range({lo_name}, {hi_name}, {block}):"):
                    call(c, masked, "False")
            else:
                with c.block(f"for {var} in range({lo_name}, tl.minimum({hi_name}, edge_start), "
                             f"{block}):"):
                    call(c, masked, "False")
                with c.block(f"for {var} in range(tl.maximum({lo_name}, edge_start), {hi_name}, "
                             f"{block}):"):
                    call(c, masked, "True")
        c("prev_end = t3")
    pr.helpers |= scalar.helpers


def _emit_block_lists(c: CodeBuilder, k: AttentionKernel, nm: KernelNames) -> None:
    """Key blocks from the block mask of this (b, h, query block): the partial blocks with the
    mask, then the full blocks without it. A query tile lies inside one query block (BLOCK_M
    divides SPARSE_Q); each key block is walked in BLOCK_N tiles, stopping at N, and only
    inside the program's key split (a multiple of SPARSE_KV, so no block straddles two)."""
    c("qb = m_lo // SPARSE_Q")
    for num, idx, masked in (("KV_NUM", "KV_IDX", True), ("FULL_NUM", "FULL_IDX", False)):
        ns, xs = (next(short for name, short, _ in BLOCK_LISTS if name == x) for x in (num, idx))
        c(f"count = tl.load({num} + b * {ns}_sb + h * {ns}_sh + qb * {ns}_sq)")
        c(f"blocks = {idx} + b * {xs}_sb + h * {xs}_sh + qb * {xs}_sq")
        with c.block("for j in range(0, count):"):
            c(f"start = tl.load(blocks + j * {xs}_sk) * SPARSE_KV")
            c("stop = tl.minimum(tl.minimum(start + SPARSE_KV, N), split_hi)")
            c("start = tl.maximum(start, split_lo)")
            with c.block("for start_n in range(start, stop, BLOCK_N):"):
                if masked:
                    _step_call(c, k, nm, "True")
                else:
                    c("# a full block's last tile may run past N: bounds-check it, still "
                      "without the mask")
                    with c.block("if start_n + BLOCK_N <= N:"):
                        _step_call(c, k, nm, "False")
                    with c.block("else:"):
                        _step_call(c, k, nm, "True", mask_mod="False")
