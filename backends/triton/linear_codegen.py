"""Generate Triton source for a scheduled LinearScan: a fused recurrent kernel, and for a
chunked schedule a fused chunked kernel.

Both kernels run one program per (sequence, head, value tile) and keep every state in
registers in fp32. The recurrent kernel walks t one step at a time (any update: the
expressions are printed as [BK|1, BV|1] tiles, i along rows, j along columns); it also serves
one-step decoding. The chunked kernel walks chunks of BT steps: per state it forms the
intra-chunk masked products with decay (for delta rules, the WY/UT form with a forward
substitution for the unit-triangular inverse) and passes the state on; per-step expressions
are printed as [BT, features] tiles (t along rows).

Argument order (the launcher's contract): q, k, v, o, declared tensors, initial states, final
states, cu_seqlens; strides of q, k, v, o (b, h, t), each declared tensor's strides; T, H, DK,
DV, scale; constexprs HAS_INIT, STORE_FINAL, VARLEN, BK, BV, (BT), IEEE, UPCAST. States travel
as contiguous fp32 [N, H, I, J] (I = DK or 1, J = DV or 1).
"""

from __future__ import annotations

import functools

import sympy

from attnc import symbols as S
from attnc.backends.triton.codegen import PRELUDE, CodeBuilder
from attnc.backends.triton.printer import HELPERS, TritonPrinter
from attnc.linear_ir import DK, DV, T, LinearScan, StatePlan, i, read, reads, step_axes, t

_STATE_MASK = {("i", "j"): "m_ij", ("i",): "m_i", ("j",): "m_j", (): "m_0"}
_STATE_SHAPE = {("i", "j"): "[BK, BV]", ("i",): "[BK, 1]", ("j",): "[1, BV]", (): "[1, 1]"}
_STATE_OFFS = {("i", "j"): "offs_i[:, None] * DV + offs_j[None, :]", ("i",): "offs_i[:, None]",
               ("j",): "offs_j[None, :]", (): "tl.zeros([1, 1], tl.int32)"}


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


def kernel_names(scan: LinearScan) -> dict[str, str]:
    names = {"recurrent": f"{scan.name}_recurrent"}
    if chunk_supported(scan) is None:
        names["chunked"] = f"{scan.name}_chunked"
    if recurrent_backward(scan) is not None:
        names["recurrent_bwd"] = f"{scan.name}_recurrent_bwd"
    return names


@functools.lru_cache(maxsize=64)
def recurrent_backward(scan: LinearScan) -> tuple[str, frozenset] | None:
    """The fused recurrent backward's source and helpers; None when a chunked scan does not need
    it (its backward is the chunked core's) or a VJP cannot be derived."""
    from attnc.backends.triton import linear_recurrent_bwd as bwd
    if chunk_supported(scan) is None:
        return None
    c = CodeBuilder()
    try:
        pr = bwd.emit(c, scan, _names(scan, "t"), _Printer)
    except bwd.NotDifferentiable:
        return None
    return c.text(), frozenset(pr.helpers)


def chunk_supported(scan: LinearScan) -> str | None:
    """None when the chunked kernel covers this schedule, else why not."""
    sch = scan.schedule
    if sch is None or not sch.chunked:
        return sch.reason if sch is not None else "not scheduled"
    for plan in sch.states:
        axes = scan.state(plan.state).axes
        if "i" not in axes:
            return f"the chunked kernel needs a key axis on state {plan.state}"
        if plan.kind in ("delta_rule", "gated_delta_rule") and "j" not in axes:
            return f"the chunked delta-rule kernel needs a matrix state ({plan.state})"
    return None


def tensor_args(scan: LinearScan) -> list:
    """Declared tensors the kernels read (a feature map's weights are the prologue's)."""
    mapped = {p for mp in scan.maps for p in mp.params}
    return [d for d in scan.decls if d.name not in mapped]


def kernel_args(scan: LinearScan, chunked: bool) -> list[str]:
    args = ["q", "k", "v", "o"] + [f"x_{d.name}" for d in tensor_args(scan)]
    args += [f"init_{s.name}" for s in scan.states] + [f"final_{s.name}" for s in scan.states]
    args += ["cu_seqlens"] + [f"s{x}_{a}" for x in "qkvo" for a in "bht"]
    args += [f"sx_{d.name}_{n}" for d in tensor_args(scan) for n in range(len(d.dims))]
    args += ["T", "H", "DK", "DV", "scale", "HAS_INIT: tl.constexpr", "STORE_FINAL: tl.constexpr",
             "VARLEN: tl.constexpr", "BK: tl.constexpr", "BV: tl.constexpr"]
    if chunked:
        args.append("BT: tl.constexpr")
    return args + ["IEEE: tl.constexpr", "UPCAST: tl.constexpr"]


def generate(scan: LinearScan, header: str = "") -> str:
    c = CodeBuilder()
    if header:
        c(f"# {header}")
    c("import triton")
    c("import triton.language as tl")
    c(PRELUDE)
    body = CodeBuilder()
    printers = [_emit_recurrent(body, scan)]
    if chunk_supported(scan) is None:
        printers.append(_emit_chunked(body, scan))
    helpers = set().union(*(p.helpers for p in printers))
    backward = recurrent_backward(scan)
    if backward is not None:
        body.lines.append(backward[0])
        helpers |= backward[1]
    for name in sorted(helpers):
        c(HELPERS[name])
    return c.text() + body.text()


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
    c("hh_f = hh.to(tl.float32)")
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


def _load_states(c: CodeBuilder, scan: LinearScan, row_vectors: bool) -> None:
    """Initial states; with `row_vectors` a vector state z[i] is kept as a [1, BK] row."""
    for s in scan.states:
        shape, mask, offs = _STATE_SHAPE[s.axes], _STATE_MASK[s.axes], _STATE_OFFS[s.axes]
        c(f"st_{s.name} = tl.zeros({shape}, tl.float32)")
        with c.block("if HAS_INIT:"):
            c(f"st_{s.name} = tl.load(init_{s.name} + {_state_base(s)} + {offs}, mask={mask}, "
              "other=0.0)")
        if row_vectors and s.axes == ("i",):
            c(f"st_{s.name} = tl.trans(st_{s.name})")


def _store_states(c: CodeBuilder, scan: LinearScan, row_vectors: bool) -> None:
    with c.block("if STORE_FINAL:"):
        for s in scan.states:
            value = f"st_{s.name}"
            if row_vectors and s.axes == ("i",):
                value = f"tl.trans({value})"
            store = (f"tl.store(final_{s.name} + {_state_base(s)} + {_STATE_OFFS[s.axes]}, "
                     f"{value}, mask={_STATE_MASK[s.axes]})")
            if "j" in s.axes:
                c(store)
            else:  # every value tile holds the same copy; the first stores it
                with c.block("if pv == 0:"):
                    c(store)


def _decl_offset(d, time: str, feature: dict) -> str:
    parts = []
    for n, dim in enumerate(d.dims):
        index = {S.B: "bb", S.H: "hh", T: time}.get(dim) or feature.get(dim)
        parts.append(f"{index} * sx_{d.name}_{n}")
    return " + ".join(parts) if parts else "0"


# --- the recurrent kernel ----------------------------------------------------------------------
def _names(scan: LinearScan, suffix: str) -> dict:
    """Kernel variable names of the per-step values: q_t, x_beta_t, ... (q_c, ... in chunks)."""
    names = {S.scale: "scale", S.h: "hh_f", S.H: "H", DK: "DK", DV: "DV", t: "t_f"}
    for x, axis in (("q", "i"), ("k", "i"), ("v", "j")):
        names[read(x, (axis,))] = f"{x}_{suffix}"
    for d in tensor_args(scan):
        names[read(d.name, step_axes(d))] = f"x_{d.name}_{suffix}"
    return names


def _emit_recurrent(c: CodeBuilder, scan: LinearScan) -> TritonPrinter:
    names = _names(scan, "t")
    for s in scan.states:
        names[read(s.name, s.axes)] = f"st_{s.name}"
    pr = _Printer(names, "step")
    used = set().union(*map(reads, [u.expr for u in scan.updates] + [scan.output]))
    c("@triton.jit")
    c.call(f"def {scan.name}_recurrent(", kernel_args(scan, chunked=False), "):")
    with c.indented():
        _program_prologue(c)
        _load_states(c, scan, row_vectors=False)
        for d in tensor_args(scan):
            if T not in d.dims and d.name in used:
                c(f"x_{d.name}_t = {_step_load(d, 'bos')}")
        with c.block("for tt in range(0, seq_len):"):
            c("row = bos + tt")
            c("t_f = tt * 1.0")
            emit_step_loads(c, scan, used)
            for u in scan.updates:
                s = scan.state(u.state)
                c(f"st_{s.name} = tl.where({_STATE_MASK[s.axes]}, {pr(u.expr)}, 0.0)")
            c(f"o_t = tl.where(m_j, {pr(scan.output)}, 0.0)")
            c("tl.store(o + bb * so_b + hh * so_h + row * so_t + offs_j, "
              "tl.sum(o_t, axis=0).to(o.dtype.element_ty), mask=mask_j)")
        _store_states(c, scan, row_vectors=False)
    c()
    return pr


def emit_step_loads(c: CodeBuilder, scan: LinearScan, used, chunk: bool = False) -> None:
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
    for d in tensor_args(scan):
        if T in d.dims and d.name in used:
            load = _chunk_load(d, "row") if chunk else _step_load(d, "row")
            c(f"x_{d.name}_{'c' if chunk else 't'} = {load}")


def _step_load(d, time: str) -> str:
    axes = step_axes(d)
    feature = {DK: "offs_i[:, None]", DV: "offs_j[None, :]"}
    off = _decl_offset(d, time, feature)
    if not axes:
        return f"tl.load(x_{d.name} + {off}).to(tl.float32)"
    mask = {("i",): "m_i", ("j",): "m_j", ("i", "j"): "m_ij"}[axes]
    return f"tl.load(x_{d.name} + {off}, mask={mask}, other=0.0).to(tl.float32)"


# --- the chunked kernel ------------------------------------------------------------------------
def _emit_chunked(c: CodeBuilder, scan: LinearScan) -> TritonPrinter:
    sch = scan.schedule
    names = _names(scan, "c")
    for r in sch.readouts:
        names[r.symbol] = f"rd_{r.symbol}"
    pr = _Printer(names, "chunk")
    exprs = [sch.output] + [r.query for r in sch.readouts]
    for p in sch.states:
        exprs += [p.key, p.value, p.log_decay, p.beta]
    used = set().union(*map(reads, exprs))
    c("@triton.jit")
    c.call(f"def {scan.name}_chunked(", kernel_args(scan, chunked=True), "):")
    with c.indented():
        _program_prologue(c)
        c("offs_t = tl.arange(0, BT)")
        c("cm_i = mask_i[None, :]")
        c("cm_j = mask_j[None, :]")
        c("lower = offs_t[:, None] >= offs_t[None, :]")
        c("strict = offs_t[:, None] > offs_t[None, :]")
        c("col_t = tl.zeros([BT, 1], tl.float32)")
        _load_states(c, scan, row_vectors=True)
        for d in tensor_args(scan):
            if T not in d.dims and d.name in used:
                c(f"x_{d.name}_c = {_chunk_load(d, None)}")
        with c.block("for c0 in range(0, seq_len, BT):"):
            c("tpos = c0 + offs_t")
            c("tmask = tpos < seq_len")
            c("tm = tmask[:, None]")
            c("row = bos + tpos")
            c("t_f = tpos.to(tl.float32)[:, None]")
            emit_step_loads(c, scan, used, chunk=True)
            for plan in sch.states:
                _emit_state_chunk(c, scan, plan, pr)
            c(f"o_c = tl.where(tm & cm_j, {pr(sch.output)}, 0.0)")
            c("tl.store(o + bb * so_b + hh * so_h + row[:, None] * so_t + offs_j[None, :], "
              "o_c.to(o.dtype.element_ty), mask=tm & cm_j)")
        _store_states(c, scan, row_vectors=True)
    c()
    return pr


def _chunk_load(d, time: str | None) -> str:
    axes = step_axes(d)
    feature = {DK: "offs_i[None, :]", DV: "offs_j[None, :]"}
    t_index = "row[:, None]" if time else None
    off = _decl_offset(d, t_index, feature)
    if time is None:  # per (b, h) or per head: one value, or one row of features
        mask = {(): None, ("i",): "cm_i", ("j",): "cm_j"}[axes]
        extra = f", mask={mask}, other=0.0" if mask else ""
        return f"tl.load(x_{d.name} + {off}{extra}).to(tl.float32)"
    mask = {(): "tm", ("i",): "tm & cm_i", ("j",): "tm & cm_j"}[axes]
    return f"tl.load(x_{d.name} + {off}, mask={mask}, other=0.0).to(tl.float32)"


def _emit_state_chunk(c: CodeBuilder, scan: LinearScan, plan: StatePlan, pr) -> None:
    s = scan.state(plan.state)
    st = f"st_{s.name}"
    matrix = "j" in s.axes
    readers = [r for r in scan.schedule.readouts if r.state == s.name]
    c(f"# state {s.name}: {plan.kind}")
    c(f"kk = tl.where(tm & cm_i, {pr(plan.key)} + col_t, 0.0)")
    if matrix:
        c(f"vv = tl.where(tm & cm_j, {pr(plan.value)} + col_t, 0.0)")
    else:
        c(f"vv = tl.where(tm, {pr(plan.value)} + col_t, 0.0)")
    if plan.kind == "diagonal_decay":
        c(f"gg = tl.where(tm & cm_i, {pr(plan.log_decay)} + col_t, 0.0)")
        c("G = tl.cumsum(gg, axis=0)")
        c("g_last = tl.sum(gg, axis=0)")
        c("k_end = kk * tl.exp(g_last[None, :] - G)")
        # exp(G_t - G_s) split as exp(G_t) * exp(-G_s): exact while a chunk's summed log-decay
        # stays above about -80 (fp32 range); chunks are kept short (BT = 16) for this form
        c("k_in = kk * tl.exp(-G)")
        for r in readers:
            c(f"xq = tl.where(tm & cm_i, {pr(r.query)} + col_t, 0.0) * tl.exp(G)")
            scores = "tl.where(lower, _dot(xq, tl.trans(k_in), IEEE, UPCAST), 0.0)"
            c(f"rd_{r.symbol} = {_inter(matrix, st)} + " + _mix(matrix, scores))
        decay_state = "tl.exp(g_last)[:, None]" if matrix else "tl.exp(g_last)[None, :]"
        c(f"{st} = {st} * {decay_state} + " + _write(matrix, "k_end"))
        return
    c(f"gs = tl.sum(tl.where(tm, {pr(plan.log_decay)} + col_t, 0.0), axis=1)")
    c("G = tl.cumsum(gs, axis=0)")
    c("g_last = tl.sum(gs, axis=0)")
    c("decay = tl.where(lower, tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0)), 0.0)")
    c("k_end = kk * tl.exp(g_last - G)[:, None]")
    if plan.kind in ("delta_rule", "gated_delta_rule"):
        c(f"bt = tl.sum(tl.where(tm, {pr(plan.beta)} + col_t, 0.0), axis=1)")
        c("a_low = tl.where(strict, decay * _dot(kk, tl.trans(kk), IEEE, UPCAST), 0.0) "
          "* bt[:, None]")
        c("tinv = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)")
        # forward substitution: row r of (I + a_low)^-1 is e_r - sum_s a_low[r, s] tinv[s, :]
        with c.block("for r in range(1, BT):"):
            c("a_row = tl.sum(tl.where(offs_t[:, None] == r, a_low, 0.0), axis=0)")
            c("t_row = tl.where(offs_t == r, 1.0, 0.0) - tl.sum(a_row[:, None] * tinv, axis=0)")
            c("tinv = tl.where(offs_t[:, None] == r, t_row[None, :], tinv)")
        c("u_new = _dot(tinv, vv * bt[:, None], IEEE, UPCAST)")
        c("w_new = _dot(tinv, kk * (bt * tl.exp(G))[:, None], IEEE, UPCAST)")
        c(f"vv = u_new - _dot(w_new, {st}, IEEE, UPCAST)")
    for r in readers:
        c(f"xq = tl.where(tm & cm_i, {pr(r.query)} + col_t, 0.0)")
        intra = "_dot(xq, tl.trans(kk), IEEE, UPCAST) * decay"
        c(f"rd_{r.symbol} = {_inter(matrix, st)} * tl.exp(G)[:, None] + " + _mix(matrix, intra))
    c(f"{st} = {st} * tl.exp(g_last) + " + _write(matrix, "k_end"))


def _inter(matrix: bool, st: str) -> str:
    """The chunk's queries xq read the state entering the chunk: xq @ S, or xq . z per row."""
    if matrix:
        return f"_dot(xq, {st}, IEEE, UPCAST)"
    return f"tl.sum(xq * {st}, axis=1, keep_dims=True)"


def _mix(matrix: bool, scores: str) -> str:
    """scores [BT, BT] applied to the values vv: a dot for a matrix state, a sum for a vector."""
    if matrix:
        return f"_dot({scores}, vv, IEEE, UPCAST)"
    return f"tl.sum({scores} * tl.trans(vv), axis=1, keep_dims=True)"


def _write(matrix: bool, keys: str) -> str:
    if matrix:
        return f"_dot(tl.trans({keys}), vv, IEEE, UPCAST)"
    return f"tl.sum({keys} * vv, axis=0, keep_dims=True)"
