"""Triton source and launches of a gathered-keys kernel: `mask = ... and n in idx[b, h, m, :]`.

A kernel IR whose `around.gather` lists the keys of every query row (key_block 1) compiles to
three kernels that visit only the listed keys, never a key tile:
  * forward: one program per (query row m, b, kv head, chunk of its query heads). The rows of
    its tile are query heads at the same m that share one list (lists shared by the heads, the
    index without h: a GQA group's heads, BLOCK_H of them; with h in the index: one head). It
    walks the row's list in chunks of BLOCK_N entries, gathers those K/V rows by index, computes
    the spec's score and remaining mask with n = the gathered key (so biases such as ALiBi
    apply), and runs the online softmax; it stores out and the natural-log lse.
  * dq: the same programs and walk, recomputing p from the lse: dq += (ds * dqk) @ k.
  * dk/dv: one program per (key n, b, kv head) walking the key's transposed list (the query
    rows that list it, built by the runtime with a stable sort: attnc/runtime/gather.py), so dk
    and dv are summed in a fixed order without atomics; with lists shared by the heads an entry
    is a query row m and the program loops over the group's query heads.
Lists reach the kernels prepared by the runtime: each row its distinct keys in ascending order,
then N for padding and repeats, with the count of distinct keys per row (`Ends`), so padding
costs nothing. Tiles narrower than tl.dot's 16 rows multiply by broadcasting
(`_rows_qk`, `_rows_pv`). Entries are checked against N by the runtime, never here.

Expressions print with m, h and n as tile tensors (the head of a row varies along the tile's
rows), so every load of the spec's params and inputs is a tile load; indices of m, n and h are
in range by construction (padding rows reuse a real row's head or query and are not stored),
and a load's dims indexed by them keep a bounds mask for index expressions the runtime cannot
check.
"""

from __future__ import annotations

import sympy
import torch
import triton

from attnc.backends.triton import interpreting
from attnc.backends.triton.contract import (Bind, GeneratedModule, GridRule, KernelContract, Param,
                                            ParamType, arg)
from attnc.backends.triton.module import KernelModule
from attnc.backends.triton.names import choose
from attnc.backends.triton.prelude import module_head
from attnc.backends.triton.printer import TritonPrinter
from attnc.backends.triton.softmax.forward import (KernelNames, constexprs, stride_params, strides,
                                                   tensor_params)
from attnc.backends.triton.softmax.scores import LOG2E
from attnc.backends.triton.source import CodeBuilder
from attnc.expr import symbols as S
from attnc.ir.cascade import TensorKind
from attnc.ir.kernel import AttentionKernel, Load

INT, PTR, I32 = ParamType.INT, ParamType.FP32_PTR, ParamType.I32_PTR

# Row-tile products: tl.dot needs 16 rows; a narrower tile (one head, a small GQA group)
# multiplies by broadcasting in fp32.
HELPERS = '''@triton.jit
def _rows_qk(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr):
    """a [R, D] @ b[N, D]^T in fp32."""
    if WIDE:
        c = _dot(a, tl.trans(b), IEEE, UPCAST)
    else:
        c = tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], 2)
    return c


@triton.jit
def _rows_pv(p, b, IEEE: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr):
    """p [R, N] @ b [N, D] in fp32 (p already rounded to b's dtype where the dot needs it)."""
    if WIDE:
        c = _dot(p, b, IEEE, UPCAST)
    else:
        c = tl.sum(p.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)
    return c
'''

ROW_CONSTEXPRS = ("BLOCK_H", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "IEEE", "UPCAST")
KEY_CONSTEXPRS = ("BLOCK_M", "BLOCK_G", "BLOCK_D", "BLOCK_DV", "SHARED", "IEEE", "UPCAST")
LIST_STRIDES = ("ls_b", "ls_h", "ls_m", "ls_k", "es_b", "es_h", "es_m")


def entry(nm: KernelNames, role: str) -> str:
    return f"attnc_{nm.spec}_gather_{role}"


def row_grid(v) -> tuple[int, int]:
    """One program per (query row, b * kv head * chunk of BLOCK_H query heads of its group)."""
    return v["M"], v["B"] * (v["H"] // v["GROUP"]) * v["CHUNKS"]


def key_grid(v) -> tuple[int, int]:
    """One program per (key, b * kv head)."""
    return v["N"], v["B"] * (v["H"] // v["GROUP"])


def _row_params(k: AttentionKernel, nm: KernelNames, backward: bool) -> list[Param]:
    data = ("Q", "K", "V", "DO", "DQ") if backward else ("Q", "K", "V", "Out")
    fp32 = ("Lse", "Delta") if backward else ("Lse",)
    return ([arg(x, ParamType.DATA) for x in data] + [arg(x, PTR) for x in fp32]
            + [arg("Lists", I32), arg("Ends", I32)] + tensor_params(k, nm)
            + strides("stride_", "q k v do dq" if backward else "q k v o")
            + [arg(x, INT) for x in LIST_STRIDES] + stride_params(k, nm)
            + [arg(x, INT) for x in ("B", "H", "M", "N", "D", "DV", "GROUP", "CHUNKS")]
            + [arg("scale", ParamType.FLOAT)] + constexprs(ROW_CONSTEXPRS))


def forward_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    return KernelContract("forward", entry(nm, "fwd"), tuple(_row_params(k, nm, False)),
                          GridRule(row_grid.__doc__ or "", row_grid),
                          "gathered-keys softmax attention forward: out and lse")


def dq_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    return KernelContract("dq", entry(nm, "dq"), tuple(_row_params(k, nm, True)),
                          GridRule(row_grid.__doc__ or "", row_grid),
                          "gathered-keys backward: dq per query row")


def dkdv_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "DO", "DK", "DVo")]
              + [arg(x, PTR) for x in ("Lse", "Delta")]
              + [arg("Rows", I32), arg("Starts", ParamType.INDEX_PTR)] + tensor_params(k, nm)
              + strides("stride_", "q k v do dk dv") + stride_params(k, nm)
              + [arg(x, INT) for x in ("B", "H", "M", "N", "D", "DV", "GROUP", "LIST_KVH")]
              + [arg("scale", ParamType.FLOAT)] + constexprs(KEY_CONSTEXPRS))
    return KernelContract("dkdv", entry(nm, "dkdv"), tuple(params),
                          GridRule(key_grid.__doc__ or "", key_grid),
                          "gathered-keys backward: dk, dv per key from its transposed list")


def contracts(k: AttentionKernel, nm: KernelNames) -> tuple[KernelContract, ...]:
    found = [forward_contract(k, nm)]
    if k.grad is not None:
        found += [dq_contract(k, nm), dkdv_contract(k, nm)]
    return tuple(found)


def _printer(k: AttentionKernel, nm: KernelNames) -> TritonPrinter:
    """m, n and h as tile tensors (rows along axis 0, keys along axis 1), loads by name."""
    tiled = {S.m, S.n, S.h, S.qk} | {ld.symbol for ld in k.loads if _tiled(ld)}
    names = {S.m: "offs_m[:, None]", S.n: "offs_n[None, :]", S.h: "hh[:, None]", S.qk: "qk",
             **{ld.symbol: nm.load(ld) for ld in k.loads}}
    return TritonPrinter(names, frozenset(tiled))


def _tiled(ld: Load) -> bool:
    return any(sympy.sympify(i).has(S.m, S.n, S.h) for i in ld.index)


def _load(c: CodeBuilder, ld: Load, k: AttentionKernel, pr: TritonPrinter,
          nm: KernelNames) -> None:
    """A param or input read on the tile; dims indexed by m, n or h are bounds-masked (all of
    them tile tensors, so the mask never mixes a scalar and a tile)."""
    decl = next(d for d in k.inputs if d.name == ld.tensor)
    idx = [pr(i) for i in ld.index]
    addr = " + ".join([nm.tensor(ld.tensor)] + [f"{i} * {nm.stride(ld.tensor, j)}"
                                                 for j, i in enumerate(idx)])
    checks = [f"({i} >= 0) & ({i} < {pr(d)})" for i, d, ix in zip(idx, decl.dims, ld.index)
              if sympy.sympify(ix).has(S.m, S.n, S.h)]
    mask = f", mask={' & '.join(checks)}, other=0" if checks else ""
    cast = ".to(tl.float32)" if decl.kind is TensorKind.PARAM else ""
    c(f"{nm.load(ld)} = tl.load({addr}{mask}){cast}")


def _score(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames,
           valid: str) -> None:
    """s = the score where the key is listed and the remaining mask holds, else -inf."""
    for ld in k.loads:
        _load(c, ld, k, pr, nm)
    s = pr(k.score) if k.score.has(S.qk) else f"{pr(k.score)} + tl.zeros_like(qk)"
    c(f"s = {s}")
    visible = valid if k.mask is None else f"{valid} & {pr(k.mask)}"
    c(f's = tl.where({visible}, s, float("-inf"))')


def generate(k: AttentionKernel, header: str = "") -> GeneratedModule:
    """The module of `k`'s gathered-keys kernels (forward; dq and dk/dv with a Gradient)."""
    draft = KernelNames(k)
    spelled = choose(_generate(k, header, draft).source, draft.users)
    return _generate(k, header, KernelNames(k, spelled))


def _generate(k: AttentionKernel, header: str, nm: KernelNames) -> GeneratedModule:
    assert k.around.gather is not None and k.around.gather.key_block == 1
    pr = _printer(k, nm)
    c = CodeBuilder()
    found = contracts(k, nm)
    _emit_rows(c, k, pr, nm, found[0], backward=False)
    if k.grad is not None:
        c()
        c()
        _emit_rows(c, k, pr, nm, found[1], backward=True)
        c()
        c()
        _emit_dkdv(c, k, pr, nm, found[2])
    return GeneratedModule(module_head(header, pr.helpers, (HELPERS,)) + c.text(), found,
                           dict(nm.users.spelled or {}))


def _emit_rows(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames,
               contract: KernelContract, backward: bool) -> None:
    """The forward (or, `backward`, the dq kernel): one query row of BLOCK_H heads sharing a
    list, walking the list's entries BLOCK_N at a time."""
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{nm.spec}: {contract.doc}; {row_grid.__doc__}"""')
        c("m = tl.program_id(0)")
        c("pid = tl.program_id(1)")
        c("per_b = H // GROUP * CHUNKS")
        c("b = pid // per_b")
        c("kvh = pid % per_b // CHUNKS")
        c("first = pid % CHUNKS * BLOCK_H  # the first of this program's heads in the group")
        c("lane = first + tl.arange(0, BLOCK_H)")
        c("row_ok = lane < GROUP")
        c("# padding rows repeat the group's last head: in range, and never stored")
        c("hh = kvh * GROUP + tl.minimum(lane, GROUP - 1)")
        c("offs_m = m + tl.zeros([BLOCK_H], tl.int32)")
        c("offs_d = tl.arange(0, BLOCK_D)")
        c("offs_dv = tl.arange(0, BLOCK_DV)")
        c("bq = b.to(tl.int64)")
        for t, offs, size in (("q", "offs_d", "D"), ("do", "offs_dv", "DV"))[:1 + backward]:
            c(f"{t} = tl.load({t.upper()} + bq * stride_{t}b + hh[:, None] * stride_{t}h + m * "
              f"stride_{t}m + {offs}[None, :] * stride_{t}d, mask={offs}[None, :] < {size}, "
              "other=0.0)")
        if backward:
            c("lse = tl.load(Lse + (bq * H + hh) * M + m)")
            c("# a row that saw no key (lse -inf) has p = 0 everywhere: exp(s - inf)")
            c('lse = tl.where(lse == float("-inf"), float("inf"), lse)')
            c("delta = tl.load(Delta + (bq * H + hh) * M + m)")
            c("dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)")
        else:
            c('m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)')
            c("l_i = tl.zeros([BLOCK_H], tl.float32)")
            c("acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)")
        c("k_base = K + bq * stride_kb + kvh * stride_kh")
        c("v_base = V + bq * stride_vb + kvh * stride_vh")
        c("head = kvh * GROUP + first  # the list of this program's rows (one, or shared)")
        c("list_base = Lists + bq * ls_b + head * ls_h + m * ls_m")
        c("end = tl.load(Ends + bq * es_b + head * es_h + m * es_m)")
        c("WIDE: tl.constexpr = BLOCK_H >= 16")
        with c.block("for j0 in range(0, end, BLOCK_N):"):
            c("offs_j = j0 + tl.arange(0, BLOCK_N)")
            c("ids = tl.load(list_base + offs_j * ls_k, mask=offs_j < end, other=N)")
            c("listed = ids < N  # N marks padding and duplicates")
            c("offs_n = tl.where(listed, ids, 0)")
            c("kv_ok = listed[:, None] & (offs_d[None, :] < D)")
            c("kn = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, "
              "mask=kv_ok, other=0.0)")
            c("vn = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, "
              "mask=listed[:, None] & (offs_dv[None, :] < DV), other=0.0)")
            c("qk = _rows_qk(q, kn, IEEE, UPCAST, WIDE)")
            _score(c, k, pr, nm, "listed[None, :]")
            if backward:
                assert k.grad is not None
                c(f"p = tl.exp2((s - lse[:, None]) * {LOG2E!r})")
                c("dp = _rows_qk(do, vn, IEEE, UPCAST, WIDE)")
                c(f"ds = p * (dp - delta[:, None]) * ({pr(k.grad.dqk)})")
                c("dq += _rows_pv(_round(ds, kn.dtype, UPCAST), kn, IEEE, UPCAST, WIDE)")
            else:
                c("m_new = tl.maximum(m_i, tl.max(s, 1))")
                c("# rows that have seen no listed key keep max -inf; shift by 0 there")
                c('m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)')
                c(f"p = tl.exp2((s - m_safe[:, None]) * {LOG2E!r})")
                c(f"alpha = tl.exp2((m_i - m_safe) * {LOG2E!r})")
                c("l_i = l_i * alpha + tl.sum(p, 1)")
                c("acc = acc * alpha[:, None] + _rows_pv(_round(p, vn.dtype, UPCAST), vn, IEEE, "
                  "UPCAST, WIDE)")
                c("m_i = m_new")
        if backward:
            c("dq_ptrs = (DQ + bq * stride_dqb + hh[:, None] * stride_dqh + m * stride_dqm")
            c("           + offs_d[None, :] * stride_dqd)")
            c("tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & "
              "(offs_d[None, :] < D))")
            return
        c("empty = l_i == 0.0")
        c("l_safe = tl.where(empty, 1.0, l_i)")
        c("out = acc / l_safe[:, None]")
        c('lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))')
        c("o_ptrs = (Out + bq * stride_ob + hh[:, None] * stride_oh + m * stride_om")
        c("          + offs_dv[None, :] * stride_od)")
        c("tl.store(o_ptrs, _round(out, Out.dtype.element_ty, UPCAST), "
          "mask=row_ok[:, None] & (offs_dv[None, :] < DV))")
        c("tl.store(Lse + (bq * H + hh) * M + m, lse, mask=row_ok)")


def _emit_dkdv(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames,
               contract: KernelContract) -> None:
    """dk and dv of one key from the query rows that list it, BLOCK_M entries at a time."""
    assert k.grad is not None
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{nm.spec}: {contract.doc}; {key_grid.__doc__}"""')
        c("n = tl.program_id(0)")
        c("pid = tl.program_id(1)")
        c("HKV = H // GROUP")
        c("b = pid // HKV")
        c("kvh = pid % HKV")
        c("bq = b.to(tl.int64)")
        c("# lists shared by the heads are transposed per (b, key), others per (b, kv head, key)")
        c("key = (bq * (1 + (HKV - 1) * LIST_KVH) + kvh * LIST_KVH) * N + n")
        c("start = tl.load(Starts + key)")
        c("stop = tl.load(Starts + key + 1)")
        c("offs_n = n + tl.zeros([1], tl.int32)")
        c("offs_d = tl.arange(0, BLOCK_D)")
        c("offs_dv = tl.arange(0, BLOCK_DV)")
        c("k_row = tl.load(K + bq * stride_kb + kvh * stride_kh + n * stride_kn + offs_d[None, :] "
          "* stride_kd, mask=offs_d[None, :] < D, other=0.0)")
        c("v_row = tl.load(V + bq * stride_vb + kvh * stride_vh + n * stride_vn + offs_dv[None, :] "
          "* stride_vd, mask=offs_dv[None, :] < DV, other=0.0)")
        c("dk = tl.zeros([1, BLOCK_D], tl.float32)")
        c("dv = tl.zeros([1, BLOCK_DV], tl.float32)")
        c("heads = GROUP if SHARED else 1")
        c("# a step's rows: BLOCK_M entries x BLOCK_G heads (shared lists; else BLOCK_G is 1)")
        c("offs_r = tl.arange(0, BLOCK_M * BLOCK_G)")
        with c.block("for j0 in range(start, stop, BLOCK_M):"):
            c("offs_j = j0 + offs_r // BLOCK_G")
            c("in_list = offs_j < stop")
            c("r = tl.load(Rows + offs_j, mask=in_list, other=0)")
            with c.block("for g0 in range(0, heads, BLOCK_G):"):
                c("g = g0 + offs_r % BLOCK_G")
                c("ok = in_list & (g < heads)")
                with c.block("if SHARED:  # an entry is a query row, seen by every head"):
                    c("offs_m = r")
                    c("hh = kvh * GROUP + tl.minimum(g, GROUP - 1)")
                with c.block("else:  # an entry is (head in the group) * M + query row"):
                    c("offs_m = r % M")
                    c("hh = kvh * GROUP + r // M")
                c("rq = (bq * H + hh) * M + offs_m")
                c("q = tl.load(Q + bq * stride_qb + hh[:, None] * stride_qh + offs_m[:, None] * "
                  "stride_qm + offs_d[None, :] * stride_qd, mask=ok[:, None] & "
                  "(offs_d[None, :] < D), other=0.0)")
                c("do = tl.load(DO + bq * stride_dob + hh[:, None] * stride_doh + offs_m[:, None] "
                  "* stride_dom + offs_dv[None, :] * stride_dod, mask=ok[:, None] & "
                  "(offs_dv[None, :] < DV), other=0.0)")
                c("lse = tl.load(Lse + rq, mask=ok, other=float(\"inf\"))")
                c('lse = tl.where(lse == float("-inf"), float("inf"), lse)')
                c("delta = tl.load(Delta + rq, mask=ok, other=0.0)")
                c("qk = tl.sum(q.to(tl.float32) * k_row.to(tl.float32), 1)[:, None]")
                _score(c, k, pr, nm, "ok[:, None]")
                c(f"p = tl.exp2((s - lse[:, None]) * {LOG2E!r})")
                c("dp = tl.sum(do.to(tl.float32) * v_row.to(tl.float32), 1)[:, None]")
                c(f"ds = p * (dp - delta[:, None]) * ({pr(k.grad.dqk)})")
                c("dv += tl.sum(p * do.to(tl.float32), 0)[None, :]")
                c("dk += tl.sum(ds * q.to(tl.float32), 0)[None, :]")
        c("tl.store(DK + bq * stride_dkb + kvh * stride_dkh + n * stride_dkn + offs_d[None, :] * "
          "stride_dkd, dk.to(DK.dtype.element_ty), mask=offs_d[None, :] < D)")
        c("tl.store(DVo + bq * stride_dvb + kvh * stride_dvh + n * stride_dvn + offs_dv[None, :] "
          "* stride_dvd, dv.to(DVo.dtype.element_ty), mask=offs_dv[None, :] < DV)")


# --- launches -------------------------------------------------------------------------------------

def pow2(x: int) -> int:
    """A tile covering x: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(x))


# Query heads sharing one list that one program's tile holds at most (rows of its dots).
MAX_HEADS = 64


def default_config(device: torch.device) -> dict[str, int]:
    """BLOCK_N list entries per forward/dq step, BLOCK_M rows per dk/dv step; the interpreter
    runs fewer, larger steps faster. On sm_90 (compiled without a GPU, `attnc inspect`), 128
    entries and 4 warps gave the fewest loop instructions per key among 32/64/128 x 1/2/4 warps
    for 16 heads sharing a list, D 128, without spills."""
    if device.type != "cuda":
        return {"BLOCK_N": 32, "BLOCK_M": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 2}


def _heads(shared: bool, group: int) -> tuple[int, int]:
    """(BLOCK_H, CHUNKS): rows per program and programs per group. Lists shared by the heads
    put a group's heads in one tile (its K/V rows gathered once for all of them)."""
    if not shared:
        return 1, group
    block = min(triton.next_power_of_2(group), MAX_HEADS)
    return block, triton.cdiv(group, block)


def _common(q, k, v, config) -> dict[Bind, object]:
    B, H, M, D = q.shape
    return {Bind(x): val for x, val in dict(
        B=B, H=H, M=M, N=k.shape[2], D=D, DV=v.shape[3], GROUP=H // k.shape[1],
        BLOCK_D=pow2(D), BLOCK_DV=pow2(v.shape[3]),
        IEEE=q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        UPCAST=interpreting()).items()}


def _strides(letters: str, names: str, *tensors: torch.Tensor) -> dict[Bind, object]:
    return {Bind(f"stride_{name}{r}"): s for name, t in zip(names.split(), tensors)
            for r, s in zip(letters, t.stride())}


def _extras(extras) -> dict[Bind, object]:
    out: dict[Bind, object] = {}
    for name, t in extras.items():
        out[Bind("tensor", name)] = t
        out.update({Bind("stride", name, i): s for i, s in enumerate(t.stride())})
    return out


def _list_values(lists: torch.Tensor, ends: torch.Tensor, H: int) -> dict[Bind, object]:
    """The lists and their strides; lists shared by the heads ([B, 1, ...]) read with a head
    stride of 0."""
    lists, ends = lists.expand(-1, H, -1, -1), ends.expand(-1, H, -1)
    return {Bind("Lists"): lists, Bind("Ends"): ends,
            **{Bind(x): s for x, s in zip(LIST_STRIDES, (*lists.stride(), *ends.stride()))}}


def _options(config) -> dict[str, int]:
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def launch_forward(mod: KernelModule, q, k, v, extras, lists, ends, scale: float, config,
                   shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, M, Dv] in q's dtype and lse [B, H, M] fp32 (-inf for a row with no listed
    visible key, whose out is 0). `lists` [B, 1 or H, M, K] int32 prepared by the runtime
    (padding and duplicates = N), `ends` [B, 1 or H, M] its entries before the padding."""
    B, H, M, _ = q.shape
    out = torch.empty(B, H, M, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or M == 0:
        return out, lse
    block_h, chunks = _heads(shared, H // k.shape[1])
    values = {**_common(q, k, v, config), **_strides("bhmd", "q", q),
              **_strides("bhnd", "k v", k, v), **_strides("bhmd", "o", out), **_extras(extras),
              **_list_values(lists, ends, H),
              **{Bind(x): val for x, val in dict(
                  Q=q, K=k, V=v, Out=out, Lse=lse, CHUNKS=chunks, scale=float(scale),
                  BLOCK_H=block_h, BLOCK_N=config["BLOCK_N"]).items()}}
    mod.launch("forward", values, options=_options(config))
    return out, lse


def launch_backward(mod: KernelModule, q, k, v, extras, lists, ends, rows, starts, shared: bool,
                    lse, delta, dout, scale: float, config):
    """dq, dk, dv. `rows` and `starts` are the transposed lists (per key, the query rows that
    list it, in a fixed order: `starts` [keys + 1] offsets into `rows`)."""
    B, H, M, _ = q.shape
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if B * H == 0 or M == 0 or k.shape[2] == 0:
        return dq, dk, dv
    block_h, chunks = _heads(shared, H // k.shape[1])
    # the dk/dv kernel's rows: config BLOCK_M of them, entries times the heads sharing them
    block_g = min(triton.next_power_of_2(H // k.shape[1]), MAX_HEADS) if shared else 1
    common = {**_common(q, k, v, config), **_strides("bhmd", "q do", q, dout),
              **_strides("bhnd", "k v", k, v), **_extras(extras),
              **{Bind(x): val for x, val in dict(
                  Q=q, K=k, V=v, DO=dout, Lse=lse, Delta=delta, scale=float(scale)).items()}}
    mod.launch("dq", {**common, **_strides("bhmd", "dq", dq), **_list_values(lists, ends, H),
                      **{Bind(x): val for x, val in dict(
                          DQ=dq, CHUNKS=chunks, BLOCK_H=block_h,
                          BLOCK_N=config["BLOCK_N"]).items()}},
               options=_options(config))
    mod.launch("dkdv", {**common, **_strides("bhnd", "dk dv", dk, dv),
                        **{Bind(x): val for x, val in dict(
                            DK=dk, DVo=dv, Rows=rows, Starts=starts, SHARED=shared,
                            LIST_KVH=0 if shared else 1, BLOCK_G=block_g,
                            BLOCK_M=max(1, config["BLOCK_M"] // block_g)).items()}},
               options=_options(config))
    return dq, dk, dv
