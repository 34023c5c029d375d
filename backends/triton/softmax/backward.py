"""Triton source for the backward kernels of a kernel IR with a Gradient (FlashAttention-2's plan).

Three launches after `_attnc_bwd_preprocess` (in the prelude) has computed
delta = rowsum(dO * O) - dlse:
  * dq kernel: one program per (query tile, b * h), walking the same key tiles as the forward
    (mask bounds or block-mask lists); it recomputes p = exp2(s * log2 e - lse * log2 e) from
    the saved (natural-log) lse, ds = p * (dO.v - delta), and accumulates dq += (ds * dqk') @ k;
  * dk/dv kernel: one program per (key tile, b * kv head), looping over the query heads of its
    group and, per head, over the query tiles that see the key tile (the transposed mask
    bounds, or the block mask's query lists); dv += p^T @ dO and dk += (ds * dqk')^T @ q, so
    GQA's sum over a group happens in registers. It works in the k.q^T orientation: its tiles
    are [keys, queries] (s^T = k @ q^T from a q^T tile loaded transposed), so p^T and ds^T
    feed the dk/dv dots as they are, with no transpose through shared memory; its expressions
    print with n along rows and m along columns (`transposed`).
When dqk' (the score's derivative in q.k) is one value per program -- the score is q.k times
a factor free of m, n and per-tile loads, as `dot(q, k) * scale` -- it is applied once to the
accumulated dq (and dk, when also free of the head) instead of to every element.
Tiles that lie inside [0, N) keys and [0, M) queries (the full tiles of a segment walk, MASKED
false) load and score without bound checks; the block mask's walks, whose full blocks may end
past N or M, always check.
A param gradient is never accumulated with atomics: each program writes its partial sums to a
buffer of its own slots (per (b, h) and query tile for a load indexed by b, h only; per row for
one indexed by m; per key, from the dk/dv kernel, for one indexed by n; per element for one
indexed by m and n) and the runtime reduces the buffers in a fixed order (attnc.scatter). The
per-element buffers are bounded: the dq kernel is launched on slabs of query tiles
(TILE_START, SLAB rows), each slab reduced before the next.
Rows past M get lse = +inf (so p = 0) and keys past N are masked (dq kernel) or only ever
reach their own dk/dv rows, which are not stored (dk/dv kernel), so padding never contributes.
A kernel with something around its score (operand prologues, several dots, a value alias, a
gate, a head map) gets backward_around.py's kernels, which follow the same plan; the text of a
plain kernel's is this module's alone.
"""

from __future__ import annotations

import sympy
import triton

from attnc.backends.triton.contract import Bind, GridRule, KernelContract, Param, ParamType, arg
from attnc.backends.triton.prelude import PRELUDE_PREPROCESS
from attnc.backends.triton.printer import TritonPrinter
from attnc.backends.triton.softmax.forward import (BLOCK_LISTS, SPARSE_CONSTEXPRS, KernelNames,
                                                   constexprs, emit_segment_walk, list_params,
                                                   load_stmt, query_tile_prologue, step_header,
                                                   stride_params, strides, tensor_params)
from attnc.backends.triton.softmax.scores import LOG2E, affine_score
from attnc.expr import symbols as S
from attnc.ir.kernel import AttentionKernel, Load, LoadLevel

# Where each param load's partial gradient is summed (the dims its buffer keeps), by load level.
BUFFER_KERNEL = {LoadLevel.PROGRAM: "dq", LoadLevel.ROW: "dq", LoadLevel.TILE: "dq",
                 LoadLevel.KEY: "dkdv"}
STEP_FLAGS = ("MASKED", "IEEE", "UPCAST", "DPARAMS")
BWD_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "IEEE", "UPCAST", "DPARAMS")
# The block mask's transposed lists: per (b, h, key block) the query blocks that see it.
Q_LISTS = (("Q_NUM", "qn", "bhk"), ("Q_IDX", "qi", "bhkq"),
           ("FULL_Q_NUM", "fqn", "bhk"), ("FULL_Q_IDX", "fqi", "bhkq"))


def param_loads(k: AttentionKernel, kernel: str) -> list[tuple[Load, sympy.Expr]]:
    """(load, derivative) of the param loads whose partial gradients `kernel` writes."""
    assert k.grad is not None
    return [(k.load(name), d) for name, d in k.grad.dloads
            if BUFFER_KERNEL[k.load(name).level] == kernel]


def _accumulators(k: AttentionKernel, kernel: str, nm: KernelNames) -> list[str]:
    """The running partial sums `kernel`'s steps carry: one per param load whose buffer is not
    per element (those are stored by the step itself)."""
    return [nm.acc(ld) for ld, _ in param_loads(k, kernel) if ld.level is not LoadLevel.TILE]


def _buffers(k: AttentionKernel, kernel: str, nm: KernelNames) -> list[Param]:
    return [Param(nm.buffer(ld), ParamType.FP32_PTR, Bind("buffer", ld.name))
            for ld, _ in param_loads(k, kernel)]


def preprocess_grid(v) -> tuple[int]:
    """One program per BLOCK_R rows of (b, h, m)."""
    return (triton.cdiv(v["R"], v["BLOCK_R"]),)


def dq_grid(v) -> tuple[int, int]:
    """One program per (query tile of the slab, b * h)."""
    return triton.cdiv(v["SLAB"], v["BLOCK_M"]), v["B"] * v["H"]


def dkdv_grid(v) -> tuple[int, int]:
    """One program per (key tile, b * kv head); it loops over the query heads of its group."""
    return triton.cdiv(v["N"], v["BLOCK_N"]), v["B"] * v["H"] // v["GROUP"]


PREPROCESS = KernelContract(
    "preprocess", PRELUDE_PREPROCESS,
    (arg("Out", ParamType.DATA), arg("DO", ParamType.DATA), arg("DLse", ParamType.FP32_PTR),
     arg("Delta", ParamType.FP32_PTR), arg("R", ParamType.INT), arg("DV", ParamType.INT),
     *constexprs(("HAS_DLSE", "BLOCK_R", "BLOCK_DV"))),
    GridRule(preprocess_grid.__doc__ or "", preprocess_grid), "delta = rowsum(dO * O) - dlse")


def dq_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    """The dq kernel's signature (a kernel with something around its score:
    backward_around's)."""
    if not k.around.plain:
        from attnc.backends.triton.softmax import backward_around
        return backward_around.dq_contract(k, nm)
    lists, list_strides = list_params(BLOCK_LISTS) if k.block_sparse else ([], [])
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "DO")]
              + [arg("Lse", ParamType.FP32_PTR), arg("Delta", ParamType.FP32_PTR),
                 arg("DQ", ParamType.DATA)]
              + tensor_params(k, nm) + _buffers(k, "dq", nm) + lists
              + strides("stride_", "q k v do dq") + stride_params(k, nm) + list_strides
              + [arg(x, ParamType.INT) for x in ("B", "H", "M", "N", "D", "DV", "GROUP")]
              + [arg("scale", ParamType.FLOAT), arg("TILE_START", ParamType.INT),
                 arg("SLAB", ParamType.INT)]
              + constexprs(BWD_CONSTEXPRS + (SPARSE_CONSTEXPRS if k.block_sparse else ())))
    return KernelContract("dq", nm.entry("dq"), tuple(params),
                          GridRule(dq_grid.__doc__ or "", dq_grid),
                          "dq and the partial sums of params indexed by (b, h), m or (m, n)")


def dkdv_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    """The dk/dv kernel's signature (a kernel with something around its score:
    backward_around's)."""
    if not k.around.plain:
        from attnc.backends.triton.softmax import backward_around
        return backward_around.dkdv_contract(k, nm)
    lists, list_strides = list_params(Q_LISTS) if k.block_sparse else ([], [])
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "DO")]
              + [arg("Lse", ParamType.FP32_PTR), arg("Delta", ParamType.FP32_PTR),
                 arg("DK", ParamType.DATA), arg("DVo", ParamType.DATA)]
              + tensor_params(k, nm) + _buffers(k, "dkdv", nm) + lists
              + strides("stride_", "q k v do dk dv") + stride_params(k, nm) + list_strides
              + [arg(x, ParamType.INT) for x in ("B", "H", "M", "N", "D", "DV", "GROUP")]
              + [arg("scale", ParamType.FLOAT)]
              + constexprs(BWD_CONSTEXPRS + (SPARSE_CONSTEXPRS if k.block_sparse else ())))
    return KernelContract("dkdv", nm.entry("dkdv"), tuple(params),
                          GridRule(dkdv_grid.__doc__ or "", dkdv_grid),
                          "dk, dv and the partial sums of key-indexed params")


def _guarded(ds: str, deriv: sympy.Expr, pr: TritonPrinter) -> str:
    """ds * deriv, zero where p == 0: a masked or padded element must contribute nothing even
    where the derivative is not finite there (say 1/x of a param read out of range as 0)."""
    if deriv.is_polynomial():  # finite wherever its symbols are
        return ds if deriv == 1 else f"{ds} * ({pr(deriv)})"
    return f"tl.where(p > 0.0, {ds} * ({pr(deriv)}), 0.0)"


def transposed(pr: TritonPrinter) -> TritonPrinter:
    """The dk/dv kernel's printer: its tiles hold keys along rows and queries along columns, so
    m is a row vector and n a column (loads indexed by them come out transposed too)."""
    return TritonPrinter({**pr.names, S.m: "offs_m[None, :]", S.n: "offs_n[:, None]"}, pr.tiled)


def factor_after_loop(k: AttentionKernel, kernel: str) -> sympy.Expr | None:
    """dqk' when `kernel` ("dq" or "dkdv") may apply it once to its accumulated dq / dk rather
    than to each element: it is free of q.k, m, n and of loads that vary within a program (for
    the dk/dv kernel, which sums over a GQA group's heads, free of h and of every load), and
    finite wherever its symbols are (so p = 0 elements need no guard). Else None."""
    assert k.grad is not None
    deriv = sympy.sympify(k.grad.dqk)
    varying = {S.qk, S.m, S.n} | {ld.symbol for ld in k.loads
                                  if kernel == "dkdv" or ld.level is not LoadLevel.PROGRAM}
    if kernel == "dkdv":
        varying.add(S.h)
    if deriv.free_symbols & varying or not deriv.is_polynomial():
        return None
    return deriv


def _bounded(k: AttentionKernel) -> bool:
    """Whether every tile bounds-checks its keys and rows: a block mask's full blocks may end
    past N (or M), so there MASKED does not tell which tiles reach past the end."""
    return k.block_sparse


def scores(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames, inner,
           kernel: str, dp: str | None = None) -> str:
    """qk -> masked scores and probabilities p = exp2(s * log2 e - lse2), then ds, for one
    (query tile, key tile) pair: [BLOCK_M, BLOCK_N] in the dq kernel, [BLOCK_N, BLOCK_M] in the
    dk/dv kernel. Returns the name of the tile the dq / dk dot takes (ds, or ds * dqk'). With
    `dp` (a kernel with an Around: backward_around.py) the caller has computed qk itself and `dp`
    is the statement computing dp."""
    assert k.grad is not None
    dkdv = kernel == "dkdv"
    row, shape = ("[None, :]", "[BLOCK_N, BLOCK_M]") if dkdv else ("[:, None]",
                                                                   "[BLOCK_M, BLOCK_N]")
    if dp is None:
        c("qk = _dot(k_tile, qT, IEEE, UPCAST)" if dkdv else "qk = _dot(q, kt, IEEE, UPCAST)")
    for ld in inner:
        c(load_stmt(ld, k, pr, nm))
    affine = affine_score(k.score)
    if affine is not None:  # qk * (c log2 e) - lse2 is one FMA per element, then + r log2 e
        x = f"qk * ({pr(affine.factor)} * {LOG2E!r}) - lse2{row}"
        rest = sympy.sympify(k.score).subs(S.qk, 0)  # r as the spec wrote it, not expanded
        if rest != 0:
            x += f" + {pr(sympy.Float(LOG2E) * rest)}"
        c(f"x = {x}")
        var = "x"
    else:
        score = pr(k.score) if k.score.has(S.qk) else f"{pr(k.score)} + tl.zeros({shape}, " \
            "tl.float32)"
        c(f"s = {score}")
        var = "s"
    # keys past N: in the dq kernel's MASKED tiles (in every tile of a block mask's walk); the
    # dk/dv kernel's own padded keys reach only their own dk/dv rows, which are not stored
    keys = [] if dkdv else [f'{var} = tl.where({pr(S.n < S.N)}, {var}, float("-inf"))']
    mask = [f'{var} = tl.where({pr(k.mask)}, {var}, float("-inf"))'] if k.mask is not None else []
    if _bounded(k):
        for line in keys:
            c(line)
        keys = []
    if keys + mask:
        with c.block("if MASKED:"):
            for line in keys + mask:
                c(line)
    c("p = tl.math.exp2(x)" if var == "x" else
      f"p = tl.math.exp2(s * {LOG2E!r} - lse2{row})")
    if dp is not None:
        c(dp)
    else:
        c("dp = _dot(v_tile, tl.trans(do), IEEE, UPCAST)" if dkdv else
          "dp = _dot(do, vt, IEEE, UPCAST)")
    c(f"ds = p * (dp - delta{row})")
    if factor_after_loop(k, kernel) is not None:
        return "ds"
    c(f"dqk = {_guarded('ds', k.grad.dqk, pr)}")
    return "dqk"


def _tile_loads(k: AttentionKernel, levels) -> list[Load]:
    return [ld for ld in k.loads if ld.level in levels]


def _tensors_with_strides(k: AttentionKernel, loads, nm: KernelNames) -> list[str]:
    tensors = sorted({ld.tensor for ld in loads})
    return [nm.tensor(t) for t in tensors] + [nm.stride(d.name, i) for d in k.inputs
                                              if d.name in tensors for i in range(len(d.dims))]


# --- dq ----------------------------------------------------------------------------------------

def _dq_step_args(k: AttentionKernel, nm: KernelNames) -> list[str]:
    inner = _tile_loads(k, (LoadLevel.KEY, LoadLevel.TILE))
    hoisted = [nm.load(ld) for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.ROW))]
    accs = _accumulators(k, "dq", nm)
    tiles = [nm.buffer(ld) for ld, _ in param_loads(k, "dq") if ld.level is LoadLevel.TILE]
    return (["dq"] + accs + ["q", "do", "lse2", "delta", "k_base", "v_base", "start_n", "offs_m",
                             "offs_d", "offs_dv", "stride_kn", "stride_kd", "stride_vn",
                             "stride_vd", "b", "h", "pid_bh", "B", "H", "M", "N", "D", "DV",
                             "scale", "TILE_START", "SLAB"]
            + hoisted + _tensors_with_strides(k, inner, nm) + tiles + ["BLOCK_M", "BLOCK_N"])


def _emit_dq_step(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> None:
    accs = _accumulators(k, "dq", nm)
    step_header(c, nm.entry("dq_step"), _dq_step_args(k, nm), STEP_FLAGS)
    with c.indented():
        c('"""One key tile of the dq kernel: recompute p, then ds, and fold into dq."""')
        c("offs_n = start_n + tl.arange(0, BLOCK_N)")
        c("kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd")
        c("vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd")
        _bounded_loads(c, k, [
            ("kt", "kt_ptrs", "offs_n[None, :] < N", "offs_d[:, None] < D", "0.0"),
            ("vt", "vt_ptrs", "offs_n[None, :] < N", "offs_dv[:, None] < DV", "0.0")])
        ds = scores(c, k, pr, nm, _tile_loads(k, (LoadLevel.KEY, LoadLevel.TILE)), "dq")
        c(f"dq += _dot(_round({ds}, kt.dtype, UPCAST), tl.trans(kt), IEEE, UPCAST)")
        emit_dq_param_step(c, k, pr, nm)
        c("return " + ", ".join(["dq"] + accs))


def emit_dq_param_step(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> None:
    """A dq step's param partial sums (with DPARAMS): per element stored at once, the others
    added to their running sums."""
    loads = param_loads(k, "dq")
    if loads:
        with c.block("if DPARAMS:"):
            for ld, deriv in loads:
                contrib = _guarded("ds", deriv, pr)
                if ld.level is LoadLevel.TILE:
                    c(f"tl.store({nm.buffer(ld)} + pid_bh.to(tl.int64) * SLAB * N"
                      f" + (offs_m[:, None] - TILE_START * BLOCK_M) * N + offs_n[None, :],"
                      f" {contrib},")
                    c("         mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))")
                else:
                    c(f"{nm.acc(ld)} += tl.sum({contrib}, 1)")


def _emit_dq(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> KernelContract:
    contract = dq_contract(k, nm)
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{k.name}: dq (and param partial sums); one program per (query tile, b * h)."""')
        query_tile_prologue(c, "TILE_START")
        c("row_ok = offs_m < M")
        c("q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, "
          "None] * stride_qm")
        c("            + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & "
          "(offs_d[None, :] < D),")
        c("            other=0.0)")
        c("do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * "
          "stride_dom")
        c("             + offs_dv[None, :] * stride_dod,")
        c("             mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)")
        _emit_row_stats(c)
        c("k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh")
        c("v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh")
        for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.ROW)):
            c(load_stmt(ld, k, pr, nm))
        c("dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)")
        for acc in _accumulators(k, "dq", nm):
            c(f"{acc} = tl.zeros([BLOCK_M], tl.float32)")
        targets = ", ".join(["dq"] + _accumulators(k, "dq", nm))
        call = _call(f"{targets} = {nm.entry('dq_step')}(", _dq_step_args(k, nm))
        if k.block_sparse:
            c("qb = m_lo // SPARSE_Q")
            _emit_block_walk(c, call, BLOCK_LISTS, "q", "k")
        else:
            emit_segment_walk(c, k.segments, call, "N", "BLOCK_N", "start_n", pr)
        factor = factor_after_loop(k, "dq")
        if factor is not None and factor != 1:
            c(f"dq = dq * ({pr(factor)})")
        c("tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, "
          "None] * stride_dqm")
        c("         + offs_d[None, :] * stride_dqd, _round(dq, DQ.dtype.element_ty, UPCAST),")
        c("         mask=row_ok[:, None] & (offs_d[None, :] < D))")
        emit_dq_param_stores(c, k, nm)
    return contract


def emit_dq_param_stores(c, k: AttentionKernel, nm: KernelNames) -> None:
    """The dq program's param partial sums (with DPARAMS), to its own slots."""
    sums = [ld for ld, _ in param_loads(k, "dq") if ld.level is not LoadLevel.TILE]
    if sums:
        with c.block("if DPARAMS:"):
            for ld in sums:
                if ld.level is LoadLevel.PROGRAM:
                    c(f"tl.store({nm.buffer(ld)} + pid_bh * tl.cdiv(M, BLOCK_M) + pid_m, "
                      f"tl.sum({nm.acc(ld)}, 0))")
                else:
                    c(f"tl.store({nm.buffer(ld)} + pid_bh.to(tl.int64) * M + offs_m, "
                      f"{nm.acc(ld)}, mask=row_ok)")


def _emit_row_stats(c) -> None:
    c("# rows past M, and rows that saw no key (lse = -inf), get lse = +inf: p = 0 there; the")
    c("# forward's lse is a natural log, taken to base 2 once per row")
    c('lse = tl.load(Lse + pid_bh.to(tl.int64) * M + offs_m, mask=row_ok, other=float("inf"))')
    c(f'lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * {LOG2E!r}')
    c("delta = tl.load(Delta + pid_bh.to(tl.int64) * M + offs_m, mask=row_ok, other=0.0)")


def _bounded_loads(c, k: AttentionKernel, loads) -> None:
    """Tile loads (name, pointers, bound check, head-dim check or None, padding value) that
    check the bound only where a tile may reach past the end (MASKED tiles, or always:
    `_bounded`); the head dims are always checked."""
    def emit(bounded: bool) -> None:
        for name, ptrs, bound, dims, other in loads:
            checks = ([f"({bound})"] if bounded else []) + ([f"({dims})"] if dims else [])
            mask = f", mask={' & '.join(checks)}, other={other}" if checks else ""
            c(f"{name} = tl.load({ptrs}{mask})")
    if _bounded(k):
        emit(True)
        return
    with c.block("if MASKED:"):
        emit(True)
    with c.block("else:"):
        emit(False)


def _call(head: str, args: list[str]):
    """An emitter of one step call, given whether the tile is masked."""
    def emit(c, masked: str) -> None:
        c.call(head, args + [f"MASKED={masked}"] + [f"{f}={f}" for f in STEP_FLAGS[1:]])
    return emit


def _emit_block_walk(c, call, lists, own: str, other: str) -> None:
    """Walk a block mask's lists for this program's block (`own`: "q" for the dq kernel's query
    block, "k" for the dk/dv kernel's key block): partial blocks masked, full ones not. Padding
    needs no special case: keys past N are masked in every backward tile, and rows past M have
    p = 0."""
    short = {name: s for name, s, _ in lists}
    block, extent, tile, var = {"k": ("SPARSE_KV", "N", "BLOCK_N", "start_n"),
                                "q": ("SPARSE_Q", "M", "BLOCK_M", "start_m")}[other]
    names = [name for name, _, _ in lists]  # partial count, indices, full count, indices
    for n_name, i_name, masked in ((names[0], names[1], "True"), (names[2], names[3], "False")):
        ns, xs = short[n_name], short[i_name]
        c(f"count = tl.load({n_name} + b * {ns}_sb + h * {ns}_sh + {own}b * {ns}_s{own})")
        c(f"blocks = {i_name} + b * {xs}_sb + h * {xs}_sh + {own}b * {xs}_s{own}")
        with c.block("for j in range(0, count):"):
            c(f"start = tl.load(blocks + j * {xs}_s{other}) * {block}")
            with c.block(f"for {var} in range(start, tl.minimum(start + {block}, {extent}), "
                         f"{tile}):"):
                call(c, masked)


# --- dk/dv -------------------------------------------------------------------------------------

def _dkdv_step_args(k: AttentionKernel, nm: KernelNames) -> list[str]:
    inner = _tile_loads(k, (LoadLevel.ROW, LoadLevel.TILE))
    hoisted = [nm.load(ld) for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.KEY))]
    accs = _accumulators(k, "dkdv", nm)
    return (["dk", "dv"] + accs + ["k_tile", "v_tile", "q_base", "do_base", "lse_base",
                                    "delta_base", "start_m", "offs_n", "offs_d", "offs_dv",
                                    "stride_qm", "stride_qd", "stride_dom", "stride_dod", "b", "h",
                                    "B", "H", "M", "N", "D", "DV", "scale"]
            + hoisted + _tensors_with_strides(k, inner, nm) + ["BLOCK_M", "BLOCK_N"])


def _emit_dkdv_step(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> None:
    accs = _accumulators(k, "dkdv", nm)
    step_header(c, nm.entry("dkdv_step"), _dkdv_step_args(k, nm), STEP_FLAGS)
    with c.indented():
        c('"""One query tile of the dk/dv kernel: recompute p^T and ds^T, fold into dk, dv."""')
        c("offs_m = start_m + tl.arange(0, BLOCK_M)")
        c("qT_ptrs = q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd")
        c("do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod")
        _bounded_loads(c, k, [
            ("qT", "qT_ptrs", "offs_m[None, :] < M", "offs_d[:, None] < D", "0.0"),
            ("do", "do_ptrs", "offs_m[:, None] < M", "offs_dv[None, :] < DV", "0.0"),
            ("lse", "lse_base + offs_m", "offs_m < M", None, 'float("inf")'),
            ("delta", "delta_base + offs_m", "offs_m < M", None, "0.0")])
        c(f'lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * {LOG2E!r}')
        ds = scores(c, k, pr, nm, _tile_loads(k, (LoadLevel.ROW, LoadLevel.TILE)), "dkdv")
        c("dv += _dot(_round(p, do.dtype, UPCAST), do, IEEE, UPCAST)")
        c(f"dk += _dot(_round({ds}, qT.dtype, UPCAST), tl.trans(qT), IEEE, UPCAST)")
        loads = param_loads(k, "dkdv")
        if loads:
            with c.block("if DPARAMS:"):
                for ld, deriv in loads:
                    c(f"{nm.acc(ld)} += tl.sum({_guarded('ds', deriv, pr)}, 1)")
        c("return " + ", ".join(["dk", "dv"] + accs))


def _emit_dkdv(c, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames) -> KernelContract:
    assert k.grad is not None
    contract = dkdv_contract(k, nm)
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{k.name}: dk, dv (and key-indexed param partial sums); one program per '
          '(key tile, b * kv head)."""')
        c("pid_n = tl.program_id(0)")
        c("pid_bkv = tl.program_id(1)")
        c("HKV = H // GROUP")
        c("b = pid_bkv // HKV")
        c("kvh = pid_bkv % HKV")
        c("n_lo = pid_n * BLOCK_N")
        c("n_hi = tl.minimum(n_lo + BLOCK_N, N) - 1")
        c("zero = n_lo * 0")
        c("offs_n = n_lo + tl.arange(0, BLOCK_N)")
        c("offs_d = tl.arange(0, BLOCK_D)")
        c("offs_dv = tl.arange(0, BLOCK_DV)")
        c("col_ok = offs_n < N")
        c("k_tile = tl.load(K + b.to(tl.int64) * stride_kb + kvh * stride_kh + "
          "offs_n[:, None] * stride_kn")
        c("                 + offs_d[None, :] * stride_kd, mask=col_ok[:, None] & "
          "(offs_d[None, :] < D),")
        c("                 other=0.0)")
        c("v_tile = tl.load(V + b.to(tl.int64) * stride_vb + kvh * stride_vh + "
          "offs_n[:, None] * stride_vn")
        c("                 + offs_dv[None, :] * stride_vd,")
        c("                 mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)")
        c("dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)")
        c("dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)")
        if k.block_sparse:
            c("kb = n_lo // SPARSE_KV")
        with c.block("for g in range(0, GROUP):"):
            c("h = kvh * GROUP + g")
            c("bh = b.to(tl.int64) * H + h")
            c("q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh")
            c("do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh")
            c("lse_base = Lse + bh * M")
            c("delta_base = Delta + bh * M")
            for ld in _tile_loads(k, (LoadLevel.PROGRAM, LoadLevel.KEY)):
                c(load_stmt(ld, k, pr, nm))
            accs = _accumulators(k, "dkdv", nm)
            for acc in accs:
                c(f"{acc} = tl.zeros([BLOCK_N], tl.float32)")
            call = _call(f"{', '.join(['dk', 'dv'] + accs)} = {nm.entry('dkdv_step')}(",
                         _dkdv_step_args(k, nm))
            if k.block_sparse:
                _emit_block_walk(c, call, Q_LISTS, "k", "q")
            else:
                emit_segment_walk(c, k.grad.rows, call, "M", "BLOCK_M", "start_m", pr)
            if accs:
                with c.block("if DPARAMS:"):
                    for ld, _ in param_loads(k, "dkdv"):
                        c(f"tl.store({nm.buffer(ld)} + bh * N + offs_n, {nm.acc(ld)}, "
                          "mask=col_ok)")
        factor = factor_after_loop(k, "dkdv")
        if factor is not None and factor != 1:
            c(f"dk = dk * ({pr(factor)})")
        c("tl.store(DK + b.to(tl.int64) * stride_dkb + kvh * stride_dkh + "
          "offs_n[:, None] * stride_dkn")
        c("         + offs_d[None, :] * stride_dkd, _round(dk, DK.dtype.element_ty, UPCAST),")
        c("         mask=col_ok[:, None] & (offs_d[None, :] < D))")
        c("tl.store(DVo + b.to(tl.int64) * stride_dvb + kvh * stride_dvh + "
          "offs_n[:, None] * stride_dvn")
        c("         + offs_dv[None, :] * stride_dvd, _round(dv, DVo.dtype.element_ty, UPCAST),")
        c("         mask=col_ok[:, None] & (offs_dv[None, :] < DV))")
    return contract


def emit_backward(c, k: AttentionKernel, pr: TritonPrinter,
                  nm: KernelNames) -> list[KernelContract]:
    """All backward kernels of `k` (which has a Gradient) into the CodeBuilder `c`; returns
    the contracts of the backward's launches (the preprocess lives in the prelude). A kernel
    with something around its score gets backward_around.py's kernels."""
    if not k.around.plain:
        from attnc.backends.triton.softmax.backward_around import emit_backward_around
        return emit_backward_around(c, k, pr, nm)
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
