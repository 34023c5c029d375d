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
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    sparse = {}
    if block_sizes is not None:  # tiles never straddle a block of the mask
        bm, bn = min(bm, block_sizes[0]), min(bn, block_sizes[1])
        sparse = {"SPARSE_Q": block_sizes[0], "SPARSE_KV": block_sizes[1]}
    list_strides = [s for t in block_lists for s in t.stride()]
    grid = (triton.cdiv(M, bm), B * H)
    ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    fn[grid](q, k, v, out, lse, *extras, *block_lists, *q.stride(), *k.stride(), *v.stride(),
             *out.stride(), *strides, *list_strides, B, H, M, N, D, Dv, H // Hkv, float(scale),
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
             IEEE=ieee, UPCAST=interpreting(), **sparse,
             num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out, lse
