"""Single-token decoding over a KV cache: attnc against FlexAttention and SDPA.

    python -m benchmarks.decode [--quick] [--device cuda|cpu] [--autotune/--no-autotune]
        [--out FILE] [--batches 1 4 16 64] [--cache 1024 4096 16384 65536 131072]
        [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--dtype bf16]
        [--flex compile|eager|off] [--mem-fraction 0.4] [--copy-mib 1024]

One query per sequence (q [B, Hq, 1, D]) attends to the whole cache (k, v [B, Hkv, N, D]), no
mask, GQA (Hq / Hkv query heads share a kv head). attnc runs `attnc.load("full")` called as
`kernel(q, k, v)`; the peers are `torch.compile(flex_attention)` (no block mask, so
FlexAttention picks its decoding kernel for a short query; `--flex eager` runs it uncompiled,
`--flex off` leaves it out; --quick uses eager: compiling takes long on a CPU) and
`F.scaled_dot_product_attention`, both with `enable_gqa=True`.

Decoding is memory-bound, so besides the time (us) the table gives the achieved bandwidth:

    bytes moved = K cache + V cache + q + out
                = (2 * B * Hkv * N * D + B * Hq * D + B * Hq * D) * bytes per element

divided by the time, and that as a share of the device's copy bandwidth, measured once per run
as a device-to-device copy of --copy-mib MiB: (bytes read + bytes written) / time. Ratios are
peer time / attnc time (> 1: attnc is faster). A combination whose K and V caches exceed
--mem-fraction of the free device memory is skipped (and listed as such).

Check before timing: attnc's output against an eager float32 reference (softmax over the whole
cache, one batch element at a time), relative error ||a - b|| / ||b||; over the dtype's
tolerance the suite exits 1 (the table is still written).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import attnc  # first: on a CPU-only machine it selects Triton's interpreter
from benchmarks import common

SUITE = "decode"
MODULE = "benchmarks.decode"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
GPU_SIZES = {"batches": [1, 4, 16, 64], "cache": [1024, 4096, 16384, 65536, 131072],
             "q_heads": 32, "kv_heads": 8, "head_dim": 128, "copy_mib": 1024}
QUICK_SIZES = {"batches": [1, 2], "cache": [64, 192], "q_heads": 4, "kv_heads": 2,
               "head_dim": 16, "copy_mib": 64}


# ----------------------------------------------------------------------------- formulas

def kv_cache_bytes(batch: int, kv_heads: int, cache: int, head_dim: int, value_dim: int,
                   element_size: int) -> int:
    """Bytes of the K and V caches."""
    return batch * kv_heads * cache * (head_dim + value_dim) * element_size


def decode_bytes(batch: int, q_heads: int, kv_heads: int, cache: int, head_dim: int,
                 value_dim: int, element_size: int) -> int:
    """Bytes one decoding step must move at least: read K, V and q, write out."""
    q = batch * q_heads * head_dim * element_size
    out = batch * q_heads * value_dim * element_size
    return kv_cache_bytes(batch, kv_heads, cache, head_dim, value_dim, element_size) + q + out


def gb_per_second(nbytes: int, ms: float) -> float:
    """Bandwidth in GB/s (1e9 bytes) of moving `nbytes` in `ms` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def _copy_ms(device, nbytes: int, bench_kw: dict) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return common.bench(lambda: dst.copy_(src), device, **bench_kw)


def copy_bandwidth(device, nbytes: int, bench_kw: dict) -> float:
    """GB/s of a device-to-device copy of `nbytes`: it reads and writes nbytes each."""
    ms = _copy_ms(device, nbytes, bench_kw)
    common.release(device)
    return gb_per_second(2 * nbytes, ms)


def free_memory(device) -> int | None:
    """Free bytes on the device (host memory for the CPU), None if unknown."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fits(kv_bytes: int, free: int | None, fraction: float) -> bool:
    return free is None or kv_bytes <= fraction * free


def reference(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of one query row per head over the whole cache, in float32, a batch
    element at a time (bounded extra memory); query head h reads kv head h // (Hq / Hkv)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty(B, Hq, M, v.shape[-1], dtype=torch.float32, device=q.device)
    for b in range(B):
        qb = q[b].float().view(Hkv, Hq // Hkv * M, D)
        kb, vb = k[b].float(), v[b].float()
        p = torch.softmax(qb @ kb.transpose(-1, -2) * scale, dim=-1)
        out[b] = (p @ vb).view(Hq, M, -1)
    return out


def peers(flex_mode: str) -> dict:
    """name -> callable(q, k, v) or the reason it is left out."""
    out = {}
    if flex_mode == "off":
        out["flex"] = "FlexAttention left out (--flex off)"
    else:
        flex = flex_attention
        if flex_mode == "compile":
            common.raise_recompile_limit()
            flex = torch.compile(flex_attention, dynamic=False)
        out["flex"] = lambda q, k, v, flex=flex: flex(q, k, v, enable_gqa=True)
    out["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return out


# ----------------------------------------------------------------------------- the suite

def run_case(kernel, batch, cache, args, dtype, peer_fns, notes: common.Notes,
             bench_kw: dict) -> dict:
    device = args.device
    D = args.head_dim
    esize = torch.empty((), dtype=dtype).element_size()
    kv = kv_cache_bytes(batch, args.kv_heads, cache, D, D, esize)
    row = {"batch": batch, "cache": cache, "kv_bytes": kv, "skipped": None,
           "bytes": decode_bytes(batch, args.q_heads, args.kv_heads, cache, D, D, esize),
           "attnc_us": None, "attnc_note": "", "err": None, "ok": False,
           **{f"{p}_us": None for p in peer_fns}, **{f"{p}_note": "" for p in peer_fns}}
    common.release(device)
    free = free_memory(device)
    if not fits(kv, free, args.mem_fraction):
        row["skipped"] = notes.mark(
            f"skipped: its K and V caches (the KV column) exceed {args.mem_fraction:.0%} of "
            f"the free {'device' if torch.device(device).type == 'cuda' else 'host'} memory, "
            f"measured before each size (--mem-fraction)")
        row["ok"] = True
        return row
    torch.manual_seed(0)
    q = common.randn(batch, args.q_heads, 1, D, device=device, dtype=dtype)
    k = common.randn(batch, args.kv_heads, cache, D, device=device, dtype=dtype)
    v = common.randn(batch, args.kv_heads, cache, D, device=device, dtype=dtype)
    try:
        out = kernel(q, k, v)
        row["err"] = common.relative_error(out.float(), reference(q, k, v))
        row["ok"] = row["err"] <= TOLERANCE[dtype]
        del out
        row["attnc_us"] = 1e3 * common.bench(lambda: kernel(q, k, v), device, **bench_kw)
    except Exception as exc:  # noqa: BLE001
        row["ok"] = False
        row["attnc_note"] = notes.mark(f"attnc failed: {common.reason(exc)}")
    common.release(device)
    for name, fn in peer_fns.items():
        if isinstance(fn, str):
            row[f"{name}_note"] = notes.mark(fn)
            continue
        try:
            err = common.relative_error(fn(q, k, v).float(), reference(q, k, v))  # also a warm-up
            if not err <= TOLERANCE[dtype]:
                row[f"{name}_note"] = notes.mark(
                    f"{name} differs from the float32 reference (relative error {err:.1e} at "
                    f"B = {batch}, N = {cache}); its time is shown anyway")
            row[f"{name}_us"] = 1e3 * common.bench(lambda: fn(q, k, v), device, **bench_kw)
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_note"] = notes.mark(f"{name} failed: {common.reason(exc)}")
        common.release(device)
    return row


def _num(x: float) -> str:
    """One decimal from 10 up, three significant digits below (CPU sizes are tiny)."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def format_row(row: dict, peer_names, hbm: float) -> list:
    head = [row["batch"], row["cache"], _num(row["kv_bytes"] / 2**20)]
    if row["skipped"]:
        return head + ["skipped " + row["skipped"]] + ["-"] * (len(headers(peer_names)) - 4)

    def us(name):
        value, note = row[f"{name}_us"], row[f"{name}_note"]
        if value is None:
            return "- " + note
        return f"{_num(value)} {note}".strip()

    def bw(name):
        value = row[f"{name}_us"]
        return "-" if value is None else _num(gb_per_second(row["bytes"], value / 1e3))
    attnc_bw = (None if row["attnc_us"] is None
                else gb_per_second(row["bytes"], row["attnc_us"] / 1e3))
    cells = head + [us("attnc"), bw("attnc"),
                    "-" if attnc_bw is None or not hbm else _num(100 * attnc_bw / hbm)]
    for name in peer_names:
        cells += [us(name), bw(name)]
    for name in peer_names:
        a, p = row["attnc_us"], row[f"{name}_us"]
        cells.append(_num(p / a) if a and p else "-")
    cells.append("-" if row["err"] is None else
                 f"{row['err']:.1e} {'ok' if row['ok'] else 'FAIL'}")
    return cells


def headers(peer_names) -> list[str]:
    cols = ["B", "cache N", "KV (MiB)", "attnc (us)", "attnc (GB/s)", "attnc (% copy BW)"]
    for name in peer_names:
        cols += [f"{name} (us)", f"{name} (GB/s)"]
    cols += [f"{name}/attnc" for name in peer_names]
    return cols + ["rel err vs fp32"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"batch sizes (default {GPU_SIZES['batches']})")
    parser.add_argument("--cache", type=int, nargs="+", default=None,
                        help=f"KV cache lengths N (default {GPU_SIZES['cache']})")
    parser.add_argument("--q-heads", type=int, default=None,
                        help=f"query heads (default {GPU_SIZES['q_heads']})")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help=f"kv heads (default {GPU_SIZES['kv_heads']})")
    parser.add_argument("--head-dim", type=int, default=None,
                        help=f"head dim (default {GPU_SIZES['head_dim']})")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--flex", choices=["compile", "eager", "off"], default=None,
                        help="how to run FlexAttention (default: compile; eager with --quick)")
    parser.add_argument("--mem-fraction", type=float, default=0.4,
                        help="skip sizes whose K and V caches exceed this share of free memory")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help=f"size of the bandwidth-probe copy (default {GPU_SIZES['copy_mib']})")
    args = parser.parse_args(argv)
    autotune = common.set_autotune(args)
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    for key in ("batches", "cache", "q_heads", "kv_heads", "head_dim", "copy_mib"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    if args.flex is None:
        args.flex = "eager" if args.quick else "compile"
    if args.q_heads % args.kv_heads:
        parser.error("--q-heads must be a multiple of --kv-heads")
    dtype = common.dtype_of(args.dtype)
    bench_kw = {"repeat": 1} if args.quick else {}

    hbm = copy_bandwidth(args.device, args.copy_mib * 2**20, bench_kw)
    print(f"copy bandwidth: {hbm:.1f} GB/s ({args.copy_mib} MiB device-to-device copy)",
          flush=True)
    kernel = attnc.load("full")
    peer_fns = peers(args.flex)
    names = list(peer_fns)
    notes = common.Notes()
    rows = []
    for batch in args.batches:
        for cache in args.cache:
            row = run_case(kernel, batch, cache, args, dtype, peer_fns, notes, bench_kw)
            rows.append(row)
            print(" | ".join(str(c) for c in format_row(row, names, hbm)), flush=True)

    flex_how = {"compile": "torch.compile(flex_attention, dynamic=False)",
                "eager": "flex_attention run eagerly (uncompiled)",
                "off": "FlexAttention left out"}[args.flex]
    body = [
        f"Decoding: q [B, {args.q_heads}, 1, {args.head_dim}] over k, v "
        f"[B, {args.kv_heads}, N, {args.head_dim}], {args.dtype}, no mask; attnc "
        f"`attnc.load(\"full\")(q, k, v)` (autotune {'on' if autotune else 'off'}) vs "
        f"flex ({flex_how}, enable_gqa=True) and sdpa "
        f"(F.scaled_dot_product_attention, enable_gqa=True).",
        f"Measured copy bandwidth of this device: **{hbm:.1f} GB/s** (device-to-device copy "
        f"of {args.copy_mib} MiB; (bytes read + bytes written) / median time).",
        "Bandwidth = bytes moved / time, bytes moved = (2 B Hkv N D + 2 B Hq D) x bytes per "
        "element (K and V caches read, q read, out written); `% copy BW` = attnc's bandwidth "
        "/ the copy bandwidth. Times are medians (common.bench); peer/attnc > 1 means attnc "
        "is faster.",
        f"Check: attnc vs an eager float32 softmax reference, ||a - b|| / ||b||, tolerance "
        f"{TOLERANCE[dtype]:g} for {args.dtype}. Sizes whose K and V caches exceed "
        f"{args.mem_fraction:.0%} of free memory are skipped.",
        "",
        common.table(headers(names), [format_row(r, names, hbm) for r in rows]),
    ]
    if notes.texts:
        body.append(notes.render())
    text = "\n".join(body)
    common.publish(args.device, args.out, SUITE, MODULE, argv, text)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
