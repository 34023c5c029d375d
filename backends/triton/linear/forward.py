"""Generate Triton source for a ScanPlan: a fused recurrent kernel, for a chunked scan a fused
chunked kernel, and for a sequential scan whose steps sympy differentiates, the generated
recurrent backward (backends/triton/linear/recurrent_backward.py).

Both forward kernels run one program per (sequence, head, value tile) and keep every state in
registers in fp32. The recurrent kernel walks t one step at a time (any update: the
expressions are printed as [BK|1, BV|1] tiles, i along rows, j along columns); it also serves
one-step decoding. The chunked kernel walks chunks of BT steps: per state it forms the
intra-chunk masked products with decay (for delta rules, the WY/UT form with a blocked
unit-triangular inverse) and passes the state on; per-step expressions are printed as
[BT, features] tiles (t along rows), computed in fp32, and every product with the state or
the values multiplies operands rounded to the inputs' dtype (bf16/fp16 tensor cores, fp32
accumulation; exact fp32 for fp32 inputs). States travel as contiguous fp32
[N, H, I, J] (I = DK or 1, J = DV or 1). The signatures are the contracts below; names the spec
chose are placeholders until `generate` spells them out (backends/triton/names.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
import triton

from attnc.backends.triton.contract import (Bind, GeneratedModule, GridRule, KernelContract, Param,
                                            ParamType, arg)
from attnc.backends.triton.names import UserNames, choose
from attnc.backends.triton.prelude import PRELUDE
from attnc.backends.triton.printer import HELPERS, TritonPrinter
from attnc.backends.triton.source import CodeBuilder
from attnc.expr import symbols as S
from attnc.ir.linear import (DK, DV, LinearScan, StatePlan, T, UpdateClass, i, read, reads,
                             step_axes, t)
from attnc.ir.linear_kernel import Algorithm, ScanBackward, ScanPlan

_STATE_MASK = {("i", "j"): "m_ij", ("i",): "m_i", ("j",): "m_j", (): "m_0"}
_STATE_SHAPE = {("i", "j"): "[BK, BV]", ("i",): "[BK, 1]", ("j",): "[1, BV]", (): "[1, 1]"}
_STATE_OFFS = {("i", "j"): "offs_i[:, None] * DV + offs_j[None, :]", ("i",): "offs_i[:, None]",
               ("j",): "offs_j[None, :]", (): "tl.zeros([1, 1], tl.int32)"}
INT = ParamType.INT


class ScanNames:
    """How the generated code spells each name the spec chose (placeholders in a draft, else as
    `spelled`): the scan, its tensors and its states."""

    def __init__(self, scan: LinearScan, spelled: Mapping[str, str] | None = None):
        self.users = UserNames([scan.name] + [d.name for d in scan.step_tensors]
                               + [s.name for s in scan.states], spelled)

    def __call__(self, name: str) -> str:
        return self.users.of(name)


class _Printer(TritonPrinter):
    """Element-form expressions as tiles; `orient` is "step" (i rows, j columns) or "chunk"
    (t rows, the one feature axis along columns)."""

    def __init__(self, names: dict, orient: str):
        super().__init__(names)
        self.orient = orient

    def p(self, ex) -> str:
        if isinstance(ex, sympy.Sum):  # sympy merges nested sums: one limit per contraction
            text = self.p(ex.args[0])
            for axis, *_ in ex.args[1:]:
                if self.orient == "chunk":
                    mask, dim = ("cm_i" if axis == i else "cm_j"), 1
                else:
                    mask, dim = ("m_i", 0) if axis == i else ("m_j", 1)
                text = f"tl.sum(tl.where({mask}, {text}, 0.0), axis={dim}, keep_dims=True)"
            return text
        return super().p(ex)


def value_tiles_grid(v) -> tuple[int, int, int]:
    """One program per (sequence, head, value tile)."""
    return v["sequences"], v["H"], triton.cdiv(v["DV"], v["BV"])


def tensor_params(scan: LinearScan, nm: ScanNames) -> tuple[list[Param], list[Param]]:
    """The declared tensors the kernels read (any float dtype; fp32 stands for them in AOT
    signatures) and their strides."""
    pointers = [Param(f"x_{nm(d.name)}", ParamType.FP32_PTR, Bind("tensor", d.name))
                for d in scan.step_tensors]
    strides = [Param(f"sx_{nm(d.name)}_{n}", INT, Bind("stride", d.name, n))
               for d in scan.step_tensors for n in range(len(d.dims))]
    return pointers, strides


def states(scan: LinearScan, role: str, prefix: str, nm: ScanNames) -> list[Param]:
    """One fp32 pointer per state: `<prefix>_<state>`, bound as (role, state)."""
    return [Param(f"{prefix}_{nm(s.name)}", ParamType.FP32_PTR, Bind(role, s.name))
            for s in scan.states]


def forward_contract(scan: LinearScan, algorithm: Algorithm, nm: ScanNames) -> KernelContract:
    """q, k, v, o, declared tensors, initial and final states, cu_seqlens; strides of q, k, v,
    o (b, h, t), each declared tensor's strides; T, H, DK, DV, scale; the constexprs. q and k
    are fp32 when feature maps ran before the kernel."""
    qk = ParamType.FP32_PTR if scan.maps else ParamType.DATA
    pointers, strides = tensor_params(scan, nm)
    params = ([arg("q", qk), arg("k", qk), arg("v", ParamType.DATA), arg("o", ParamType.DATA)]
              + pointers + states(scan, "init", "init", nm) + states(scan, "final", "final", nm)
              + [arg("cu_seqlens", ParamType.I32_PTR)]
              + [arg(f"s{x}_{a}", INT) for x in "qkvo" for a in "bht"] + strides
              + [arg(x, INT) for x in ("T", "H", "DK", "DV")] + [arg("scale", ParamType.FLOAT)]
              + [arg(x, ParamType.CONSTEXPR) for x in
                 ("HAS_INIT", "STORE_FINAL", "VARLEN", "BK", "BV")
                 + (("BT",) if algorithm is Algorithm.CHUNKED else ()) + ("IEEE", "UPCAST")])
    doc = ("chunks of BT steps: intra-chunk products and state passing"
           if algorithm is Algorithm.CHUNKED else "one step at a time")
    return KernelContract(algorithm.value, f"{nm(scan.name)}_{algorithm.value}", tuple(params),
                          GridRule(value_tiles_grid.__doc__ or "", value_tiles_grid), doc)


def generate(plan: ScanPlan, header: str = "") -> GeneratedModule:
    """The module of a plan's generated kernels (the chunked backward's core kernels are
    static: backends/triton/linear/core.py); a draft with placeholders picks the spellings of
    the spec's names (backends/triton/names.py)."""
    draft = ScanNames(plan.scan)
    spelled = choose(_generate(plan, header, draft).source, draft.users)
    return _generate(plan, header, ScanNames(plan.scan, spelled))


def _generate(plan: ScanPlan, header: str, nm: ScanNames) -> GeneratedModule:
    from attnc.backends.triton.linear.recurrent_backward import emit  # it builds on this module
    scan = plan.scan
    c = CodeBuilder()
    if header:
        c(f"# {header}")
    c("import triton")
    c("import triton.language as tl")
    c(PRELUDE)
    body = CodeBuilder()
    contract, pr = _emit_recurrent(body, scan, nm)
    contracts, helpers = [contract], set(pr.helpers)
    if plan.chunked:
        contract, pr = _emit_chunked(body, scan, nm)
        contracts.append(contract)
        helpers |= pr.helpers
    if plan.backward is ScanBackward.RECURRENT:
        backward = CodeBuilder()
        contract, pr = emit(backward, scan, _names(scan, "t", nm), _Printer, nm)
        body.lines.append(backward.text())
        contracts.append(contract)
        helpers |= pr.helpers
    for name in sorted(helpers):
        c(HELPERS[name])
    return GeneratedModule(c.text() + body.text(), tuple(contracts),
                           dict(nm.users.spelled or {}))


# --- shared pieces -----------------------------------------------------------------------------
def _program_prologue(c: CodeBuilder) -> None:
    c("n = tl.program_id(0)")
    c("hh = tl.program_id(1)")
    c("pv = tl.program_id(2)")
    with c.block("if VARLEN:"):
        c("bos = tl.load(cu_seqlens + n).to(tl.int64)")
        c("seq_len = (tl.load(cu_seqlens + n + 1).to(tl.int64) - bos).to(tl.int32)")
        c("bb = 0")
    with c.block("else:"):
        c("bos = 0")
        c("seq_len = T")
        c("bb = n")
    c("offs_i = tl.arange(0, BK)")
    c("offs_j = pv * BV + tl.arange(0, BV)")
    c("mask_i = offs_i < DK")
    c("mask_j = offs_j < DV")
    c("m_i = mask_i[:, None]")
    c("m_j = mask_j[None, :]")
    c("m_ij = m_i & m_j")
    c("m_0 = tl.full([1, 1], 1, tl.int1)")


def _state_base(s) -> str:
    size = {("i", "j"): "DK * DV", ("i",): "DK", ("j",): "DV", (): "1"}[s.axes]
    return f"(n * H + hh).to(tl.int64) * {size}"


def _load_states(c: CodeBuilder, scan: LinearScan, row_vectors: bool, nm: ScanNames) -> None:
    """Initial states; with `row_vectors` a vector state z[i] is kept as a [1, BK] row."""
    for s in scan.states:
        shape, mask, offs = _STATE_SHAPE[s.axes], _STATE_MASK[s.axes], _STATE_OFFS[s.axes]
        c(f"st_{nm(s.name)} = tl.zeros({shape}, tl.float32)")
        with c.block("if HAS_INIT:"):
            c(f"st_{nm(s.name)} = tl.load(init_{nm(s.name)} + {_state_base(s)} + "
              f"{offs}, mask={mask}, "
              "other=0.0)")
        if row_vectors and s.axes == ("i",):
            c(f"st_{nm(s.name)} = tl.trans(st_{nm(s.name)})")


def _store_states(c: CodeBuilder, scan: LinearScan, row_vectors: bool, nm: ScanNames) -> None:
    with c.block("if STORE_FINAL:"):
        for s in scan.states:
            value = f"st_{nm(s.name)}"
            if row_vectors and s.axes == ("i",):
                value = f"tl.trans({value})"
            store = (f"tl.store(final_{nm(s.name)} + {_state_base(s)} + {_STATE_OFFS[s.axes]}, "
                     f"{value}, mask={_STATE_MASK[s.axes]})")
            if "j" in s.axes:
                c(store)
            else:  # every value tile holds the same copy; the first stores it
                with c.block("if pv == 0:"):
                    c(store)


def _decl_offset(d, time: str | None, feature: dict, nm: ScanNames) -> str:
    parts = []
    for n, dim in enumerate(d.dims):
        index = {S.B: "bb", S.H: "hh", T: time}.get(dim) or feature.get(dim)
        parts.append(f"{index} * sx_{nm(d.name)}_{n}")
    return " + ".join(parts) if parts else "0"


# --- the recurrent kernel ----------------------------------------------------------------------
def _names(scan: LinearScan, suffix: str, nm: ScanNames) -> dict:
    """Kernel variable names of the per-step values: q_t, x_beta_t, ... (q_c, ... in chunks)."""
    # t and h are integers, as sympy knows them: t % 4 prints as integer modulo, and the
    # printer converts them where a float function takes them (t in int64: t * t may pass
    # 2^31 on long sequences)
    names = {S.scale: "scale", S.h: "hh", S.H: "H", DK: "DK", DV: "DV", t: "t_i"}
    for x, axis in (("q", "i"), ("k", "i"), ("v", "j")):
        names[read(x, (axis,))] = f"{x}_{suffix}"
    for d in scan.step_tensors:
        names[read(d.name, step_axes(d))] = f"x_{nm(d.name)}_{suffix}"
    return names


def _emit_recurrent(c: CodeBuilder, scan: LinearScan,
                    nm: ScanNames) -> tuple[KernelContract, TritonPrinter]:
    names = _names(scan, "t", nm)
    for s in scan.states:
        names[read(s.name, s.axes)] = f"st_{nm(s.name)}"
    pr = _Printer(names, "step")
    used = set().union(*map(reads, [u.expr for u in scan.updates] + [scan.output]))
    c("@triton.jit")
    contract = forward_contract(scan, Algorithm.RECURRENT, nm)
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        _program_prologue(c)
        _load_states(c, scan, False, nm)
        for d in scan.step_tensors:
            if T not in d.dims and d.name in used:
                c(f"x_{nm(d.name)}_t = {_step_load(d, 'bos', nm)}")
        with c.block("for tt in range(0, seq_len):"):
            c("row = bos + tt")
            c("t_i = tt + tl.zeros([1, 1], tl.int64)")
            emit_step_loads(c, scan, used, nm)
            for u in scan.updates:
                s = scan.state(u.state)
                # the padded lanes (i >= DK, j >= DV) are never read unmasked: sums mask them,
                # stores skip them. A mask here would keep BK x BV predicates live (spills at
                # BK = 128); the where on all lanes only broadcasts the update to the state's
                # shape, and folds away.
                every = f"tl.full({_STATE_SHAPE[s.axes]}, 1, tl.int1)"
                c(f"st_{nm(s.name)} = tl.where({every}, {pr(u.expr)}, 0.0)")
            c(f"o_t = tl.where(m_j, {pr(scan.output)}, 0.0)")
            c("tl.store(o + bb * so_b + hh * so_h + row * so_t + offs_j, "
              "tl.sum(o_t, axis=0).to(o.dtype.element_ty), mask=mask_j)")
        _store_states(c, scan, False, nm)
    c()
    return contract, pr


def emit_step_loads(c: CodeBuilder, scan: LinearScan, used, nm: ScanNames,
                    chunk: bool = False) -> None:
    """The rows of q, k, v and of the per-step inputs among `used` at step `row`: step tiles
    (q_t [BK, 1], v_t [1, BV]), or with `chunk` the chunk's rows (q_c [BT, BK], v_c [BT, BV])."""
    for x, axis in (("q", "i"), ("k", "i"), ("v", "j")):
        if x not in used:
            continue
        offs = "offs_i" if axis == "i" else "offs_j"
        if chunk:
            c(f"{x}_c = tl.load({x} + bb * s{x}_b + hh * s{x}_h + row[:, None] * s{x}_t "
              f"+ {offs}[None, :], mask=tm & c{'m_i' if axis == 'i' else 'm_j'}, "
              "other=0.0).to(tl.float32)")
        else:
            tail = "[:, None]" if axis == "i" else "[None, :]"
            c(f"{x}_t = tl.load({x} + bb * s{x}_b + hh * s{x}_h + row * s{x}_t + {offs}, "
              f"mask={'mask_i' if axis == 'i' else 'mask_j'}, other=0.0).to(tl.float32){tail}")
    for d in scan.step_tensors:
        if T in d.dims and d.name in used:
            load = _chunk_load(d, "row", nm) if chunk else _step_load(d, "row", nm)
            c(f"x_{nm(d.name)}_{'c' if chunk else 't'} = {load}")


def _step_load(d, time: str, nm: ScanNames) -> str:
    axes = step_axes(d)
    feature = {DK: "offs_i[:, None]", DV: "offs_j[None, :]"}
    off = _decl_offset(d, time, feature, nm)
    if not axes:
        return f"tl.load(x_{nm(d.name)} + {off}).to(tl.float32)"
    mask = {("i",): "m_i", ("j",): "m_j", ("i", "j"): "m_ij"}[axes]
    return f"tl.load(x_{nm(d.name)} + {off}, mask={mask}, other=0.0).to(tl.float32)"


# --- the chunked kernel ------------------------------------------------------------------------
def _emit_chunked(c: CodeBuilder, scan: LinearScan,
                  nm: ScanNames) -> tuple[KernelContract, TritonPrinter]:
    sch = scan.schedule
    assert sch is not None and sch.output is not None
    names = _names(scan, "c", nm)
    for r in sch.readouts:
        names[r.symbol] = f"rd_{r.symbol}"
    pr = _Printer(names, "chunk")
    exprs = [sch.output] + [r.query for r in sch.readouts]
    for p in sch.states:
        exprs += [p.key, p.value, p.log_decay, p.beta]
    used = set().union(*map(reads, exprs))
    c("@triton.jit")
    contract = forward_contract(scan, Algorithm.CHUNKED, nm)
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        _program_prologue(c)
        c("offs_t = tl.arange(0, BT)")
        c("cm_i = mask_i[None, :]")
        c("cm_j = mask_j[None, :]")
        c("lower = offs_t[:, None] >= offs_t[None, :]")
        c("strict = offs_t[:, None] > offs_t[None, :]")
        c("col_t = tl.zeros([BT, 1], tl.float32)")
        _load_states(c, scan, True, nm)
        for d in scan.step_tensors:
            if T not in d.dims and d.name in used:
                c(f"x_{nm(d.name)}_c = {_chunk_load(d, None, nm)}")
        with c.block("for c0 in range(0, seq_len, BT):"):
            c("tpos = c0 + offs_t")
            c("tmask = tpos < seq_len")
            c("tm = tmask[:, None]")
            c("row = bos + tpos")
            c("t_i = tpos.to(tl.int64)[:, None]")
            emit_step_loads(c, scan, used, nm, chunk=True)
            # vector states first: their [BT, 1] readouts stay live through the matrix
            # states' work, where a matrix readout [BT, BV] would cost BV times the registers
            for plan in sorted(sch.states, key=lambda p: "j" in scan.state(p.state).axes):
                _emit_state_chunk(c, scan, plan, pr, nm)
            c(f"o_c = tl.where(tm & cm_j, {pr(sch.output)}, 0.0)")
            c("tl.store(o + bb * so_b + hh * so_h + row[:, None] * so_t + offs_j[None, :], "
              "o_c.to(o.dtype.element_ty), mask=tm & cm_j)")
        _store_states(c, scan, True, nm)
    c()
    return contract, pr


def _chunk_load(d, time: str | None, nm: ScanNames) -> str:
    axes = step_axes(d)
    feature = {DK: "offs_i[None, :]", DV: "offs_j[None, :]"}
    t_index = "row[:, None]" if time else None
    off = _decl_offset(d, t_index, feature, nm)
    if time is None:  # per (b, h) or per head: one value, or one row of features
        mask = {(): None, ("i",): "cm_i", ("j",): "cm_j"}[axes]
        extra = f", mask={mask}, other=0.0" if mask else ""
        return f"tl.load(x_{nm(d.name)} + {off}{extra}).to(tl.float32)"
    mask = {(): "tm", ("i",): "tm & cm_i", ("j",): "tm & cm_j"}[axes]
    return f"tl.load(x_{nm(d.name)} + {off}, mask={mask}, other=0.0).to(tl.float32)"


def _emit_state_chunk(c: CodeBuilder, scan: LinearScan, plan: StatePlan, pr,
                      nm: ScanNames) -> None:
    s = scan.state(plan.state)
    st = f"st_{nm(s.name)}"
    matrix = "j" in s.axes
    assert scan.schedule is not None
    readers = [r for r in scan.schedule.readouts if r.state == s.name]
    c(f"# state {nm(s.name)}: {plan.kind.value}")
    c(f"kk = tl.where(tm & cm_i, {pr(plan.key)} + col_t, 0.0)")
    if matrix:
        c(f"vv = tl.where(tm & cm_j, {pr(plan.value)} + col_t, 0.0)")
    else:
        c(f"vv = tl.where(tm, {pr(plan.value)} + col_t, 0.0)")
    if plan.kind is UpdateClass.DIAGONAL_DECAY:
        c(f"gg = tl.where(tm & cm_i, {pr(plan.log_decay)} + col_t, 0.0)")
        c("G = tl.cumsum(gg, axis=0)")
        c("g_last = tl.sum(gg, axis=0)")
        c("k_end = kk * tl.exp(g_last[None, :] - G)")
        # exp(G_t - G_s) split as exp(G_t) * exp(-G_s): exact while a chunk's summed log-decay
        # stays above about -80 (fp32 range); chunks are kept short (BT = 16) for this form
        c("k_in = kk * tl.exp(-G)")
        for r in readers:
            c(f"xq = tl.where(tm & cm_i, {pr(r.query)} + col_t, 0.0) * tl.exp(G)")
            scores = f"tl.where(lower, {_dot('xq', 'tl.trans(k_in)')}, 0.0)"
            c(f"rd_{r.symbol} = {_inter(matrix, st)} + " + _mix(matrix, scores))
        decay_state = "tl.exp(g_last)[:, None]" if matrix else "tl.exp(g_last)[None, :]"
        c(f"{st} = {st} * {decay_state} + " + _write(matrix, "k_end"))
        return
    decayed = plan.log_decay != 0
    if decayed:
        c(f"gs = tl.sum(tl.where(tm, {pr(plan.log_decay)} + col_t, 0.0), axis=1)")
        c("G = tl.cumsum(gs, axis=0)")
        c("g_last = tl.sum(gs, axis=0)")
        c("decay = tl.where(lower, tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0)), 0.0)")
        c("k_end = kk * tl.exp(g_last - G)[:, None]")
    else:  # no decay (linear attention, delta net): the products need no exponentials
        c("decay = tl.where(lower, 1.0, 0.0)")
        c("k_end = kk")
    if plan.kind.delta:
        c(f"bt = tl.sum(tl.where(tm, {pr(plan.beta)} + col_t, 0.0), axis=1)")
        c(f"a_low = tl.where(strict, decay * {_dot('kk', 'tl.trans(kk)')}, 0.0) * bt[:, None]")
        _emit_unit_lower_inverse(c)
        # the WY/UT form's new values T (beta v - beta k' S), T = tinv; one product with the
        # state and one with tinv (u - w S with u = T beta v, w = T beta k' takes one more)
        w_keys = "kk * (bt * tl.exp(G))[:, None]" if decayed else "kk * bt[:, None]"
        c(f"vv = {_dot('tinv', f'vv * bt[:, None] - {_dot(w_keys, st)}')}")
    for r in readers:
        c(f"xq = tl.where(tm & cm_i, {pr(r.query)} + col_t, 0.0)")
        intra = f"{_dot('xq', 'tl.trans(kk)')} * decay"
        inter = f"{_inter(matrix, st)} * tl.exp(G)[:, None]" if decayed else _inter(matrix, st)
        c(f"rd_{r.symbol} = {inter} + " + _mix(matrix, intra))
    c(f"{st} = {st}{' * tl.exp(g_last)' if decayed else ''} + " + _write(matrix, "k_end"))


def _emit_unit_lower_inverse(c: CodeBuilder) -> None:
    """tinv = (I + a_low)^-1, a_low strictly lower triangular [BT, BT], blocked: the diagonal
    16 x 16 blocks D by forward substitution, all blocks at once (15 serial steps, not BT - 1),
    then with L the blocks below them and N = -D^-1 L (N^(BT/16) = 0),
    (D + L)^-1 = (I + N + N^2 + ...) D^-1 = ... (I + N^4)(I + N^2)(I + N) D^-1: one pair of
    products per doubling. These products take fp32 operands (tf32 tensor cores for bf16/fp16
    inputs, IEEE for fp32), not the inputs' dtype: the inverse multiplies the values and the
    keys next, and bf16 operands here raised the chunked delta rule's error on correlated keys
    from about 0.7% to 1.3% (relative, bf16 inputs), against 0.3% for the output's rounding."""
    c("blk = (offs_t[:, None] // 16) == (offs_t[None, :] // 16)")
    c("tinv = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)")
    # row r of each diagonal block of (I + a_low)^-1 is e_r - sum_s a_low[r, s] tinv[s, :], s
    # in the block: row r of every block at once
    with c.block("for r in range(1, 16):"):
        c("at_r = ((offs_t % 16) == r)[:, None]")
        c("t_rows = tl.where(at_r, tinv, 0.0) - "
          "_dot(tl.where(at_r & blk, a_low, 0.0), tinv, IEEE, UPCAST)")
        c("tinv = tl.where(at_r, t_rows, tinv)")
    with c.block("if BT > 16:"):
        c("nn = -_dot(tinv, tl.where(blk, 0.0, a_low), IEEE, UPCAST)")
        with c.block("for level in tl.static_range(3):"):
            with c.block("if (16 << level) < BT:"):
                c("tinv = tinv + _dot(nn, tinv, IEEE, UPCAST)")
                c("nn = _dot(nn, nn, IEEE, UPCAST)")


def _inter(matrix: bool, st: str) -> str:
    """The chunk's queries xq read the state entering the chunk: xq @ S, or xq . z per row."""
    if matrix:
        return _dot("xq", st)
    return f"tl.sum(xq * {st}, axis=1, keep_dims=True)"


def _mix(matrix: bool, scores: str) -> str:
    """scores [BT, BT] applied to the values vv: a dot for a matrix state, a sum for a vector."""
    if matrix:
        return _dot(scores, "vv")
    return f"tl.sum({scores} * tl.trans(vv), axis=1, keep_dims=True)"


def _write(matrix: bool, keys: str) -> str:
    if matrix:
        return _dot(f"tl.trans({keys})", "vv")
    return f"tl.sum({keys} * vv, axis=0, keep_dims=True)"


def _dot(a: str, b: str) -> str:
    """a @ b on tensor cores in the inputs' dtype (o's element type), accumulated in fp32: the
    operands are fp32 values (states, decayed keys, scores) rounded once to bf16/fp16, as fla's
    kernels do; with fp32 inputs the rounding is the identity and IEEE keeps products exact."""
    return (f"_dot(_round({a}, o.dtype.element_ty, UPCAST), "
            f"_round({b}, o.dtype.element_ty, UPCAST), IEEE, UPCAST)")
