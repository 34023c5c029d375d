"""Triton source for the backward kernels of a kernel IR with a Gradient (FlashAttention-2's plan).

Three launches after `_attnc_bwd_preprocess` (in the prelude) has computed
delta = rowsum(dO * O) - dlse:
  * dq kernel: one program per (query tile, b * h), walking the same key tiles as the forward
    (mask bounds or block-mask lists); it recomputes p = exp(s - lse) from the saved lse,
    ds = p * (dO.v - delta), and accumulates dq += (ds * dqk') @ k;
  * dk/dv kernel: one program per (key tile, b * kv head), looping over the query heads of its
    group and, per head, over the query tiles that see the key tile (the transposed mask
    bounds, or the block mask's query lists); dv += p^T @ dO and dk += (ds * dqk')^T @ q, so
    GQA's sum over a group happens in registers.
A param gradient is never accumulated with atomics: each program writes its partial sums to a
buffer of its own slots (per (b, h) and query tile for a load indexed by b, h only; per row for
one indexed by m; per key, from the dk/dv kernel, for one indexed by n; per element for one
indexed by m and n) and the runtime reduces the buffers in a fixed order (attnc.scatter). The
per-element buffers are bounded: the dq kernel is launched on slabs of query tiles
(TILE_START, SLAB rows), each slab reduced before the next.
Rows past M get lse = +inf (so p = 0) and keys past N are masked, so padding never contributes.
"""

from __future__ import annotations

import sympy

from attnc import symbols as S
from attnc.backends.triton.codegen import (BLOCK_LISTS, SPARSE_CONSTEXPRS, emit_segment_walk,
                                           load_stmt, ptr_args, query_tile_prologue, step_header,
                                           stride_args)
from attnc.backends.triton.printer import TritonPrinter
from attnc.kernel_ir import AttentionKernel

# Where each param load's partial gradient is summed (the dims its buffer keeps), by load level.
BUFFER_KERNEL = {"program": "dq", "row": "dq", "tile": "dq", "key": "dkdv"}
STEP_FLAGS = ("MASKED", "IEEE", "UPCAST", "DPARAMS")
BWD_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "IEEE", "UPCAST", "DPARAMS")
# The block mask's transposed lists: per (b, h, key block) the query blocks that see it.
Q_LISTS = (("Q_NUM", "qn", "bhk"), ("Q_IDX", "qi", "bhkq"),
           ("FULL_Q_NUM", "fqn", "bhk"), ("FULL_Q_IDX", "fqi", "bhkq"))


def backward_names(k: AttentionKernel) -> dict[str, str]:
    base = f"attnc_{k.name}_bwd"
    return {"dq": f"{base}_dq", "dkdv": f"{base}_dkdv", "dq_step": f"_{base}_dq_step",
            "dkdv_step": f"_{base}_dkdv_step"}


def param_loads(k: AttentionKernel, kernel: str) -> list:
    """(load, derivative) of the param loads whose partial gradients `kernel` writes."""
    loads = {ld.name: ld for ld in k.loads}
    return [(loads[name], d) for name, d in k.grad.dloads
            if BUFFER_KERNEL[loads[name].level] == kernel]


def _accumulators(k: AttentionKernel, kernel: str) -> list[str]:
    """The running partial sums `kernel`'s steps carry: one per param load whose buffer is not
    per element (those are stored by the step itself)."""
    return [f"dacc_{ld.name}" for ld, _ in param_loads(k, kernel) if ld.level != "tile"]


def _operand_strides(names: str) -> list[str]:
    return [f"stride_{t}{r}" for t in names.split() for r in ("bhmd" if t in ("q", "do", "dq")
                                                             else "bhnd")]


def _sparse(k: AttentionKernel) -> bool:
    return k.schedule.keys == "block_mask"


def dq_args(k: AttentionKernel) -> list[str]:
    """The dq kernel's parameters, in launch order."""
    lists = [name for name, _, _ in BLOCK_LISTS] if _sparse(k) else []
    list_strides = ([f"{s}_s{r}" for _, s, dims in BLOCK_LISTS for r in dims]
                    if _sparse(k) else [])
    buffers = [f"D_{ld.name}" for ld, _ in param_loads(k, "dq")]
    return (["Q", "K", "V", "DO", "Lse", "Delta", "DQ"] + ptr_args(k) + buffers + lists
            + _operand_strides("q k v do dq") + stride_args(k) + list_strides
            + ["B", "H", "M", "N", "D", "DV", "GROUP", "scale", "TILE_START", "SLAB"]
            + list(BWD_CONSTEXPRS) + (list(SPARSE_CONSTEXPRS) if _sparse(k) else []))


def dkdv_args(k: AttentionKernel) -> list[str]:
    """The dk/dv kernel's parameters, in launch order."""
    lists = [name for name, _, _ in Q_LISTS] if _sparse(k) else []
    list_strides = [f"{s}_s{r}" for _, s, dims in Q_LISTS for r in dims] if _sparse(k) else []
    buffers = [f"D_{ld.name}" for ld, _ in param_loads(k, "dkdv")]
    return (["Q", "K", "V", "DO", "Lse", "Delta", "DK", "DVo"] + ptr_args(k) + buffers + lists
            + _operand_strides("q k v do dk dv") + stride_args(k) + list_strides
            + ["B", "H", "M", "N", "D", "DV", "GROUP", "scale"] + list(BWD_CONSTEXPRS)
            + (list(SPARSE_CONSTEXPRS) if _sparse(k) else []))


def bwd_constexprs(k: AttentionKernel) -> tuple[str, ...]:
    return BWD_CONSTEXPRS + (SPARSE_CONSTEXPRS if _sparse(k) else ())


def _signature(args: list[str], k: AttentionKernel) -> list[str]:
    return [f"{a}: tl.constexpr" if a in bwd_constexprs(k) else a for a in args]


def _guarded(ds: str, deriv: sympy.Expr, pr: TritonPrinter) -> str:
    """ds * deriv, zero where p == 0: a masked or padded element must contribute nothing even
    where the derivative is not finite there (say 1/x of a param read out of range as 0)."""
    if deriv.is_polynomial():  # finite wherever its symbols are
        return ds if deriv == 1 else f"{ds} * ({pr(deriv)})"
    return f"tl.where(p > 0.0, {ds} * ({pr(deriv)}), 0.0)"


def _scores(c, k: AttentionKernel, pr: TritonPrinter, inner) -> None:
    """qk -> masked scores s and probabilities p for one (query tile, key tile) pair."""
    c("qk = _dot(q, kt, IEEE, UPCAST)")
    for ld in inner:
        c(load_stmt(ld, k, pr))
    if k.score.has(S.qk):
        c(f"s = {pr(k.score)}")
    else:
        c(f"s = {pr(k.score)} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32)")
    c('s = tl.where(offs_n[None, :] < N, s, float("-inf"))')
    if k.mask is not None:
        with c.block("if MASKED:"):
            c(f's = tl.where({pr(k.mask)}, s, float("-inf"))')
    c("p = tl.exp(s - lse[:, None])")
    c("dp = _dot(do, vt, IEEE, UPCAST)")
    c("ds = p * (dp - delta[:, None])")
    c(f"dqk = {_guarded('ds', k.grad.dqk, pr)}")


def _tile_loads(k: AttentionKernel, levels) -> list:
    return [ld for ld in k.loads if ld.level in levels]


def _tensors_with_strides(k: AttentionKernel, loads) -> list[str]:
    tensors = sorted({ld.tensor for ld in loads})
    return tensors + [f"{d.name}_s{i}" for d in k.inputs if d.name in tensors
                      for i in range(len(d.dims))]


# --- dq ----------------------------------------------------------------------------------------

def _dq_step_args(k: AttentionKernel) -> list[str]:
    inner = _tile_loads(k, ("key", "tile"))
    hoisted = [ld.name for ld in _tile_loads(k, ("program", "row"))]
    accs = _accumulators(k, "dq")
    tiles = [f"D_{ld.name}" for ld, _ in param_loads(k, "dq") if ld.level == "tile"]
    return (["dq"] + accs + ["q", "do", "lse", "delta", "k_base", "v_base", "start_n", "offs_m",
                             "offs_d", "offs_dv", "stride_kn", "stride_kd", "stride_vn",
                             "stride_vd", "b", "h", "pid_bh", "B", "H", "M", "N", "D", "DV",
                             "scale", "TILE_START", "SLAB"]
            + hoisted + _tensors_with_strides(k, inner) + tiles + ["BLOCK_M", "BLOCK_N"])


def _emit_dq_step(c, k: AttentionKernel, pr: TritonPrinter) -> None:
    accs = _accumulators(k, "dq")
    step_header(c, backward_names(k)["dq_step"], _dq_step_args(k), STEP_FLAGS)
    with c.indented():
        c('"""One key tile of the dq kernel: recompute p, then ds, and fold into dq."""')
        c("offs_n = start_n + tl.arange(0, BLOCK_N)")
        c("kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,")
        c("             mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)")
        c("vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,")
        c("             mask=(offs_n[None, :] < N) & (offs_dv[:, None] < DV), other=0.0)")
        _scores(c, k, pr, _tile_loads(k, ("key", "tile")))
        c("dq += _dot(_round(dqk, kt.dtype, UPCAST), tl.trans(kt), IEEE, UPCAST)")
        loads = param_loads(k, "dq")
        if loads:
            with c.block("if DPARAMS:"):
                for ld, deriv in loads:
                    contrib = _guarded("ds", deriv, pr)
                    if ld.level == "tile":
                        c(f"tl.store(D_{ld.name} + pid_bh.to(tl.int64) * SLAB * N"
                          f" + (offs_m[:, None] - TILE_START * BLOCK_M) * N + offs_n[None, :],"
                          f" {contrib},")
                        c("         mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))")
                    else:
                        c(f"dacc_{ld.name} += tl.sum({contrib}, 1)")
        c("return " + ", ".join(["dq"] + accs))


def _emit_dq(c, k: AttentionKernel, pr: TritonPrinter) -> None:
    names = backward_names(k)
    c("@triton.jit")
    c.call(f"def {names['dq']}(", _signature(dq_args(k), k), "):")
    with c.indented():
        c(f'"""{k.name}: dq (and param partial sums); one program per (query tile, b * h)."""')
        query_tile_prologue(c, "TILE_START")
        c("row_ok = offs_m < M")
        c("q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm")
        c("            + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < D),")
        c("            other=0.0)")
        c("do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * "
          "stride_dom")
        c("             + offs_dv[None, :] * stride_dod,")
        c("             mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)")
        _emit_row_stats(c)
        c("k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh")
        c("v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh")
        for ld in _tile_loads(k, ("program", "row")):
            c(load_stmt(ld, k, pr))
        c("dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)")
        for acc in _accumulators(k, "dq"):
            c(f"{acc} = tl.zeros([BLOCK_M], tl.float32)")
        targets = ", ".join(["dq"] + _accumulators(k, "dq"))
        call = _call(f"{targets} = {names['dq_step']}(", _dq_step_args(k))
        if _sparse(k):
            c("qb = m_lo // SPARSE_Q")
            _emit_block_walk(c, call, BLOCK_LISTS, "q", "k")
        else:
            emit_segment_walk(c, k.segments, call, "N", "BLOCK_N", "start_n", pr)
        c("tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm")
        c("         + offs_d[None, :] * stride_dqd, _round(dq, DQ.dtype.element_ty, UPCAST),")
        c("         mask=row_ok[:, None] & (offs_d[None, :] < D))")
        sums = [ld for ld, _ in param_loads(k, "dq") if ld.level != "tile"]
        if sums:
            with c.block("if DPARAMS:"):
                for ld in sums:
                    if ld.level == "program":
                        c(f"tl.store(D_{ld.name} + pid_bh * tl.cdiv(M, BLOCK_M) + pid_m, "
                          f"tl.sum(dacc_{ld.name}, 0))")
                    else:
                        c(f"tl.store(D_{ld.name} + pid_bh.to(tl.int64) * M + offs_m, "
                          f"dacc_{ld.name}, mask=row_ok)")


def _emit_row_stats(c) -> None:
    c("# rows past M, and rows that saw no key (lse = -inf), get lse = +inf: p = 0 there")
    c('lse = tl.load(Lse + pid_bh.to(tl.int64) * M + offs_m, mask=row_ok, other=float("inf"))')
    c('lse = tl.where(lse == float("-inf"), float("inf"), lse)')
    c("delta = tl.load(Delta + pid_bh.to(tl.int64) * M + offs_m, mask=row_ok, other=0.0)")


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

def _dkdv_step_args(k: AttentionKernel) -> list[str]:
    inner = _tile_loads(k, ("row", "tile"))
    hoisted = [ld.name for ld in _tile_loads(k, ("program", "key"))]
    accs = _accumulators(k, "dkdv")
    return (["dk", "dv"] + accs + ["kt", "vt", "q_base", "do_base", "lse_base", "delta_base",
                                    "start_m", "offs_n", "offs_d", "offs_dv", "stride_qm",
                                    "stride_qd", "stride_dom", "stride_dod", "b", "h", "B", "H",
                                    "M", "N", "D", "DV", "scale"]
            + hoisted + _tensors_with_strides(k, inner) + ["BLOCK_M", "BLOCK_N"])


def _emit_dkdv_step(c, k: AttentionKernel, pr: TritonPrinter) -> None:
    accs = _accumulators(k, "dkdv")
    step_header(c, backward_names(k)["dkdv_step"], _dkdv_step_args(k), STEP_FLAGS)
    with c.indented():
        c('"""One query tile of the dk/dv kernel: recompute p and ds, fold into dk and dv."""')
        c("offs_m = start_m + tl.arange(0, BLOCK_M)")
        c("row_ok = offs_m < M")
        c("q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,")
        c("            mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)")
        c("do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,")
        c("             mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)")
        c('lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))')
        c('lse = tl.where(lse == float("-inf"), float("inf"), lse)')
        c("delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)")
        _scores(c, k, pr, _tile_loads(k, ("row", "tile")))
        c("dv += _dot(tl.trans(_round(p, do.dtype, UPCAST)), do, IEEE, UPCAST)")
        c("dk += _dot(tl.trans(_round(dqk, q.dtype, UPCAST)), q, IEEE, UPCAST)")
        loads = param_loads(k, "dkdv")
        if loads:
            with c.block("if DPARAMS:"):
                for ld, deriv in loads:
                    c(f"dacc_{ld.name} += tl.sum({_guarded('ds', deriv, pr)}, 0)")
        c("return " + ", ".join(["dk", "dv"] + accs))


def _emit_dkdv(c, k: AttentionKernel, pr: TritonPrinter) -> None:
    names = backward_names(k)
    c("@triton.jit")
    c.call(f"def {names['dkdv']}(", _signature(dkdv_args(k), k), "):")
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
        c("kt = tl.load(K + b.to(tl.int64) * stride_kb + kvh * stride_kh + offs_n[None, :] * stride_kn")
        c("             + offs_d[:, None] * stride_kd, mask=col_ok[None, :] & (offs_d[:, None] < D),")
        c("             other=0.0)")
        c("vt = tl.load(V + b.to(tl.int64) * stride_vb + kvh * stride_vh + offs_n[None, :] * stride_vn")
        c("             + offs_dv[:, None] * stride_vd,")
        c("             mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)")
        c("dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)")
        c("dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)")
        if _sparse(k):
            c("kb = n_lo // SPARSE_KV")
        with c.block("for g in range(0, GROUP):"):
            c("h = kvh * GROUP + g")
            c("bh = b.to(tl.int64) * H + h")
            c("q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh")
            c("do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh")
            c("lse_base = Lse + bh * M")
            c("delta_base = Delta + bh * M")
            for ld in _tile_loads(k, ("program", "key")):
                c(load_stmt(ld, k, pr))
            accs = _accumulators(k, "dkdv")
            for acc in accs:
                c(f"{acc} = tl.zeros([BLOCK_N], tl.float32)")
            call = _call(f"{', '.join(['dk', 'dv'] + accs)} = {names['dkdv_step']}(",
                         _dkdv_step_args(k))
            if _sparse(k):
                _emit_block_walk(c, call, Q_LISTS, "k", "q")
            else:
                emit_segment_walk(c, k.grad.rows, call, "M", "BLOCK_M", "start_m", pr)
            if accs:
                with c.block("if DPARAMS:"):
                    for ld, _ in param_loads(k, "dkdv"):
                        c(f"tl.store(D_{ld.name} + bh * N + offs_n, dacc_{ld.name}, mask=col_ok)")
        c("tl.store(DK + b.to(tl.int64) * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkn")
        c("         + offs_d[None, :] * stride_dkd, _round(dk, DK.dtype.element_ty, UPCAST),")
        c("         mask=col_ok[:, None] & (offs_d[None, :] < D))")
        c("tl.store(DVo + b.to(tl.int64) * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvn")
        c("         + offs_dv[None, :] * stride_dvd, _round(dv, DVo.dtype.element_ty, UPCAST),")
        c("         mask=col_ok[:, None] & (offs_dv[None, :] < DV))")


def emit_backward(c, k: AttentionKernel, pr: TritonPrinter) -> None:
    """All backward kernels of `k` (which has a Gradient) into the CodeBuilder `c`."""
    for emit in (_emit_dq_step, _emit_dq, _emit_dkdv_step, _emit_dkdv):
        c()
        c()
        emit(c, k, pr)
