"""Launch a generated attention kernel: the heuristic launch configuration (attnc.autotune
tunes from it), key splits for short queries and their merge, GQA head packing, the forward
and backward calls themselves."""

from __future__ import annotations

import sympy
import torch
import triton

from attnc import symbols as S
from attnc.backends.triton import interpreting


def pow2(x: int) -> int:
    """A tile covering x: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(x))


def default_config(D: int, Dv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Heuristic tile sizes, the default when tuning is off (and the tuner's first candidate):
    smaller tiles for wide heads and fp32."""
    bd, bdv = pow2(D), pow2(Dv)
    if device.type != "cuda":  # the interpreter: fewer, larger tiles are faster
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    wide = max(bd, bdv) > 128
    if dtype == torch.float32:
        bm, bn = (32, 32) if wide else (64, 32)
    else:
        bm, bn = (64, 32) if wide else (128, 64)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 8 if bm >= 128 or wide else 4,
            "num_stages": 2 if wide else 3}


def _constexprs(config: dict, q, D: int, Dv: int, block_sizes: tuple[int, int] | None) -> dict:
    """Tile sizes, dtype path and launch options shared by the forward and backward kernels; a
    block mask's sizes bound the tiles (a tile never straddles a block of the mask), and so do
    short queries (a decoding step's one row needs no 128-row tile)."""
    bm, bn = min(config["BLOCK_M"], pow2(q.shape[2])), config["BLOCK_N"]
    sparse = {}
    if block_sizes is not None:
        bm, bn = min(bm, block_sizes[0]), min(bn, block_sizes[1])
        sparse = {"SPARSE_Q": block_sizes[0], "SPARSE_KV": block_sizes[1]}
    ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pow2(D), BLOCK_DV=pow2(Dv), IEEE=ieee,
                UPCAST=interpreting(), **sparse, num_warps=config["num_warps"],
                num_stages=config["num_stages"])


# A split must hold this many keys at least: below it the partial results cost more to merge
# than the extra programs gain.
MIN_SPLIT_KEYS = 512
MAX_SPLITS = 64


def kv_splits(programs: int, N: int, sms: int | None, fixed: int | None = None) -> int:
    """How many key splits the forward runs (flash-decoding): when (query tiles x B x H) leaves
    a GPU's `sms` idle -- a decoding step, a short prefill -- each program's keys are divided
    so about two programs run per SM. `fixed` (the `kv_splits` launch option) overrides; the
    interpreter (sms None) runs one split."""
    if fixed is not None:
        return max(1, fixed)
    if sms is None or programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), N // MIN_SPLIT_KEYS, MAX_SPLITS))


def launch(fn, q, k, v, extras: list[torch.Tensor], scale: float, config: dict,
           block_lists: list[torch.Tensor] = (), block_sizes: tuple[int, int] | None = None):
    """Run the kernel; a block-sparse kernel also gets its block mask's four lists (already
    broadcast to [B, H, ...]) and the mask's (query, key) block sizes. With several key splits
    (kv_splits) each split writes fp32 partial results that are merged by their lse."""
    B, H, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, M, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    if M == 0 or B * H == 0:
        return out, lse
    strides = [s for t in extras for s in t.stride()]
    list_strides = [s for t in block_lists for s in t.stride()]
    common = _constexprs(config, q, D, Dv, block_sizes)
    tiles = triton.cdiv(M, common["BLOCK_M"])
    sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
           if q.device.type == "cuda" else None)
    splits = kv_splits(tiles * B * H, N, sms, config.get("kv_splits"))
    align = max(common["BLOCK_N"], common.get("SPARSE_KV", 0))
    per_split = triton.cdiv(triton.cdiv(max(N, 1), splits), align) * align
    splits = triton.cdiv(max(N, 1), per_split)
    o, l = out, lse
    if splits > 1:
        o = torch.empty(splits, B, H, M, Dv, dtype=torch.float32, device=q.device)
        l = torch.empty(splits, B, H, M, dtype=torch.float32, device=q.device)
    fn[(tiles, B * H, splits)](
        q, k, v, o, l, *extras, *block_lists, *q.stride(), *k.stride(), *v.stride(),
        *o.stride()[-4:], *strides, *list_strides, B, H, M, N, D, Dv, H // Hkv, float(scale),
        per_split, o.stride(0) if splits > 1 else 0, **common)
    if splits > 1:
        torch.logsumexp(l, 0, out=lse)
        # splits that saw no key have lse -inf and out 0; a row no split saw stays 0 / -inf
        weight = torch.exp(l - torch.where(torch.isfinite(lse), lse, 0.0))
        out.copy_((weight.unsqueeze(-1) * o).sum(0))
    return out, lse


# Query rows per program up to which a GQA group's heads are packed into one program's rows
PACKED_ROWS = 128


def packs_heads(ir) -> bool:
    """Whether the query heads of a GQA group may share programs, their rows stacked as one
    query tile: true when nothing the kernel evaluates depends on the query position, the
    query head or the query shape (m, h, M, H) -- attention over a cache (`full`, a window on
    the newest keys), not causal or per-head ALiBi -- and no block mask lists per head."""
    if ir.schedule.keys == "block_mask":
        return False
    exprs = [ir.score, *([ir.mask] if ir.mask is not None else []),
             *(x for ld in ir.loads for x in ld.index),
             *(x for seg in ir.segments for x in (seg.lo, seg.hi, seg.full_lo, seg.full_hi))]
    banned = {S.m, S.h, S.M, S.H, S.m_lo, S.m_hi}
    return not any(sympy.sympify(x).free_symbols & banned for x in exprs)


def launch_packed(fn, q, k, v, *args, **kw):
    """`launch` with each GQA group's query heads stacked along the rows, so every key and
    value tile is loaded once per group rather than once per query head (decoding: one row per
    head). Only for kernels where `packs_heads` holds; same results as `launch`."""
    B, H, M, D = q.shape
    group = H // k.shape[1]
    if group == 1 or M * group > PACKED_ROWS:
        return launch(fn, q, k, v, *args, **kw)
    out, lse = launch(fn, q.reshape(B, k.shape[1], group * M, D), k, v, *args, **kw)
    return out.reshape(B, H, M, -1), lse.reshape(B, H, M)


def backward_config(config: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles for the backward kernels: each holds a k/v tile and its dk/dv accumulators (or q,
    dO and dq) at once, so on a GPU they are smaller than the forward's."""
    if device.type != "cuda":
        return dict(config)
    size = 32 if dtype == torch.float32 else 64
    return {**config, "BLOCK_M": min(config["BLOCK_M"], size),
            "BLOCK_N": min(config["BLOCK_N"], size), "num_stages": min(config["num_stages"], 2)}


# Per-element param-gradient scratch (a param indexed by both m and n) is bounded to this many
# floats: beyond it the dq kernel runs on slabs of query tiles, each reduced before the next.
TILE_BUFFER_ELEMENTS = 1 << 26


def launch_backward(fns: dict, ir, q, k, v, extras: list[torch.Tensor], out, lse, dout, dlse,
                    scale: float, config: dict, block_lists=(), q_lists=(),
                    block_sizes: tuple[int, int] | None = None, on_partial=None):
    """Run the preprocess, dq and dk/dv kernels; returns dq, dk, dv. With `on_partial`, the
    param loads' partial sums are computed too and handed over as on_partial(load name, buffer,
    first row): per-element buffers once per slab of query rows, the others once at the end,
    always in the same order."""
    from attnc.backends.triton.backward import param_loads
    from attnc.backends.triton.codegen import PRELUDE_PREPROCESS

    B, H, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if B * H == 0 or M == 0 or N == 0:
        return dq, dk, dv
    dparams = on_partial is not None
    common = dict(_constexprs(config, q, D, Dv, block_sizes), DPARAMS=dparams)
    bm, bn = common["BLOCK_M"], common["BLOCK_N"]
    dout = dout.contiguous()
    delta = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    rows = B * H * M
    fns[PRELUDE_PREPROCESS][(triton.cdiv(rows, 32),)](
        out.contiguous(), dout, dlse.contiguous() if dlse is not None else delta, delta, rows, Dv,
        HAS_DLSE=dlse is not None, BLOCK_R=32, BLOCK_DV=pow2(Dv))
    qt, kt = triton.cdiv(M, bm), triton.cdiv(N, bn)

    def scratch(*shape):
        return torch.zeros(shape if dparams else (0,), dtype=torch.float32, device=q.device)

    shapes = {"program": (B * H, qt), "row": (B * H, M), "key": (B * H, N)}
    whole = {ld.name: scratch(*shapes[ld.level]) for kernel in ("dq", "dkdv")
             for ld, _ in param_loads(ir, kernel) if ld.level != "tile"}
    per_element = [ld.name for ld, _ in param_loads(ir, "dq") if ld.level == "tile"]
    slab = M
    if dparams and per_element:
        slab = min(M, max(bm, TILE_BUFFER_ELEMENTS // (B * H * N * len(per_element)) // bm * bm))
    strides = [s for t in extras for s in t.stride()]
    sizes = (B, H, M, N, D, Dv, H // Hkv, float(scale))
    for first in range(0, M, slab):
        count = min(slab, M - first)
        tiles = {name: scratch(B * H, count, N) for name in per_element}
        buffers = [tiles[ld.name] if ld.level == "tile" else whole[ld.name]
                   for ld, _ in param_loads(ir, "dq")]
        fns["dq"][(triton.cdiv(count, bm), B * H)](
            q, k, v, dout, lse, delta, dq, *extras, *buffers, *block_lists, *q.stride(),
            *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *strides,
            *[s for t in block_lists for s in t.stride()], *sizes, first // bm, count, **common)
        for name in tiles if dparams else ():
            on_partial(name, tiles[name], first)
    fns["dkdv"][(kt, B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, *extras,
        *[whole[ld.name] for ld, _ in param_loads(ir, "dkdv")], *q_lists, *q.stride(),
        *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *strides,
        *[s for t in q_lists for s in t.stride()], *sizes, **common)
    for name in whole if dparams else ():
        on_partial(name, whole[name], 0)
    return dq, dk, dv
