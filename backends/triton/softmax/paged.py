"""Generate the paged forward of an AttentionKernel: the same scores, mask and online softmax as
forward.py's, with keys read through a page table (vLLM's layout) and per-sequence lengths.

Layout: K [num_pages, page_size, Hkv, D], V [num_pages, page_size, Hkv, Dv] (any strides), a
page table [B, max_pages] int32, and per sequence b four int32 values: kv_len (key rows
0..kv_len-1), k_start (row r has position n = k_start + r), q_start (query row i has position
m = q_start + i) and q_len (rows i >= q_len are padding). The spec sees one sequence of
N = M = k_start + kv_len positions; keys exist at positions [max(k_start, 0), N) only. Key row r
lives at K[table[b, r // page_size], r % page_size]; declared key-side operands are caches laid
out like K and read through the same table, query-side ones [B, Hq, rows, Dx] like q.

Program: one per (query tile, b * Hq), with `m` the rows' absolute positions (masks and scores
see them) and the local rows addressing q, out and lse. The segment walk of forward.py runs
with every segment starting at the oldest existing key (`floor`), so a tile below it is never
visited and the tile straddling it is a masked one; masked tiles check both key bounds and read
the table only for rows that exist, full tiles read without checks. Rows that are padding (past
q_len, or at a position outside [0, N)) store out 0 and lse -inf.

GQA packing (constexpr PACKED; the parameter exists only when `packs` holds: nothing the kernel
evaluates reads the query head, h or H, and nothing is around the score): one program per
(tile of packed rows, b * Hkv), packed row r being query head kvh * GROUP + r // QROWS at local
row r % QROWS, so each key and value tile is read once per group rather than once per query
head. Positions stay per row, so causal and window masks pack too; the segment bounds m_lo and
m_hi then bound the positions of the tile's local rows, all of 0..QROWS-1 when the tile wraps
into the next head's rows. The launcher packs when GROUP > 1 and GROUP * QROWS rows fit
launch.PACKED_ROWS.

Page reads (constexpr ONE_PAGE): when page_size is a multiple of BLOCK_N and k_start of every
sequence a multiple of BLOCK_N, a key tile (aligned to BLOCK_N in positions) is BLOCK_N
consecutive slots of one page: one table read per tile. Otherwise each key reads its own table
entry (page r // page_size, slot r % page_size).

Not here: prologues (the caller applies them: attnc/runtime/paged.py refuses a spec with
prologues unless told so), gates, kv-head maps, gathers, head mixing, block-sparse kernels, key
splits and backward (forward only).
"""

from __future__ import annotations

import sympy
import triton

from attnc.backends.triton.contract import GeneratedModule, GridRule, KernelContract, ParamType, arg
from attnc.backends.triton.names import choose
from attnc.backends.triton.prelude import module_head
from attnc.backends.triton.printer import TritonPrinter
from attnc.backends.triton.softmax import forward as F
from attnc.backends.triton.softmax import prologue as P
from attnc.backends.triton.softmax.scores import LN2
from attnc.backends.triton.source import CodeBuilder
from attnc.expr import symbols as S
from attnc.ir.around import BASE_OPERANDS, Around
from attnc.ir.kernel import AttentionKernel, LoadLevel

INT = ParamType.INT
# the oldest existing key's position, max(k_start, 0): a scalar of the program
K_LO = sympy.Symbol("k_lo", integer=True)
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "SCALE_POS", "IEEE", "UPCAST",
              "ONE_PAGE")
SEQUENCE = ("KV_LENS", "K_START", "Q_START", "Q_LENS")  # the per-sequence int32 vectors [B]


def unsupported(k: AttentionKernel) -> str | None:
    """Why `k` has no paged forward (None: it has one)."""
    a = k.around
    for what, present in (("a block mask (block_sparse)", k.block_sparse),
                          ("a gate", a.gate is not None),
                          ("a kv-head map", a.kv_head is not None),
                          ("gathered keys", a.gather is not None),
                          ("head mixing", a.premix is not None or a.postmix is not None)):
        if present:
            return what
    return None


def packs(k: AttentionKernel) -> bool:
    """Whether the paged forward of `k` may pack a GQA group's query heads into one program's
    rows (module docstring): nothing it evaluates reads h or H, and nothing is around the score
    (query-side operands are laid out per head). Unlike launch.packs_heads, m and M may appear:
    the packed rows keep their own positions."""
    if not k.around.plain:
        return False
    exprs = [k.score, *([k.mask] if k.mask is not None else []),
             *(x for ld in k.loads for x in ld.index),
             *(x for seg in k.segments for x in (seg.lo, seg.hi, seg.full_lo, seg.full_hi))]
    return not any(sympy.sympify(x).free_symbols & {S.h, S.H} for x in exprs)


def entry(nm: F.KernelNames, role: str) -> str:
    return {"paged": f"attnc_{nm.spec}_paged", "step": f"_attnc_{nm.spec}_paged_step"}[role]


def generate(k: AttentionKernel, header: str = "") -> GeneratedModule:
    """The paged forward module of `k` (names spelled as in forward.generate)."""
    draft = F.KernelNames(k)
    spelled = choose(_generate(k, header, draft).source, draft.users)
    return _generate(k, header, F.KernelNames(k, spelled))


def contracts(k: AttentionKernel, names) -> tuple[KernelContract, ...]:
    """The contract of a cached paged module, spelled with its `names`."""
    return (paged_contract(k, F.KernelNames(k, names)),)


def _generate(k: AttentionKernel, header: str, nm: F.KernelNames) -> GeneratedModule:
    why = unsupported(k)
    if why is not None:
        raise ValueError(f"{k.name}: no paged forward for a kernel with {why}")
    pr = F.printer(k, nm)
    body = CodeBuilder()
    _emit_step(body, k, pr, nm)
    body()
    body()
    contract = _emit_program(body, k, pr, nm)
    return GeneratedModule(module_head(header, pr.helpers) + body.text(), (contract,),
                           dict(nm.users.spelled or {}))


# --- operands ------------------------------------------------------------------------------------
def _key_operands(a: Around) -> list[str]:
    """The key-side operands a key tile reads: the dots' keys, then the value unless a dot's key
    tile already holds it (`v = k`: the value is that tile transposed)."""
    dotted = list(dict.fromkeys(t.key for t in a.dots))
    return dotted + ([] if a.value in dotted else ["v"])


def _cache_names(x: str, nm: F.KernelNames) -> tuple[str, str, str, str, str, str]:
    """(base, page stride, slot stride, feature stride, head dim, feature offsets) of a key-side
    cache: k and v (or the operand the value aliases, passed as V) by the forward's names, a
    declared operand X by X_s0 (page), X_s1 (slot), X_s3 (feature); X_s2 is its head's."""
    if x in BASE_OPERANDS:
        dim, offs = ("DV", "offs_dv") if x == "v" else ("D", "offs_d")
        return f"{x}_base", f"stride_{x}p", f"stride_{x}s", f"stride_{x}d", dim, offs
    n = P.operand_names(x, nm.tensor)
    return n.base, n.strides[0], n.strides[1], n.strides[3], n.dim, n.offs


def _step_args(k: AttentionKernel, nm: F.KernelNames) -> list[str]:
    """What the paged key step reads: the forward step's state, tiles and indices, the table
    and the sequence's key bounds, each key cache's base and strides, and the spec's loads."""
    a = k.around
    inner = sorted({ld.tensor for ld in k.loads
                    if ld.level in (LoadLevel.KEY, LoadLevel.TILE)})
    stride_names = [nm.stride(d.name, i) for d in k.inputs if d.name in inner
                    for i in range(len(d.dims))]
    hoisted = [nm.load(ld) for ld in k.loads if ld.level in (LoadLevel.PROGRAM, LoadLevel.ROW)]
    caches = [name for x in _key_operands(a) for name in _cache_names(x, nm)[:5]]
    queries = [F.query_var(x, nm) for x in F.query_operands(a)]
    blocks = [P.operand_names(x, nm.tensor).block for x in _key_operands(a)
              if x not in BASE_OPERANDS]
    return (["acc", "l_i", "m_i"] + queries + caches
            + ["table", "page_size", "k_start", "k_lo", "start_n", "offs_m", "offs_d", "offs_dv",
               "b", "h", "B", "H", "M", "N", "scale"]
            + (["c2"] if F.qk_factor(k) is not None else [])
            + hoisted + [nm.tensor(t) for t in inner] + stride_names
            + ["BLOCK_M", "BLOCK_N"] + blocks)


def _step_flags(k: AttentionKernel) -> tuple[str, ...]:
    """MASKED: the tile needs the mask and its keys' bounds checked (only masked tiles reach
    outside the sequence's keys); ONE_PAGE: the tile lies in one page; SCALE_POS and the dtype
    path as in the forward's step."""
    return ("MASKED", "ONE_PAGE") + tuple(f for f in F.step_flags(k)
                                          if f not in ("MASKED", "EDGE"))


# --- the key step --------------------------------------------------------------------------------
def _emit_step(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: F.KernelNames) -> None:
    a = k.around
    F.step_header(c, entry(nm, "step"), _step_args(k, nm), _step_flags(k))
    with c.indented():
        c('"""One key tile read through the page table: scores, optional mask, online-softmax '
          'update."""')
        c("offs_n = start_n + tl.arange(0, BLOCK_N)")
        P.emit_offsets(c, [x for x in _key_operands(a) if x not in BASE_OPERANDS], nm.tensor)
        with c.block("if MASKED:"):
            c("# keys below the oldest existing one or past the last are read from nowhere")
            c("valid = (offs_n >= k_lo) & (offs_n < N)")
        with c.block("if ONE_PAGE:"):
            c("# the tile is BLOCK_N consecutive slots of one page; its first row exists (a tile "
              "starts")
            c("# below N, at or past k_start), so the table entry read is one the call checked")
            c("row0 = start_n - k_start")
            c("page = tl.load(table + row0 // page_size).to(tl.int64)")
            c("slot = row0 % page_size")
            c("lanes = tl.arange(0, BLOCK_N)")
            for masked in (True, False):
                with c.block("if MASKED:" if masked else "else:"):
                    _emit_key_tiles(c, a, nm, "valid" if masked else None, True)
        with c.block("else:"):
            c("rows = offs_n - k_start")
            with c.block("if MASKED:"):
                c("rows = tl.where(valid, rows, 0)")
                c("page = tl.load(table + rows // page_size, mask=valid, other=0).to(tl.int64)")
                c("slot = rows % page_size")
                _emit_key_tiles(c, a, nm, "valid", False)
            with c.block("else:"):
                c("page = tl.load(table + rows // page_size).to(tl.int64)")
                c("slot = rows % page_size")
                _emit_key_tiles(c, a, nm, None, False)
        if a.plain:
            c("qk = _dot(q, kt, IEEE, UPCAST)")
        else:
            F.emit_dots(c, a, nm)
        visible = sympy.And(S.n >= K_LO, S.n < S.N, k.mask if k.mask is not None else sympy.true)
        F.emit_tile_update(c, k, pr, nm, lambda fill: F.emit_visible(c, pr, visible, fill))


def _emit_key_tiles(c: CodeBuilder, a: Around, nm: F.KernelNames, valid: str | None,
                    one_page: bool) -> None:
    """Each key cache's tile at the rows' (page, slot): the dots' keys transposed [Dx, BLOCK_N],
    the value [BLOCK_N, Dv] (the transposed key tile it aliases, when a dot reads it). In one
    page (`one_page`: page and slot scalars, `lanes` the tile's rows) each key's row is the
    tile's first plus its lane: no table read or division per key. (Hoisting the whole tile's
    int32 offsets out of the key loop instead saves 3 sm_90 loop instructions but spills.)"""
    for x in _key_operands(a):
        base, sp, ss, sd, dim, offs = _cache_names(x, nm)
        value = x == "v"
        dst = "v" if value else F.key_var(x, nm)
        c(f"{dst}_rows = page * {sp} + slot * {ss}")
        keys, feats = ("[:, None]", f"{offs}[None, :]") if value else \
            ("[None, :]", f"{offs}[:, None]")
        address = (f"{base} + ({dst}_rows + lanes * {ss}){keys} + {feats} * {sd}" if one_page
                   else f"{base} + {dst}_rows{keys} + {feats} * {sd}")
        mask = f"{feats} < {dim}"
        if valid is not None:
            mask = f"({valid}[{':, None' if value else 'None, :'}]) & ({mask})"
        c.call(f"{dst} = tl.load(", [address, f"mask={mask}", "other=0.0"])
    if "v" not in _key_operands(a):
        c(f"v = tl.trans({F.key_var(a.value, nm)})")


# --- the program ---------------------------------------------------------------------------------
def paged_grid(v) -> tuple[int, int]:
    """One program per (query tile, b * Hq); packed (PACKED), per (tile of GROUP * QROWS
    rows, b * Hkv)."""
    if v.get("PACKED"):
        return triton.cdiv(v["GROUP"] * v["QROWS"], v["BLOCK_M"]), v["B"] * (v["H"] // v["GROUP"])
    return triton.cdiv(v["QROWS"], v["BLOCK_M"]), v["B"] * v["H"]


def paged_contract(k: AttentionKernel, nm: F.KernelNames) -> KernelContract:
    """Pointers (q, the caches, out, lse, the table and the sequence vectors, the spec's tensors,
    the declared operands), strides, sizes, scale, then the constexprs."""
    ops, blocks = P.operand_params(k.around, nm.tensor)
    cache_strides = [arg(f"stride_{t}{r}", INT) for t in "kv" for r in "pshd"]
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "Out")]
              + [arg("Lse", ParamType.FP32_PTR), arg("TABLE", ParamType.I32_PTR)]
              + [arg(x, ParamType.I32_PTR) for x in SEQUENCE]
              + F.tensor_params(k, nm) + ops
              + [arg(f"stride_{t}{r}", INT) for t in "qo" for r in "bhmd"] + cache_strides
              + [arg("stride_tb", INT)] + F.stride_params(k, nm)
              + [arg(x, INT) for x in ("B", "H", "QROWS", "D", "DV", "GROUP", "page_size")]
              + [arg("scale", ParamType.FLOAT)]
              + F.constexprs(CONSTEXPRS + (("PACKED",) if packs(k) else ())) + blocks)
    return KernelContract("paged", entry(nm, "paged"), tuple(params),
                          GridRule(paged_grid.__doc__ or "", paged_grid),
                          "softmax attention forward over a paged KV cache")


def _emit_program(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter,
                  nm: F.KernelNames) -> KernelContract:
    a = k.around
    contract = paged_contract(k, nm)
    packed = packs(k)
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    with c.indented():
        c(f'"""{nm.spec}: softmax attention forward over a paged KV cache; one program per '
          '(query tile, b * h)' + (', or packed per (tile of a GQA group\'s rows, b * kvh)'
                                   if packed else '') + '."""')
        c("pid_m = tl.program_id(0)")
        c("pid_bh = tl.program_id(1)")
        c("r_lo = pid_m * BLOCK_M")
        _if_packed(c, packed, [
            "# packed row r: head kvh * GROUP + r // QROWS, local row r % QROWS",
            "b = pid_bh // (H // GROUP)",
            "kvh = pid_bh % (H // GROUP)",
            "h = kvh * GROUP  # the group's first head: nothing evaluated reads it",
            "r = r_lo + tl.arange(0, BLOCK_M)",
            "heads = h + r // QROWS",
            "rows_m = r % QROWS",
            "exists = r < GROUP * QROWS"], [
            "b = pid_bh // H",
            "h = pid_bh % H",
            "kvh = h // GROUP",
            "rows_m = r_lo + tl.arange(0, BLOCK_M)  # local rows: q, out and lse",
            "heads = h + rows_m * 0  # each row's query head",
            "exists = rows_m < QROWS"])
        for var, vec in zip(("kv_len", "k_start", "q_start", "q_len"), SEQUENCE):
            c(f"{var} = tl.load({vec} + b)")
        c("# the spec sees one sequence of N = M positions; keys exist from k_lo on")
        c("N = k_start + kv_len")
        c("M = N")
        c("k_lo = tl.maximum(k_start, 0)")
        c("offs_m = q_start + rows_m  # positions: scores and masks")
        c("live = exists & (rows_m < q_len) & (offs_m >= 0) & (offs_m < N)")
        c("# the positions of the tile's live rows: the segment bounds hold for each of them")
        _if_packed(c, packed, [
            "# the tile's local rows: from its first on, or when they wrap around QROWS into the",
            "# next head's, all of them (closed forms: a reduction over the rows costs registers",
            "# through the key loop)",
            "l_lo = r_lo % QROWS",
            "wraps = l_lo + BLOCK_M > QROWS",
            "l_hi = tl.where(wraps, QROWS, l_lo + BLOCK_M)",
            "l_lo = tl.where(wraps, 0, l_lo)"], [
            "l_lo = r_lo",
            "l_hi = r_lo + BLOCK_M"])
        c("m_lo = tl.maximum(q_start + l_lo, 0)")
        c("m_hi = tl.minimum(q_start + tl.minimum(l_hi, q_len), N) - 1")
        c("zero = m_lo * 0  # a runtime integer, so bound arithmetic never folds to constants")
        c("offs_d = tl.arange(0, BLOCK_D)")
        c("offs_dv = tl.arange(0, BLOCK_DV)")
        for x in F.query_operands(a):
            _emit_query_tile(c, x, nm)
        c("table = TABLE + b.to(tl.int64) * stride_tb")
        c("k_base = K + kvh * stride_kh")
        c("v_base = V + kvh * stride_vh")
        for x in _key_operands(a):
            if x not in BASE_OPERANDS:
                n = P.operand_names(x, nm.tensor)
                c(f"{n.base} = {n.pointer} + kvh * {n.strides[2]}")
        for ld in k.loads:
            if ld.level in (LoadLevel.PROGRAM, LoadLevel.ROW):
                c(F.load_stmt(ld, k, pr, nm))
        F.emit_factor(c, k, pr)
        c('m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)')
        c("l_i = tl.zeros([BLOCK_M], tl.float32)")
        c("acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)")
        with c.block("if m_lo <= m_hi:"):
            F.emit_segment_walk(c, k.segments, lambda c, masked: _step_call(c, k, nm, masked),
                                "N", "BLOCK_N", "start_n", pr, floor="k_lo")
        c("empty = l_i == 0.0")
        c("l_safe = tl.where(empty, 1.0, l_i)")
        c("out = acc / l_safe[:, None]")
        c("# m_i is in base-2 units; the lse is stored as a natural logarithm")
        c(f'lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * {LN2!r})')
        c('lse = tl.where(m_i == float("inf"), m_i, lse)')
        c("out = tl.where(live[:, None], out, 0.0)")
        c('lse = tl.where(live, lse, float("-inf"))')
        c("o_ptrs = (Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh")
        c("          + rows_m[:, None] * stride_om + offs_dv[None, :] * stride_od)")
        c("tl.store(o_ptrs, _round(out, Out.dtype.element_ty, UPCAST),")
        c("         mask=exists[:, None] & (offs_dv[None, :] < DV))")
        c("tl.store(Lse + (b.to(tl.int64) * H + heads) * QROWS + rows_m, lse, mask=exists)")
    return contract


def _if_packed(c: CodeBuilder, packed: bool, when: list[str], otherwise: list[str]) -> None:
    """`otherwise`'s lines, or for a kernel that packs both under `if PACKED:`."""
    if not packed:
        for line in otherwise:
            c(line)
        return
    for header, lines in (("if PACKED:", when), ("else:", otherwise)):
        with c.block(header):
            for line in lines:
                c(line)


def _emit_query_tile(c: CodeBuilder, x: str, nm: F.KernelNames) -> None:
    """A query-side operand's tile at the program's local rows (the caller applied any
    prologue), zero past q_len."""
    n = P.operand_names(x, nm.tensor)
    dst = F.query_var(x, nm)
    if x != "q":
        c(f"{n.offs} = tl.arange(0, {n.block})")
    c(f"{dst}_ptrs = ({n.pointer} + b.to(tl.int64) * {n.strides[0]} + heads[:, None] * "
      f"{n.strides[1]}")
    c(f"    + rows_m[:, None] * {n.strides[2]} + {n.offs}[None, :] * {n.strides[3]})")
    c(f"{dst} = tl.load({dst}_ptrs, mask=(exists & (rows_m < q_len))[:, None] & "
      f"({n.offs}[None, :] < {n.dim}), other=0.0)")


def _step_call(c: CodeBuilder, k: AttentionKernel, nm: F.KernelNames, masked: str) -> None:
    flags = [f"MASKED={masked}", "ONE_PAGE=ONE_PAGE"] + (
        ["SCALE_POS=SCALE_POS"] if "SCALE_POS" in _step_flags(k) else [])
    c.call(f"acc, l_i, m_i = {entry(nm, 'step')}(", _step_args(k, nm) + flags + [
        "IEEE=IEEE", "UPCAST=UPCAST"])
