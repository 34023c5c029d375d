"""The backward kernels of a softmax kernel with something around its score (attnc.ir.around):
operand prologues, several dots, a value that is a key-side operand, a gate, a kv-head map.

The plan is backward.py's (FlashAttention-2: the prelude's preprocess, a dq kernel per query
tile, a dk/dv kernel per key tile); what differs:
  * Every operand tile is transformed by its prologue as it loads (prologue.emit_tile, the
    forward's emitter: the backward recomputes it from the raw operand and the row values), and
    the dots run on the transformed tiles; qk = Σ weight · dot(x_t', y_t').
  * The adjoints of the transformed operands (dx' = Σ_t weight_t · ds @ y_t' per query operand
    in the dq kernel, dy' and the value's dv' = p^T @ dO' in the dk/dv kernel) are accumulated
    as dq, dk, dv are, and the prologue's vector-Jacobian product is applied once per program,
    before the store (prologue_vjp.emit_vjp), which also writes the row values' adjoints. A
    value that is a dotted operand (v = k, MLA's latent) sums its two adjoints first.
  * Gate: out = gate · U (U the ungated output the forward saved). dO reaches the softmax as
    gate · dO, applied to dp (dp = gate · dO @ v'^T) and to p in dv += (p · gate)^T @ dO, so
    dO itself is never rounded again; delta = gate · rowsum(dO · U) - dlse and d gate =
    rowsum(dO · U) come from the preprocess (launcher).
  * The dk/dv kernel walks the query heads that read its kv head from per-(b, kv head) lists
    (HEADS, HSTART, HCOUNT: the inverse of the head map, or of h // group), so any map works.
A block-sparse kernel walks its block mask's lists as backward.py's do (the dq kernel the key
blocks of its query block, the dk/dv kernel the query blocks of its key block, per query head),
every tile bounds-checked. Gathered keys and head mixing have their own kernels (refused here).
"""

from __future__ import annotations

from contextlib import nullcontext

import triton

from attnc.backends.triton.contract import Bind, GridRule, KernelContract, Param, ParamType, arg
from attnc.backends.triton.printer import TritonPrinter
from attnc.backends.triton.softmax import prologue as P
from attnc.backends.triton.softmax.backward import (PREPROCESS, Q_LISTS, STEP_FLAGS,
                                                    _accumulators, _buffers, _call,
                                                    _emit_block_walk, _emit_row_stats, _guarded,
                                                    emit_dq_param_step, emit_dq_param_stores,
                                                    _tensors_with_strides, _tile_loads,
                                                    factor_after_loop, param_loads, scores,
                                                    transposed)
from attnc.backends.triton.softmax.forward import (BLOCK_LISTS, SPARSE_CONSTEXPRS, KernelNames,
                                                   _key_operands, query_operands, constexprs,
                                                   list_params, emit_dots, emit_segment_walk,
                                                   key_var, load_stmt, query_tile_prologue,
                                                   query_var, stride_params, step_header, strides,
                                                   tensor_params)
from attnc.backends.triton.softmax.scores import LOG2E
from attnc.backends.triton.softmax.prologue_vjp import (Slots, adjoint_name, emit_chain, emit_vjp,
                                                        has_adjoint)
from attnc.errors import CompileError
from attnc.ir.around import BASE_OPERANDS, Around, RowKind, Side, row_values
from attnc.ir.kernel import AttentionKernel, LoadLevel

INT, FP32 = ParamType.INT, ParamType.FP32_PTR
GRADS = {"q": ("DQ", "stride_dq", "bhmd"), "k": ("DK", "stride_dk", "bhnd"),
         "v": ("DVo", "stride_dv", "bhnd")}
HEAD_LISTS = ("HEADS", "HSTART", "HCOUNT")


def check(k: AttentionKernel) -> None:
    """Refuse what these kernels do not generate (at compile time, naming the construct)."""
    a = k.around
    if a.gather is not None or a.premix is not None or a.postmix is not None:
        raise CompileError(f"{k.name}: gathered keys and head mixing have their own kernels",
                           hint="compile the spec with attnc.compile (it picks those kernels)")


def grad_names(x: str, spell) -> tuple[str, list[str]]:
    """The gradient pointer of operand `x` and its four strides."""
    if x in GRADS:
        ptr, prefix, dims = GRADS[x]
        return ptr, [f"{prefix}{r}" for r in dims]
    s = spell(x)
    return f"G_{s}", [f"G_{s}_s{i}" for i in range(4)]


def key_operands(a: Around) -> list[str]:
    """The key-side operands the dk/dv kernel keeps and differentiates: those the dots read,
    then the value (read through V, with its operand's prologue) unless a dot reads it too."""
    return _key_operands(a)


def dotted_keys(a: Around) -> list[str]:
    """The key-side operands the dots read, in order of first use."""
    return list(dict.fromkeys(t.key for t in a.dots))


def _operand_params(a: Around, nm: KernelNames, grads: list[str]
                    ) -> tuple[list[Param], list[Param]]:
    """Pointers, strides and head dims of the declared operands (q, k, v are in the fixed
    part), the gradients of `grads` with their strides; and the tile-width constexprs."""
    out, blocks = P.operand_params(a, nm.tensor)
    for x in grads:
        ptr, st = grad_names(x, nm.tensor)
        bind = Bind(ptr) if x in GRADS else Bind("operand_grad", x)
        out.append(Param(ptr, ParamType.DATA, bind))
        out += [Param(s, INT, Bind(s) if x in GRADS else Bind("operand_grad_stride", x, i))
                for i, s in enumerate(st)]
    return out, blocks


def _row_params(a: Around, side: Side) -> list[Param]:
    """Every row value (read by both kernels: each transforms both sides' tiles) and the
    adjoint buffers of `side`'s factors and gains."""
    out = P.row_value_params(a)
    for rv in row_values(a):
        if has_adjoint(rv) and rv.side is side and rv.kind is not RowKind.GATE:
            out.append(Param(adjoint_name(rv), FP32, Bind("row_adjoint", rv.key)))
    return out


def dq_grid(v) -> tuple[int, int]:
    """One program per (query tile of the slab, b * h)."""
    return triton.cdiv(v["SLAB"], v["BLOCK_M"]), v["B"] * v["H"]


def dkdv_grid(v) -> tuple[int, int]:
    """One program per (key tile, b * kv head); it loops over the query heads reading it."""
    return triton.cdiv(v["N"], v["BLOCK_N"]), v["B"] * v["HKV"]


SIZES = ("B", "H", "HKV", "M", "N", "D", "DV")
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "IEEE", "UPCAST", "DPARAMS")


def dq_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    """The dq kernel's signature: backward.py's plus the operands, their gradients, the row
    values, the query side's adjoint buffers and the head map."""
    a = k.around
    ops, blocks = _operand_params(a, nm, query_operands(a))
    lists, list_strides = list_params(BLOCK_LISTS) if k.block_sparse else ([], [])
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "DO")]
              + [arg("Lse", FP32), arg("Delta", FP32)] + ops + _row_params(a, Side.QUERY)
              + (P.kv_map_params() if a.kv_head is not None else [])
              + tensor_params(k, nm) + _buffers(k, "dq", nm) + lists
              + strides("stride_", "q k v do") + stride_params(k, nm) + list_strides
              + [arg(x, INT) for x in SIZES + ("GROUP",)]
              + [arg("scale", ParamType.FLOAT), arg("TILE_START", INT), arg("SLAB", INT)]
              + constexprs(CONSTEXPRS + (SPARSE_CONSTEXPRS if k.block_sparse else ())) + blocks)
    return KernelContract("dq", nm.entry("dq"), tuple(params),
                          GridRule(dq_grid.__doc__ or "", dq_grid),
                          "the query operands' gradients, their row values' adjoints and the "
                          "partial sums of params indexed by (b, h), m or (m, n)")


def dkdv_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    """The dk/dv kernel's signature: backward.py's plus the operands, the key side's gradients
    and adjoint buffers, the row values and the per-kv-head lists of query heads."""
    a = k.around
    ops, blocks = _operand_params(a, nm, key_operands(a))
    lists, list_strides = list_params(Q_LISTS) if k.block_sparse else ([], [])
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "DO")]
              + [arg("Lse", FP32), arg("Delta", FP32)] + ops + _row_params(a, Side.KEY)
              + [arg(x, ParamType.I32_PTR) for x in HEAD_LISTS]
              + tensor_params(k, nm) + _buffers(k, "dkdv", nm) + lists
              + strides("stride_", "q k v do") + stride_params(k, nm) + list_strides
              + [arg(x, INT) for x in SIZES] + [arg("scale", ParamType.FLOAT)]
              + constexprs(CONSTEXPRS + (SPARSE_CONSTEXPRS if k.block_sparse else ())) + blocks)
    return KernelContract("dkdv", nm.entry("dkdv"), tuple(params),
                          GridRule(dkdv_grid.__doc__ or "", dkdv_grid),
                          "the key operands' (and the value's) gradients, their row values' "
                          "adjoints and the partial sums of key-indexed params")


def _value_tile(a: Around, n_rows: str | None, transposed: bool, rows: str) -> P.Tile:
    """The value's tile read through V, with the prologue of the operand it names."""
    n = P.operand_names("v", str)
    return P.Tile(a.value, n.base, rows, n.strides[2], n.offs, n.strides[3], n.dim, n_rows,
                  transposed, "kvh")


def _dtype(x: str, nm: KernelNames) -> str:
    return f"{P.operand_names(x, nm.tensor).pointer}.dtype.element_ty"


def _key_args(a: Around, nm: KernelNames) -> list[str]:
    """Bases, strides, head dims and feature offsets of the key-side tiles a dq step loads."""
    out = []
    for x in dotted_keys(a) + ["v"]:
        n = P.operand_names(x, nm.tensor)
        out += [n.pointer, n.base, n.strides[2], n.strides[3], n.dim, n.offs]
    return out


def _query_args(a: Around, nm: KernelNames) -> list[str]:
    out = []
    for x in query_operands(a):
        n = P.operand_names(x, nm.tensor)
        out += [n.pointer, n.base, n.strides[2], n.strides[3], n.dim, n.offs]
    return out


def _blocks(a: Around, nm: KernelNames) -> list[str]:
    return [P.operand_names(o.name, nm.tensor).block for o in a.operands]


def _gate(a: Around):
    return next((rv for rv in row_values(a) if rv.key == "gate"), None)


def _acc(x: str, nm: KernelNames) -> str:
    return f"dacc_{x}" if x in BASE_OPERANDS else f"dacc_{nm.tensor(x)}"


def _variants(k: AttentionKernel) -> tuple[bool, ...]:
    """The step's tile loads: bounds-checked in masked tiles and plain in the others, or always
    checked in a block-sparse kernel (a full block's last tile may end past N or M)."""
    return (True,) if k.block_sparse else (True, False)


def _branch(c, k: AttentionKernel, bounded: bool):
    """The `if MASKED:` / `else:` block of one variant (none for a block-sparse kernel)."""
    if k.block_sparse:
        return nullcontext()
    return c.block("if MASKED:" if bounded else "else:")


def _weighted(weight, dot: str) -> str:
    return dot if weight == 1 else f"{float(weight)!r} * {dot}"


# --- dq ----------------------------------------------------------------------------------------

def _dq_step_args(k: AttentionKernel, nm: KernelNames) -> list[str]:
    a = k.around
    inner = _tile_loads(k, (LoadLevel.KEY, LoadLevel.TILE))
    hoisted = [nm.load(ld) for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.ROW))]
    tiles = [nm.buffer(ld) for ld, _ in param_loads(k, "dq") if ld.level is LoadLevel.TILE]
    args = ([_acc(x, nm) for x in query_operands(a)] + _accumulators(k, "dq", nm)
            + [query_var(x, nm) for x in query_operands(a)]
            + ["do", "lse2", "delta"] + (["gate"] if a.gate is not None else [])
            + _key_args(a, nm) + P.row_value_args(P.side_row_values(a, Side.KEY))
            + ["start_n", "offs_m", "b", "h", "kvh", "pid_bh", "B", "H", "M", "N", "scale",
               "TILE_START", "SLAB"]
            + hoisted + _tensors_with_strides(k, inner, nm) + tiles + ["BLOCK_M", "BLOCK_N"]
            + _blocks(a, nm))
    return list(dict.fromkeys(args))


def _emit_dq_step(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> None:
    a = k.around
    accs = [_acc(x, nm) for x in query_operands(a)] + _accumulators(k, "dq", nm)
    step_header(c, nm.entry("dq_step"), _dq_step_args(k, nm), STEP_FLAGS)
    with c.indented():
        c('"""One key tile of the dq kernel: the key tiles with their prologues, p, ds, and the '
          'query operands\' adjoints."""')
        c("offs_n = start_n + tl.arange(0, BLOCK_N)")
        dotted = dotted_keys(a)
        for bounded in _variants(k):
            with _branch(c, k, bounded):
                bound = "N" if bounded else None
                for x in dotted:
                    P.emit_tile(c, P.key_tile(x, nm.tensor, True, bound), key_var(x, nm), a,
                                _dtype(x, nm))
                if a.value in dotted:
                    c(f"vt = {key_var(a.value, nm)}")
                else:
                    P.emit_tile(c, _value_tile(a, bound, True, "offs_n"), "vt", a,
                                "V.dtype.element_ty")
        emit_dots(c, a, nm)
        gated = " * gate[:, None]" if a.gate is not None else ""
        ds = scores(c, k, pr, nm, _tile_loads(k, (LoadLevel.KEY, LoadLevel.TILE)), "dq",
                    dp=f"dp = _dot(do, vt, IEEE, UPCAST){gated}")
        for t in a.dots:
            kt = key_var(t.key, nm)
            c(f"{_acc(t.query, nm)} += " + _weighted(
                t.weight, f"_dot(_round({ds}, {kt}.dtype, UPCAST), tl.trans({kt}), IEEE, "
                "UPCAST)"))
        emit_dq_param_step(c, k, pr, nm)
        c("return " + ", ".join(accs))


def _emit_store(c, x: str, nm: KernelNames, value: str, rows: str, extent: str) -> None:
    """Store the gradient tile `value` ([rows, features] fp32) of operand `x`."""
    n = P.operand_names(x, nm.tensor)
    ptr, st = grad_names(x, nm.tensor)
    head = "h" if rows == "offs_m" else "kvh"
    c(f"tl.store({ptr} + b.to(tl.int64) * {st[0]} + {head} * {st[1]} + {rows}[:, None] * {st[2]} "
      f"+ {n.offs}[None, :] * {st[3]},")
    c(f"         _round({value}, {ptr}.dtype.element_ty, UPCAST),")
    c(f"         mask=({rows}[:, None] < {extent}) & ({n.offs}[None, :] < {n.dim}))")


def _emit_back(c, a: Around, x: str, nm: KernelNames, adj: str, t: P.Tile, rows_block: str,
               where: Slots) -> str:
    """The adjoint of operand x's raw tile from `adj`, its transformed tile's: reload the raw
    tile, redo the prologue keeping each op's input, and go back through it."""
    if not a.prologue(x):
        return adj
    n = P.operand_names(x, nm.tensor)
    tag = f"bw_{x}" if x in BASE_OPERANDS else f"bw_{nm.tensor(x)}"
    P.emit_load(c, t, f"{tag}_raw")
    xs = emit_chain(c, t, a, f"{tag}_raw", f"({rows_block}, {n.block})", tag)
    return emit_vjp(c, t, a, xs, adj, where, tag)


def _emit_dq(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> KernelContract:
    a = k.around
    contract = dq_contract(k, nm)
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{k.name}: the query operands\' gradients (and param partial sums); one program '
          'per (query tile, b * h)."""')
        query_tile_prologue(c, "TILE_START", kv_map=a.kv_head is not None)
        c("row_ok = offs_m < M")
        queries = query_operands(a)
        P.emit_offsets(c, queries + key_operands(a), nm.tensor)
        for x in queries:
            P.emit_base(c, x, Side.QUERY, nm.tensor)
            P.emit_tile(c, P.query_tile(x, nm.tensor), query_var(x, nm), a, _dtype(x, nm))
        c("do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * "
          "stride_dom")
        c("             + offs_dv[None, :] * stride_dod,")
        c("             mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)")
        _emit_row_stats(c)
        gate = _gate(a)
        if gate is not None:
            P.emit_row_value(c, P.query_tile("q", nm.tensor), gate, "gate")
        for x in dotted_keys(a) + ["v"]:
            P.emit_base(c, x, Side.KEY, nm.tensor)
        for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.ROW)):
            c(load_stmt(ld, k, pr, nm))
        for x in queries:
            c(f"{_acc(x, nm)} = tl.zeros([BLOCK_M, {P.operand_names(x, nm.tensor).block}], "
              "tl.float32)")
        for acc in _accumulators(k, "dq", nm):
            c(f"{acc} = tl.zeros([BLOCK_M], tl.float32)")
        targets = ", ".join([_acc(x, nm) for x in queries] + _accumulators(k, "dq", nm))
        call = _call(f"{targets} = {nm.entry('dq_step')}(", _dq_step_args(k, nm))
        if k.block_sparse:
            c("qb = m_lo // SPARSE_Q")
            _emit_block_walk(c, call, BLOCK_LISTS, "q", "k")
        else:
            emit_segment_walk(c, k.segments, call, "N", "BLOCK_N", "start_n", pr)
        factor = factor_after_loop(k, "dq")
        where = Slots("H", "M", "pid_m", "tl.cdiv(M, BLOCK_M)")
        for x in queries:
            adj = _acc(x, nm)
            if factor is not None and factor != 1:
                c(f"{adj} = {adj} * ({pr(factor)})")
            grad = _emit_back(c, a, x, nm, adj, P.query_tile(x, nm.tensor), "BLOCK_M", where)
            _emit_store(c, x, nm, grad, "offs_m", "M")
        emit_dq_param_stores(c, k, nm)
    return contract


# --- dk/dv -------------------------------------------------------------------------------------

def _key_tile_var(x: str, nm: KernelNames) -> str:
    """The dk/dv kernel's resident [BLOCK_N, D_x] tile of a key-side operand."""
    return "k_tile" if x == "k" else f"xk_{nm.tensor(x)}"


def _query_t_var(x: str, nm: KernelNames) -> str:
    """The dk/dv step's transposed [D_x, BLOCK_M] tile of a query-side operand."""
    return "qT" if x == "q" else f"xT_{nm.tensor(x)}"


def _dkdv_step_args(k: AttentionKernel, nm: KernelNames) -> list[str]:
    a = k.around
    inner = _tile_loads(k, (LoadLevel.ROW, LoadLevel.TILE))
    hoisted = [nm.load(ld) for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.KEY))]
    dotted = dotted_keys(a)
    args = ([_acc(x, nm) for x in dotted] + ["dv"] + _accumulators(k, "dkdv", nm)
            + [_key_tile_var(x, nm) for x in dotted] + ["v_tile"]
            + _query_args(a, nm) + P.row_value_args(P.side_row_values(a, Side.QUERY))
            + P.row_value_args([rv for rv in [_gate(a)] if rv is not None])
            + ["do_base", "lse_base", "delta_base", "start_m", "offs_n", "offs_dv", "stride_dom",
               "stride_dod", "b", "h", "B", "H", "M", "N", "DV", "scale"]
            + hoisted + _tensors_with_strides(k, inner, nm) + ["BLOCK_M", "BLOCK_N"]
            + _blocks(a, nm))
    return list(dict.fromkeys(args))


def _query_t_tile(x: str, nm: KernelNames, bound: str | None) -> P.Tile:
    n = P.operand_names(x, nm.tensor)
    return P.Tile(x, n.base, "offs_m", n.strides[2], n.offs, n.strides[3], n.dim, bound, True,
                  "h")


def _emit_dkdv_step(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> None:
    a = k.around
    dotted = dotted_keys(a)
    accs = [_acc(x, nm) for x in dotted] + ["dv"] + _accumulators(k, "dkdv", nm)
    step_header(c, nm.entry("dkdv_step"), _dkdv_step_args(k, nm), STEP_FLAGS)
    with c.indented():
        c('"""One query tile of the dk/dv kernel: the query tiles with their prologues, p^T, '
          'ds^T, and the key operands\' adjoints."""')
        c("offs_m = start_m + tl.arange(0, BLOCK_M)")
        for bounded in _variants(k):
            with _branch(c, k, bounded):
                bound = "M" if bounded else None
                for x in query_operands(a):
                    P.emit_tile(c, _query_t_tile(x, nm, bound), _query_t_var(x, nm), a,
                                _dtype(x, nm))
                rows = "(offs_m[:, None] < M) & " if bounded else ""
                c("do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * "
                  f"stride_dod, mask={rows}(offs_dv[None, :] < DV), other=0.0)")
                if bounded:
                    c('lse = tl.load(lse_base + offs_m, mask=offs_m < M, other=float("inf"))')
                    c("delta = tl.load(delta_base + offs_m, mask=offs_m < M, other=0.0)")
                else:
                    c("lse = tl.load(lse_base + offs_m)")
                    c("delta = tl.load(delta_base + offs_m)")
        c(f'lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * {LOG2E!r}')
        gate = _gate(a)
        if gate is not None:
            P.emit_row_value(c, P.query_tile("q", nm.tensor), gate, "gate")
        terms = [_weighted(t.weight, f"_dot({_key_tile_var(t.key, nm)}, "
                           f"{_query_t_var(t.query, nm)}, IEEE, UPCAST)") for t in a.dots]
        c(f"qk = {' + '.join(terms)}")
        gated = " * gate[None, :]" if gate is not None else ""
        ds = scores(c, k, pr, nm, _tile_loads(k, (LoadLevel.ROW, LoadLevel.TILE)), "dkdv",
                    dp=f"dp = _dot(v_tile, tl.trans(do), IEEE, UPCAST){gated}")
        c(f"dv += _dot(_round(p{gated}, do.dtype, UPCAST), do, IEEE, UPCAST)")
        for t in a.dots:
            qt = _query_t_var(t.query, nm)
            c(f"{_acc(t.key, nm)} += " + _weighted(
                t.weight, f"_dot(_round({ds}, {qt}.dtype, UPCAST), tl.trans({qt}), IEEE, "
                "UPCAST)"))
        loads = param_loads(k, "dkdv")
        if loads:
            with c.block("if DPARAMS:"):
                for ld, deriv in loads:
                    c(f"{nm.acc(ld)} += tl.sum({_guarded('ds', deriv, pr)}, 1)")
        c("return " + ", ".join(accs))


def _emit_dkdv(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> KernelContract:
    assert k.grad is not None
    a = k.around
    contract = dkdv_contract(k, nm)
    dotted = dotted_keys(a)
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{k.name}: the key operands\' and the value\'s gradients (and key-indexed param '
          'partial sums); one program per (key tile, b * kv head)."""')
        c("pid_n = tl.program_id(0)")
        c("pid_bkv = tl.program_id(1)")
        c("b = pid_bkv // HKV")
        c("kvh = pid_bkv % HKV")
        c("n_lo = pid_n * BLOCK_N")
        c("n_hi = tl.minimum(n_lo + BLOCK_N, N) - 1")
        c("zero = n_lo * 0")
        c("offs_n = n_lo + tl.arange(0, BLOCK_N)")
        c("offs_d = tl.arange(0, BLOCK_D)")
        c("offs_dv = tl.arange(0, BLOCK_DV)")
        c("col_ok = offs_n < N")
        if k.block_sparse:
            c("kb = n_lo // SPARSE_KV")
        P.emit_offsets(c, query_operands(a) + key_operands(a), nm.tensor)
        for x in dotted + ["v"]:
            P.emit_base(c, x, Side.KEY, nm.tensor)
        for x in dotted:
            P.emit_tile(c, P.key_tile(x, nm.tensor, False), _key_tile_var(x, nm), a,
                        _dtype(x, nm))
        if a.value in dotted:
            c(f"v_tile = {_key_tile_var(a.value, nm)}")
        else:
            P.emit_tile(c, _value_tile(a, "N", False, "offs_n"), "v_tile", a,
                        "V.dtype.element_ty")
        for x in dotted:
            c(f"{_acc(x, nm)} = tl.zeros([BLOCK_N, {P.operand_names(x, nm.tensor).block}], "
              "tl.float32)")
        c("dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)")
        c("# the query heads that read this kv head: HEADS[b, HSTART[b, kvh] + j], j < HCOUNT")
        c("first = tl.load(HSTART + pid_bkv)")
        with c.block("for j in range(0, tl.load(HCOUNT + pid_bkv)):"):
            c("h = tl.load(HEADS + b * H + first + j)")
            c("bh = b.to(tl.int64) * H + h")
            for x in query_operands(a):
                P.emit_base(c, x, Side.QUERY, nm.tensor)
            c("do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh")
            c("lse_base = Lse + bh * M")
            c("delta_base = Delta + bh * M")
            for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.KEY)):
                c(load_stmt(ld, k, pr, nm))
            paccs = _accumulators(k, "dkdv", nm)
            for acc in paccs:
                c(f"{acc} = tl.zeros([BLOCK_N], tl.float32)")
            targets = [_acc(x, nm) for x in dotted] + ["dv"] + paccs
            call = _call(f"{', '.join(targets)} = {nm.entry('dkdv_step')}(",
                         _dkdv_step_args(k, nm))
            if k.block_sparse:
                _emit_block_walk(c, call, Q_LISTS, "k", "q")
            else:
                emit_segment_walk(c, k.grad.rows, call, "M", "BLOCK_M", "start_m", pr)
            if paccs:
                with c.block("if DPARAMS:"):
                    for ld, _ in param_loads(k, "dkdv"):
                        c(f"tl.store({nm.buffer(ld)} + bh * N + offs_n, {nm.acc(ld)}, "
                          "mask=col_ok)")
        factor = factor_after_loop(k, "dkdv")
        where = Slots("HKV", "N", "pid_n", "tl.cdiv(N, BLOCK_N)")
        for x in dotted:
            adj = _acc(x, nm)
            if factor is not None and factor != 1:
                c(f"{adj} = {adj} * ({pr(factor)})")
            if x == a.value:
                c(f"{adj} = {adj} + dv")
            grad = _emit_back(c, a, x, nm, adj, P.key_tile(x, nm.tensor, False), "BLOCK_N",
                              where)
            _emit_store(c, x, nm, grad, "offs_n", "N")
        if a.value not in dotted:
            grad = _emit_back(c, a, a.value, nm, "dv", _value_tile(a, "N", False, "offs_n"),
                              "BLOCK_N", where)
            _emit_store(c, a.value, nm, grad, "offs_n", "N")
    return contract


def emit_backward_around(c, k: AttentionKernel, pr: TritonPrinter,
                         nm: KernelNames) -> list[KernelContract]:
    """The backward kernels of `k` (with a Gradient and a non-plain Around) into `c`; returns
    their contracts (the preprocess lives in the prelude)."""
    check(k)
    contracts = [PREPROCESS]
    keys_by_rows = transposed(pr)
    for emit, printer in ((_emit_dq_step, pr), (_emit_dq, pr), (_emit_dkdv_step, keys_by_rows),
                          (_emit_dkdv, keys_by_rows)):
        c()
        c()
        made = emit(c, k, printer, nm)
        if made is not None:
            contracts.append(made)
    pr.helpers |= keys_by_rows.helpers
    return contracts
