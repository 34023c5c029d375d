"""Single-token decoding over a KV cache: attnc contiguous and paged against FlexAttention and
SDPA.

    python -m benchmarks.decode [--quick] [--device cuda|cpu] [--autotune/--no-autotune]
        [--out FILE] [--batches 1 4 16 64] [--cache 1024 4096 16384 65536 131072]
        [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--dtype bf16] [--page-sizes 16 128]
        [--flex compile|eager|off] [--mem-fraction 0.4] [--copy-mib 1024] [--sm90/--no-sm90]

One query per sequence (q [B, Hq, 1, D]) attends to the whole cache (k, v [B, Hkv, N, D]), no
mask, GQA (Hq / Hkv query heads share a kv head). attnc runs `attnc.load("full")` called as
`kernel(q, k, v)`, and its paged forward `kernel.paged` twice: on the contiguous cache's view
(`view`: k.permute(0, 2, 1, 3) as B pages of N slots, page table arange(B)) and on a paged
cache (`paged pP`, one per --page-sizes P: vLLM's layout [pages, P, Hkv, D], each sequence's
pages scattered at random over the pool, as a cache looks after many appends and frees). The
peers are `torch.compile(flex_attention)` (no block mask, so FlexAttention picks its decoding
kernel for a short query; `--flex eager` runs it uncompiled, `--flex off` leaves it out;
--quick uses eager: compiling takes long on a CPU) and `F.scaled_dot_product_attention`, both
with `enable_gqa=True`.

Decoding is memory-bound, so besides the time (us) the table gives the achieved bandwidth:

    bytes moved = K cache + V cache + q + out
                = (2 * B * Hkv * N * D + B * Hq * D + B * Hq * D) * bytes per element

divided by the time (the page table's 4 bytes per page are left out), and that as a share of
the device's copy bandwidth, measured once per run as a device-to-device copy of --copy-mib MiB:
(bytes read + bytes written) / time. Ratios are other time / attnc contiguous time (> 1: the
contiguous kernel is faster). A combination whose K and V caches exceed --mem-fraction of the
free device memory is skipped (and listed as such); the paged columns need room for a second
copy (the pool), else they alone are skipped.

Check before timing: every attnc output (contiguous, view, paged) against an eager float32
reference (softmax over the whole cache, one batch element at a time), relative error
||a - b|| / ||b||; over the dtype's tolerance the suite exits 1 (the table is still written).

Without a GPU nothing real is timed (the CPU columns time Triton's interpreter at the --quick
sizes). `--sm90` (the default on a CPU) adds what a GPU would run: the contiguous forward and
the paged kernel compiled for sm_90 exactly as their launchers launch them on an H100 at one
headline point (benchmarks.gather's machinery: `attnc inspect`'s rows, registers, spills, the
loop's SASS) and the loop instructions each runs per (sequence, query head): programs x warps x
loop iterations x loop SASS.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import attnc  # first: on a CPU-only machine it selects Triton's interpreter
from benchmarks import common

SUITE = "decode"
MODULE = "benchmarks.decode"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
GPU_SIZES = {"batches": [1, 4, 16, 64], "cache": [1024, 4096, 16384, 65536, 131072],
             "q_heads": 32, "kv_heads": 8, "head_dim": 128, "copy_mib": 1024,
             "page_sizes": [16, 128]}
QUICK_SIZES = {"batches": [1, 2], "cache": [64, 192], "q_heads": 4, "kv_heads": 2,
               "head_dim": 16, "copy_mib": 64, "page_sizes": [16]}
# the point the --sm90 figures are compiled for: decoding batch 16 over a 4k cache, GPU heads
SM90_POINT = {"batch": 16, "cache": 4096, "page_size": 16}


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
    out: dict[str, Any] = {}
    if flex_mode == "off":
        out["flex"] = "FlexAttention left out (--flex off)"
    else:
        flex: Callable = flex_attention
        if flex_mode == "compile":
            common.raise_recompile_limit()
            flex = torch.compile(flex_attention, dynamic=False)
        out["flex"] = lambda q, k, v, flex=flex: flex(q, k, v, enable_gqa=True)
    out["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return out


def paged_name(page_size: int) -> str:
    return f"paged p{page_size}"


def page_pools(k, v, page_size: int, seed: int = 0):
    """k, v [B, Hkv, N, D] moved into pools [B * ceil(N / P), P, Hkv, D] (vLLM's layout) with
    each sequence's pages at random places (one permutation for both), and the page table
    [B, ceil(N / P)] int32 that finds them."""
    B, H, N, _ = k.shape
    per = -(-N // page_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(B * per, generator=gen).to(k.device)
    pools = []
    for x in (k, v):
        pool = x.new_zeros(B * per, page_size, H, x.shape[-1])
        for b in range(B):  # one sequence at a time: the copy's extra memory stays small
            rows = pool.new_zeros(per * page_size, H, x.shape[-1])
            rows[:N] = x[b].transpose(0, 1)
            pool[order[b * per:(b + 1) * per]] = rows.view(per, page_size, H, -1)
        pools.append(pool)
    return pools[0], pools[1], order.view(B, per).to(torch.int32)


def paged_runs(kernel, q, k, v, page_sizes) -> dict:
    """name -> zero-argument callable for attnc's paged forward: `view` on the contiguous
    cache, and one per page size on pools built when first asked for (`make`)."""
    B, _, N, _ = k.shape
    lens = torch.full((B,), N, dtype=torch.int32, device=q.device)
    arange = torch.arange(B, dtype=torch.int32, device=q.device)[:, None]
    kv, vv = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    runs = {"view": lambda: lambda: kernel.paged(q, kv, vv, arange, lens)}
    for size in page_sizes:
        def make(size=size):
            k_pool, v_pool, table = page_pools(k, v, size)
            return lambda: kernel.paged(q, k_pool, v_pool, table, lens)
        runs[paged_name(size)] = make
    return runs


# ----------------------------------------------------------------------------- the suite

def _time_attnc(name, make, ref, row, notes, batch, cache, dtype, device, bench_kw) -> None:
    """Check and time one attnc implementation; a wrong result fails the row."""
    try:
        fn = make()
        err = common.relative_error(fn().float(), ref)
        row["err"] = max(row["err"] or 0.0, err)
        if not err <= TOLERANCE[dtype]:
            row["ok"] = False
            row[f"{name}_note"] = notes.mark(
                f"{name} differs from the float32 reference (relative error {err:.1e} at "
                f"B = {batch}, N = {cache})")
        row[f"{name}_us"] = 1e3 * common.bench(fn, device, **bench_kw)
    except Exception as exc:  # noqa: BLE001
        row["ok"] = False
        row[f"{name}_note"] = notes.mark(f"{name} failed: {common.reason(exc)}")
    common.release(device)


def run_case(kernel, batch, cache, args, dtype, peer_fns, notes: common.Notes,
             bench_kw: dict) -> dict:
    device = args.device
    D = args.head_dim
    esize = torch.empty((), dtype=dtype).element_size()
    kv = kv_cache_bytes(batch, args.kv_heads, cache, D, D, esize)
    attnc_names = ["attnc", "view"] + [paged_name(p) for p in args.page_sizes]
    names = attnc_names + list(peer_fns)
    row = {"batch": batch, "cache": cache, "kv_bytes": kv, "skipped": None,
           "bytes": decode_bytes(batch, args.q_heads, args.kv_heads, cache, D, D, esize),
           "err": None, "ok": True, **{f"{p}_us": None for p in names},
           **{f"{p}_note": "" for p in names}}
    common.release(device)
    free = free_memory(device)
    if not fits(kv, free, args.mem_fraction):
        row["skipped"] = notes.mark(
            f"skipped: its K and V caches (the KV column) exceed {args.mem_fraction:.0%} of "
            f"the free {'device' if torch.device(device).type == 'cuda' else 'host'} memory, "
            f"measured before each size (--mem-fraction)")
        return row
    torch.manual_seed(0)
    q = common.randn(batch, args.q_heads, 1, D, device=device, dtype=dtype)
    k = common.randn(batch, args.kv_heads, cache, D, device=device, dtype=dtype)
    v = common.randn(batch, args.kv_heads, cache, D, device=device, dtype=dtype)
    ref = reference(q, k, v)
    room = fits(2 * kv, free, args.mem_fraction)
    runs = {"attnc": lambda: lambda: kernel(q, k, v), **paged_runs(kernel, q, k, v,
                                                                     args.page_sizes)}
    for name, make in runs.items():
        if name.startswith("paged") and not room:
            row[f"{name}_note"] = notes.mark(
                f"skipped: a paged pool next to the contiguous cache exceeds "
                f"{args.mem_fraction:.0%} of the free memory (--mem-fraction)")
            continue
        _time_attnc(name, make, ref, row, notes, batch, cache, dtype, device, bench_kw)
    for name, fn in peer_fns.items():
        if isinstance(fn, str):
            row[f"{name}_note"] = notes.mark(fn)
            continue
        try:
            err = common.relative_error(fn(q, k, v).float(), ref)  # also a warm-up
            if not err <= TOLERANCE[dtype]:
                row[f"{name}_note"] = notes.mark(
                    f"{name} differs from the float32 reference (relative error {err:.1e} at "
                    f"B = {batch}, N = {cache}); its time is shown anyway")
            row[f"{name}_us"] = 1e3 * common.bench(lambda: fn(q, k, v), device, **bench_kw)
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_note"] = notes.mark(f"{name} failed: {common.reason(exc)}")
        common.release(device)
    return row


# ----------------------------------------------------------------------------- sm_90 figures

class _Recording:
    """A PagedKernel whose module records its launch (aot_jobs.recording) instead of running."""

    def __init__(self, paged_kernel, module):
        self._paged_kernel, self._module = paged_kernel, module

    def __getattr__(self, name):
        return getattr(self._paged_kernel, name)

    def module(self):
        return self._module


def paged_jobs(kernel, batch: int, cache: int, q_heads: int, kv_heads: int, head_dim: int,
               page_size: int, dtype: torch.dtype) -> list[dict]:
    """The aot_check job of `kernel.paged` decoding one row per sequence over pools of
    `page_size` pages, as its launcher launches it on a CUDA device (its CUDA configuration,
    recorded on meta tensors; k_start None as the suite calls it, so all 0: one table read per
    key tile where page_size allows). TODO(H1): a PagedKernel.aot_jobs would replace the
    recording here (it reaches into attnc.runtime.paged's launcher and swaps its
    configuration)."""
    from unittest import mock

    from attnc.backends.triton import aot_jobs
    from attnc.backends.triton.softmax import launch
    from attnc.runtime import paged

    def meta(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device="meta")

    pk = paged.companion(kernel)
    module, launches = aot_jobs.recording(pk.generated.kernels)
    per = -(-cache // page_size)
    lens = meta(batch, dt=torch.int32)
    k, v = (meta(batch * per, page_size, kv_heads, head_dim) for _ in range(2))

    def cuda_config(D, Dv, dt, device):
        return launch.default_config(D, Dv, dt, torch.device("cuda"))
    with mock.patch.object(paged, "default_config", cuda_config):
        paged._launch(cast(Any, _Recording(pk, module)), meta(batch, q_heads, 1, head_dim), k, v,
                      meta(batch, per, dt=torch.int32), lens, lens, lens, lens, [], [], 1.0, 0)
    return aot_jobs._labelled(pk.path, launches, 90, True)


def contiguous_jobs(kernel, batch: int, cache: int, q_heads: int, kv_heads: int,
                    head_dim: int, dtype: torch.dtype) -> list[dict]:
    """The contiguous forward's aot_check job at one decoding point (key splits as on an
    H100)."""
    from attnc.backends.triton import aot_jobs
    shape = aot_jobs.Shape(B=batch, H=q_heads, Hkv=kv_heads, N=cache, M=1, D=head_dim,
                           dtype=dtype)
    return aot_jobs.kernel_jobs(kernel, shape, backward=False, inspect=True)


def loop_work(job: dict, cache: int) -> tuple[int, float]:
    """(programs, loop iterations per program) of a decoding launch: a program per query
    tile, (b, head) and key split, each walking its share of the N keys BLOCK_N at a time
    (heads here: the launch's H, kv heads when the forward packs a query-head group in M, or
    when the paged kernel packs one (PACKED) in GROUP * QROWS rows)."""
    from attnc.backends.triton import aot_jobs
    v = aot_jobs.values(job)
    rows, heads = v.get("M", v.get("QROWS")), v["H"]
    if v.get("PACKED"):
        rows, heads = rows * v["GROUP"], heads // v["GROUP"]
    splits = job["config"].get("kv_splits", 1)
    programs = -(-rows // v["BLOCK_M"]) * v["B"] * heads * splits
    return programs, cache / splits / v["BLOCK_N"]


def sm90_section(kernel, points, args, dtype) -> str:
    """The contiguous and paged decoding kernels compiled for sm_90 at each (batch, cache,
    page size) point, and their estimated loop work per (sequence, query head)."""
    from attnc import inspect
    labelled = []
    for batch, cache in points:
        jobs = [("contiguous", j) for j in contiguous_jobs(
            kernel, batch, cache, args.q_heads, args.kv_heads, args.head_dim, dtype)
            if j["kernel"] == "forward"]
        jobs += [(paged_name(p), j) for p in args.page_sizes for j in paged_jobs(
            kernel, batch, cache, args.q_heads, args.kv_heads, args.head_dim, p, dtype)]
        labelled += [(batch, cache, name, j) for name, j in jobs]
    # many points compile to the same binary (Triton specializes on divisibility, not sizes)
    unique: dict[str, dict] = {}
    for *_, j in labelled:
        unique.setdefault(_compile_key(j), j)
    compiled = dict(zip(unique, inspect.compile_jobs(list(unique.values()), 2)))
    rows, work = [], []
    for batch, cache, name, j in labelled:
        row = inspect._row(f"{name} B={batch} N={cache}", j, compiled[_compile_key(j)], 90)
        rows.append(row)
        if not row["ok"]:
            continue
        programs, iterations = loop_work(j, cache)
        per = programs * row["config"]["num_warps"] * iterations * row["loop_instructions"]
        work.append([batch, cache, name, programs, j["config"].get("kv_splits", 1),
                     f"{iterations:.0f}", row["loop_instructions"],
                     common.fmt(per / (batch * args.q_heads), ".0f")])
    return (inspect.table(rows, spec_column=True) + "\n"
            + common.table(["B", "cache N", "kernel", "programs", "key splits",
                            "loop iterations / program", "loop SASS",
                            "loop SASS / (sequence x query head)"], work)
            + "\nloop SASS / (sequence x query head): programs x warps x iterations x the "
              "loop's SASS, per sequence and query head, for one decoding step.\n")


def _compile_key(job: dict) -> str:
    import json

    from attnc.backends.triton import aot_jobs
    specialized = sorted((k, aot_jobs._specialized(v)) for k, v in job["args"].items())
    return json.dumps([job["function"], job["constexprs"], job["options"], specialized],
                      sort_keys=True, default=str)


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
    parser.add_argument("--page-sizes", type=int, nargs="+", default=None,
                        help=f"paged cache page sizes (default {GPU_SIZES['page_sizes']})")
    parser.add_argument("--sm90", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decoding kernels for sm_90 and estimate their work "
                             "(default: on a CPU without --quick, which then times nothing)")
    args = parser.parse_args(argv)
    autotune = common.set_autotune(args)
    cuda = torch.device(args.device).type == "cuda"
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    for key in ("batches", "cache", "q_heads", "kv_heads", "head_dim", "copy_mib",
                "page_sizes"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    if args.flex is None:
        args.flex = "eager" if args.quick else "compile"
    if args.q_heads % args.kv_heads:
        parser.error("--q-heads must be a multiple of --kv-heads")
    if any(p < 1 for p in args.page_sizes):
        parser.error("--page-sizes must be positive")
    if args.sm90 is None:
        args.sm90 = not cuda and not args.quick
    dtype = common.dtype_of(args.dtype)
    kernel = attnc.load("full")
    points = [(b, n) for b in args.batches for n in args.cache]
    compiled = sm90_section(kernel, points, args, dtype) if args.sm90 else ""
    if not cuda and not args.quick:
        text = (f"No GPU: nothing timed. Decoding q [B, {args.q_heads}, 1, {args.head_dim}] "
                f"over a {args.kv_heads}-head cache, {args.dtype}: `attnc.load(\"full\")` "
                f"(contiguous) and its `kernel.paged` (page sizes "
                f"{', '.join(map(str, args.page_sizes))}), compiled for sm_90 as their "
                f"launchers launch them on an H100.\n\n" + compiled)
        common.publish(args.device, args.out, SUITE, MODULE, argv, text)
        return 0
    bench_kw = {"repeat": 1} if args.quick else {}

    hbm = copy_bandwidth(args.device, args.copy_mib * 2**20, bench_kw)
    print(f"copy bandwidth: {hbm:.1f} GB/s ({args.copy_mib} MiB device-to-device copy)",
          flush=True)
    peer_fns = peers(args.flex)
    names = ["view"] + [paged_name(p) for p in args.page_sizes] + list(peer_fns)
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
        f"`attnc.load(\"full\")(q, k, v)` (autotune {'on' if autotune else 'off'}), its "
        f"`kernel.paged` on the contiguous cache's view (view) and on paged pools (paged pP: "
        f"pages of P tokens, each sequence's pages at random places) vs "
        f"flex ({flex_how}, enable_gqa=True) and sdpa "
        f"(F.scaled_dot_product_attention, enable_gqa=True).",
        f"Measured copy bandwidth of this device: **{hbm:.1f} GB/s** (device-to-device copy "
        f"of {args.copy_mib} MiB; (bytes read + bytes written) / median time).",
        "Bandwidth = bytes moved / time, bytes moved = (2 B Hkv N D + 2 B Hq D) x bytes per "
        "element (K and V caches read, q read, out written); `% copy BW` = attnc's bandwidth "
        "/ the copy bandwidth. Times are medians (common.bench); other/attnc > 1 means attnc's "
        "contiguous kernel is faster.",
        f"Check: every attnc output vs an eager float32 softmax reference, ||a - b|| / ||b||, "
        f"tolerance {TOLERANCE[dtype]:g} for {args.dtype}. Sizes whose K and V caches exceed "
        f"{args.mem_fraction:.0%} of free memory are skipped.",
        "",
        common.table(headers(names), [format_row(r, names, hbm) for r in rows]),
    ]
    if notes.texts:
        body.append(notes.render())
    if compiled:
        body += ["", "Compiled for sm_90 (not timed):", "", compiled]
    text = "\n".join(body)
    common.publish(args.device, args.out, SUITE, MODULE, argv, text)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
