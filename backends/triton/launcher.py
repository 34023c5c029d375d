"""Launch a generated attention kernel: launch configuration and the call itself."""

from __future__ import annotations

import torch
import triton

from attnc.backends.triton import interpreting


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def default_config(D: int, Dv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Heuristic tile sizes (autotuning comes later); shrink tiles for wide heads and fp32."""
    bd, bdv = _pow2(D), _pow2(Dv)
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
    block mask's sizes bound the tiles (a tile never straddles a block of the mask)."""
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    sparse = {}
    if block_sizes is not None:
        bm, bn = min(bm, block_sizes[0]), min(bn, block_sizes[1])
        sparse = {"SPARSE_Q": block_sizes[0], "SPARSE_KV": block_sizes[1]}
    ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), IEEE=ieee,
                UPCAST=interpreting(), **sparse, num_warps=config["num_warps"],
                num_stages=config["num_stages"])


def launch(fn, q, k, v, extras: list[torch.Tensor], scale: float, config: dict,
           block_lists: list[torch.Tensor] = (), block_sizes: tuple[int, int] | None = None):
    """Run the kernel; a block-sparse kernel also gets its block mask's four lists (already
    broadcast to [B, H, ...]) and the mask's (query, key) block sizes."""
    B, H, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, M, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    if M == 0 or B * H == 0:
        return out, lse
    strides = [s for t in extras for s in t.stride()]
    list_strides = [s for t in block_lists for s in t.stride()]
    common = _constexprs(config, q, D, Dv, block_sizes)
    grid = (triton.cdiv(M, common["BLOCK_M"]), B * H)
    fn[grid](q, k, v, out, lse, *extras, *block_lists, *q.stride(), *k.stride(), *v.stride(),
             *out.stride(), *strides, *list_strides, B, H, M, N, D, Dv, H // Hkv, float(scale),
             **common)
    return out, lse


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
        HAS_DLSE=dlse is not None, BLOCK_R=32, BLOCK_DV=_pow2(Dv))
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
