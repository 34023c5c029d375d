"""Generate Triton source for an AttentionKernel.

The source is built statement by statement with a small CodeBuilder (no template with holes):
a header, the helpers the expressions need, a key-tile step function (`MASKED` is a constexpr,
so full tiles compile without the mask), and the program that walks the key segments (or, for a
block-sparse kernel, the key blocks its block mask lists). The text
depends only on the kernel IR, so it is shared by every dtype and device; dtype-dependent choices
are constexprs picked at launch.
"""

from __future__ import annotations

from contextlib import contextmanager

import sympy

from attnc import symbols as S
from attnc.kernel_ir import AttentionKernel
from attnc.backends.triton.printer import HELPERS, TritonPrinter

TILE_NAMES = {S.m: "offs_m[:, None]", S.n: "offs_n[None, :]", S.qk: "qk"}


class CodeBuilder:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, text: str = "") -> None:
        self.lines.append(("    " * self.depth + text) if text else "")

    @contextmanager
    def indented(self):
        self.depth += 1
        yield
        self.depth -= 1

    @contextmanager
    def block(self, header: str):
        self(header)
        with self.indented():
            yield

    def call(self, head: str, args: list[str], tail: str = ")") -> None:
        """`head` + comma-separated args + `tail`, wrapped at 100 columns under the paren."""
        indent = "    " * self.depth
        line = indent + head
        pad = " " * len(line)
        for i, arg in enumerate(args):
            piece = arg + (", " if i < len(args) - 1 else "")
            if len(line) + len(piece.rstrip()) > 100 and line.strip() != head.strip():
                self.lines.append(line.rstrip())
                line = pad
            line += piece
        self.lines.append(line + tail)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# Helpers every kernel uses. _key_tiles is the schedule of
# attnc.passes.mask_bounds.tile_ranges; keep the two in step.
PRELUDE = '''
@triton.jit
def _key_tiles(lo, hi, flo, fhi, prev_end, N, BLOCK_N: tl.constexpr):
    """Key tiles of one segment: [t0, t1) masked, [t1, t2) full, [t2, t3) masked; aligned to
    BLOCK_N, clamped to [0, N) and starting after the previous segment's tiles (prev_end)."""
    lo = tl.minimum(tl.maximum(lo, 0), N)
    hi = tl.minimum(tl.maximum(hi, 0), N)
    flo = tl.minimum(tl.maximum(flo, lo), hi)
    fhi = tl.minimum(tl.maximum(fhi, flo), hi)
    t0 = tl.maximum(lo // BLOCK_N * BLOCK_N, prev_end)
    t3 = tl.maximum((hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N, t0)
    t1 = tl.minimum(tl.maximum((flo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, t0), t3)
    t2 = tl.maximum(tl.minimum(fhi // BLOCK_N * BLOCK_N, t3), t1)
    return t0, t1, t2, t3


@triton.jit
def _split_tiles(t0, t1, t2, t3, split_lo, split_hi):
    """The part of a segment's tiles inside one key split [split_lo, split_hi) (both multiples
    of BLOCK_N): clamping is monotone, so the masked / full / masked order is kept."""
    t0 = tl.minimum(tl.maximum(t0, split_lo), split_hi)
    t1 = tl.minimum(tl.maximum(t1, split_lo), split_hi)
    t2 = tl.minimum(tl.maximum(t2, split_lo), split_hi)
    t3 = tl.minimum(tl.maximum(t3, split_lo), split_hi)
    return t0, t1, t2, t3


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: exact fp32 products (no tf32). UPCAST: multiply in
    fp32, for Triton's interpreter whose low-precision dot is unreliable; fp16/bf16 products
    are exact in fp32, so this matches the compiled path."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _round(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Triton's interpreter (UPCAST) truncates fp32 to
    bf16, so there bf16 is rounded by hand first; compiled Triton rounds correctly itself."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _attnc_bwd_preprocess(Out, DO, DLse, Delta, R, DV, HAS_DLSE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) - dlse over R contiguous rows of width DV (the backward's first
    launch; ds = p * (dO.v - delta) needs it for every key tile of a row)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < R) & (cols[None, :] < DV)
    o = tl.load(Out + rows[:, None].to(tl.int64) * DV + cols[None, :], mask=ok, other=0.0)
    do = tl.load(DO + rows[:, None].to(tl.int64) * DV + cols[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + rows, mask=rows < R, other=0.0)
    tl.store(Delta + rows, delta, mask=rows < R)
'''


PRELUDE_PREPROCESS = "_attnc_bwd_preprocess"


def kernel_names(k: AttentionKernel) -> tuple[str, str]:
    return f"attnc_{k.name}_fwd", f"_attnc_{k.name}_step"


def ptr_args(k: AttentionKernel) -> list[str]:
    return [d.name for d in k.inputs]


def stride_args(k: AttentionKernel) -> list[str]:
    return [f"{d.name}_s{i}" for d in k.inputs for i in range(len(d.dims))]


def load_stmt(ld, k: AttentionKernel, pr: TritonPrinter) -> str:
    decl = next(d for d in k.inputs if d.name == ld.tensor)
    idx = [pr(i) for i in ld.index]
    addr = " + ".join([ld.tensor] + [f"{i} * {ld.tensor}_s{j}" for j, i in enumerate(idx)])
    # Padding rows/keys may index out of range, so dims indexed by m or n are bounds-checked.
    # Dims indexed by b and h alone are validated at call time (attnc.runtime); checking them
    # here would mix scalar and tensor masks, which Triton's interpreter rejects.
    checks = [f"({i} >= 0) & ({i} < {pr(d)})" for i, d, ix in zip(idx, decl.dims, ld.index)
              if ld.level == "program" or ix.has(S.m) or ix.has(S.n)]
    mask = f", mask={' & '.join(checks)}, other=0" if checks else ""
    cast = ".to(tl.float32)" if decl.kind == "param" else ""
    return f"{ld.name} = tl.load({addr}{mask}){cast}"


def generate(k: AttentionKernel, header: str = "") -> str:
    tiled = {S.m, S.n, S.qk} | {sympy.Symbol(ld.name, real=True) for ld in k.loads
                                if ld.level != "program"}
    pr = TritonPrinter(dict(TILE_NAMES), frozenset(tiled))
    body = CodeBuilder()
    _emit_step(body, k, pr)
    body()
    body()
    _emit_program(body, k, pr)
    if k.grad is not None:
        from attnc.backends.triton.backward import emit_backward  # it builds on this module
        emit_backward(body, k, pr)
    out = CodeBuilder()
    out(f'"""{header or "attnc kernel"}"""')
    out("import triton")
    out("import triton.language as tl")
    out()
    for line in PRELUDE.rstrip("\n").split("\n"):
        out(line)
    out()
    for name in ("_floor_div", "_floor_mod", "_tanh", "_softplus", "_pow"):
        if name in pr.helpers:
            out()
            for line in HELPERS[name].rstrip("\n").split("\n"):
                out(line)
            out()
    out()
    return out.text() + body.text()


def _inner_loads(k: AttentionKernel) -> list:
    return [ld for ld in k.loads if ld.level in ("key", "tile")]


def _step_args(k: AttentionKernel) -> list[str]:
    """What the key-tile step reads from the program: state, operands, indices, hoisted loads,
    and the tensors (with strides) it loads per key; the constexprs follow."""
    tensors = sorted({ld.tensor for ld in _inner_loads(k)})
    strides = [f"{d.name}_s{i}" for d in k.inputs if d.name in tensors for i in range(len(d.dims))]
    hoisted = [ld.name for ld in k.loads if ld.level in ("program", "row")]
    return (["acc", "l_i", "m_i", "q", "k_base", "v_base", "start_n", "offs_m", "offs_d",
             "offs_dv", "stride_kn", "stride_kd", "stride_vn", "stride_vd", "b", "h", "B", "H", "M",
             "N", "D", "DV", "scale"] + hoisted + tensors + strides + ["BLOCK_M", "BLOCK_N"])


def step_header(c: CodeBuilder, name: str, args: list[str], flags: tuple[str, ...]) -> None:
    """`@triton.jit def name(...)` of a tile step: the BLOCK_* sizes and the `flags` are
    constexprs, so each (masked, dtype path) combination compiles to its own code."""
    params = [f"{a}: tl.constexpr" if a.startswith("BLOCK") else a for a in args]
    c("@triton.jit")
    c.call(f"def {name}(", params + [f"{f}: tl.constexpr" for f in flags], "):")


def _emit_step(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter) -> None:
    _, step = kernel_names(k)
    inner = _inner_loads(k)
    step_header(c, step, _step_args(k), ("MASKED", "IEEE", "UPCAST"))
    with c.indented():
        c('"""One key tile: scores, optional mask, online-softmax update."""')
        c("offs_n = start_n + tl.arange(0, BLOCK_N)")
        c("kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd")
        c("v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd")
        with c.block("if MASKED:"):
            c("kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)")
            c("v = tl.load(v_ptrs, mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)")
        with c.block("else:"):
            c("kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)")
            c("v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)")
        c("qk = _dot(q, kt, IEEE, UPCAST)")
        for ld in inner:
            c(load_stmt(ld, k, pr))
        if k.score.has(S.qk):
            c(f"s = {pr(k.score)}")
        else:  # a score without q.k still needs the tile's shape
            c(f"s = {pr(k.score)} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32)")
        with c.block("if MASKED:"):
            visible = S.n < S.N if k.mask is None else sympy.And(S.n < S.N, k.mask)
            c(f"s = tl.where({pr(visible)}, s, float(\"-inf\"))")
        c("m_new = tl.maximum(m_i, tl.max(s, 1))")
        c("# rows that have seen no visible key keep max -inf; shift by 0 there to avoid inf - inf")
        c('m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)')
        c("p = tl.exp(s - m_safe[:, None])")
        c("alpha = tl.exp(m_i - m_safe)")
        c("l_i = l_i * alpha + tl.sum(p, 1)")
        c("acc = acc * alpha[:, None] + _dot(_round(p, v.dtype, UPCAST), v, IEEE, UPCAST)")
        c("return acc, l_i, m_new")


PROGRAM_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "IEEE", "UPCAST")
# A block-sparse kernel's lists: (number of blocks [B, H, QB], block indices [B, H, QB, KB]) for
# the partial and the full blocks, each with its strides; the block sizes are constexprs.
BLOCK_LISTS = (("KV_NUM", "kvn", "bhq"), ("KV_IDX", "kvi", "bhqk"),
               ("FULL_NUM", "fn", "bhq"), ("FULL_IDX", "fi", "bhqk"))
SPARSE_CONSTEXPRS = ("SPARSE_Q", "SPARSE_KV")


def block_sparse(k: AttentionKernel) -> bool:
    return k.schedule.keys == "block_mask"


def program_args(k: AttentionKernel) -> list[str]:
    """The forward kernel's parameters in order (the launcher passes them positionally):
    pointers, strides, sizes, scale, then the constexprs."""
    strides = [f"stride_{t}{r}" for t, ranks in (("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"),
                                                 ("o", "bhmd")) for r in ranks]
    lists, list_strides, sparse = [], [], []
    if block_sparse(k):
        lists = [name for name, _, _ in BLOCK_LISTS]
        list_strides = [f"{short}_s{r}" for _, short, dims in BLOCK_LISTS for r in dims]
        sparse = list(SPARSE_CONSTEXPRS)
    return (["Q", "K", "V", "Out", "Lse"] + ptr_args(k) + lists + strides + stride_args(k)
            + list_strides + ["B", "H", "M", "N", "D", "DV", "GROUP", "scale", "KV_SPLIT",
                              "stride_os"]
            + list(PROGRAM_CONSTEXPRS) + sparse)


def constexpr_args(k: AttentionKernel) -> tuple[str, ...]:
    return PROGRAM_CONSTEXPRS + (SPARSE_CONSTEXPRS if block_sparse(k) else ())


def query_tile_prologue(c: CodeBuilder, first_tile: str = "") -> None:
    """Which (query tile, b, h) a program owns, for the forward and the dq kernel alike (the dq
    kernel may be launched on a slab of query tiles starting at `first_tile`)."""
    c("pid_m = tl.program_id(0)" + (f" + {first_tile}" if first_tile else ""))
    c("pid_bh = tl.program_id(1)")
    c("b = pid_bh // H")
    c("h = pid_bh % H")
    c("kvh = h // GROUP")
    c("m_lo = pid_m * BLOCK_M")
    c("m_hi = tl.minimum(m_lo + BLOCK_M, M) - 1")
    c("zero = m_lo * 0  # a runtime integer, so bound arithmetic never folds to constants")
    c("offs_m = m_lo + tl.arange(0, BLOCK_M)")
    c("offs_d = tl.arange(0, BLOCK_D)")
    c("offs_dv = tl.arange(0, BLOCK_DV)")


def _emit_program(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter) -> None:
    fwd = kernel_names(k)[0]
    args = [f"{a}: tl.constexpr" if a in constexpr_args(k) else a for a in program_args(k)]
    c("@triton.jit")
    c.call(f"def {fwd}(", args, "):")
    with c.indented():
        c(f'"""{k.name}: softmax attention forward; one program per (query tile, b * h, key '
          'split).')
        c("Split s sees keys [s * KV_SPLIT, (s + 1) * KV_SPLIT) and writes its own normalized "
          "out and lse")
        c('(at Out + s * stride_os, Lse + s * B * H * M), which the launcher merges."""')
        query_tile_prologue(c)
        c("split_lo = tl.program_id(2) * KV_SPLIT")
        c("split_hi = split_lo + KV_SPLIT")
        c("q_ptrs = (Q + b.to(tl.int64) * stride_qb + h * stride_qh")
        c("          + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)")
        c("q = tl.load(q_ptrs, mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)")
        c("k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh")
        c("v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh")
        for ld in k.loads:
            if ld.level in ("program", "row"):
                c(load_stmt(ld, k, pr))
        c('m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)')
        c("l_i = tl.zeros([BLOCK_M], tl.float32)")
        c("acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)")
        if block_sparse(k):
            _emit_block_lists(c, k)
        else:
            emit_segment_walk(c, k.segments, lambda c, masked: _step_call(c, k, masked), "N",
                              "BLOCK_N", "start_n", pr, split=True)
        c("empty = l_i == 0.0")
        c("l_safe = tl.where(empty, 1.0, l_i)")
        c("out = acc / l_safe[:, None]")
        c('lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))')
        c("split = tl.program_id(2).to(tl.int64)")
        c("o_ptrs = (Out + split * stride_os + b.to(tl.int64) * stride_ob + h * stride_oh")
        c("          + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)")
        c("tl.store(o_ptrs, _round(out, Out.dtype.element_ty, UPCAST), "
          "mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV))")
        c("tl.store(Lse + (split * B * H + pid_bh) * M + offs_m, lse, mask=offs_m < M)")


def _step_call(c: CodeBuilder, k: AttentionKernel, masked: str) -> None:
    c.call(f"acc, l_i, m_i = {kernel_names(k)[1]}(", _step_args(k) + [
        f"MASKED={masked}", "IEEE=IEEE", "UPCAST=UPCAST"])


def emit_segment_walk(c: CodeBuilder, segments, call, extent: str, block: str, var: str,
                      pr: TritonPrinter, split: bool = False) -> None:
    """Walk the tiles of `segments` along one axis (keys for the forward and dq kernels, queries
    for the dk/dv kernel): per segment, masked / full / masked ranges, each tile emitted by
    call(c, masked). The bounds are scalars; helpers they need are added to `pr`'s. With
    `split`, only the tiles inside [split_lo, split_hi) are walked (the forward's key split)."""
    scalar = TritonPrinter({})
    c("prev_end = zero")
    for i, seg in enumerate(segments):
        c(f"# segment {i}: [{seg.lo}, {seg.hi}), all of the tile sees [{seg.full_lo}, "
          f"{seg.full_hi})")
        for name, ex in (("lo", seg.lo), ("hi", seg.hi), ("flo", seg.full_lo),
                         ("fhi", seg.full_hi)):
            c(f"{name} = {scalar(ex)} + zero")
        c(f"t0, t1, t2, t3 = _key_tiles(lo, hi, flo, fhi, prev_end, {extent}, {block})")
        if split:
            c("t0, t1, t2, t3 = _split_tiles(t0, t1, t2, t3, split_lo, split_hi)")
        for lo_name, hi_name, masked in (("t0", "t1", "True"), ("t1", "t2", "False"),
                                         ("t2", "t3", "True")):
            with c.block(f"for {var} in range({lo_name}, {hi_name}, {block}):"):
                call(c, masked)
        c("prev_end = t3")
    pr.helpers |= scalar.helpers


def _emit_block_lists(c: CodeBuilder, k: AttentionKernel) -> None:
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
                    _step_call(c, k, "True")
                else:
                    c("# a full block's last tile may run past N: bounds-check it")
                    with c.block("if start_n + BLOCK_N <= N:"):
                        _step_call(c, k, "False")
                    with c.block("else:"):
                        _step_call(c, k, "True")
