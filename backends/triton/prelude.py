"""Helpers every generated module starts with, and the static kernels share.

_key_tiles and _split_tiles walk a segment's key tiles (the schedule of
attnc.passes.mask_bounds.tile_ranges: keep the two in step); _dot and _round are the dtype
paths of every dot product and store; _attnc_bwd_preprocess is the softmax backward's first
launch. The code generators copy the source of everything below the marker line into each
generated module (`PRELUDE`), and static kernels (backends/triton/linear/core.py) import the
same functions, so each helper is defined once.
"""

from pathlib import Path

import triton
import triton.language as tl

PRELUDE_PREPROCESS = "_attnc_bwd_preprocess"
_MARKER = "# --- the generated modules' prelude"


def _prelude() -> str:
    text = Path(__file__).read_text()
    return "\n" + text[text.index("@triton.jit", text.index(_MARKER + ":")):]


PRELUDE = _prelude()


def module_head(header: str, helpers: set[str], extra: tuple[str, ...] = ()) -> str:
    """The start of a generated softmax-family module: its docstring, imports, the prelude,
    the `extra` functions a generator adds, and the expression helpers its code uses."""
    from attnc.backends.triton.printer import HELPERS
    from attnc.backends.triton.source import CodeBuilder
    out = CodeBuilder()
    out(f'"""{header or "attnc kernel"}"""')
    out("import triton")
    out("import triton.language as tl")
    out()
    for text in (PRELUDE, *extra):
        for line in text.rstrip("\n").split("\n"):
            out(line)
        out()
    for name, text in HELPERS.items():
        if name in helpers:
            out()
            for line in text.rstrip("\n").split("\n"):
                out(line)
            out()
    out()
    return out.text()

# --- the generated modules' prelude: from the next function to the end of the file ---

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
