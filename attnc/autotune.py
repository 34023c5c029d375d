"""Launch-configuration tuning: tile sizes, warps and pipeline stages, measured on the device.

Contract: `tune(run, candidates, device)` times `run(config)` for each candidate config and
returns the fastest, with every candidate's time or the reason it was dropped. A candidate is
dropped when it fails to compile or launch (Triton's out-of-resources, say) or when its outputs
differ from the first candidate's (the heuristic default, always first) by more than the dtype
allows: a miscompiled configuration never wins silently.

Candidates come from a small grid per kernel kind, pruned before anything compiles:
  * shared memory: the tiles a kernel keeps in flight (its pipelined k/v or q/dO loads times the
    stages, plus the tiles it stages for its dots) must fit the device's per-block limit
    (227 KiB on H100), so wide heads get fewer stages and smaller tiles;
  * registers: a program's fp32 accumulators spread over its threads must stay under 128 per
    thread, or the kernel spills;
  * warps: a tile's rows must keep every warp on rows of its own (16 each; a Hopper warpgroup
    takes 64): more warps than that compute the same rows twice;
  * the launch options the user fixed (`block_m=`, `num_warps=`, ...) are kept as given.
The backward's two kernels (dq, dk/dv) each have their own grid and are pruned apart; its
candidates pair every dk/dv choice with every dq choice (one flat config, see
backends/triton/softmax/launch.Config), since the two are timed together.
Off a GPU (Triton's interpreter) the grid is two tile sizes: tuning there measures the
interpreter, which is only useful for testing the tuner itself (warps mean nothing there).

Whether a kernel tunes: the compile option `autotune=` if given, else the environment variable
ATTNC_AUTOTUNE (1/true/on). The runtime (attnc/runtime/base.py) persists the winner in the cache per
(kernel, head dims, dtype, device), so a new process reuses it instead of tuning again.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from attnc import cache
from attnc.backends.triton.softmax.launch import DQ_KEYS, pow2, rows_per_warp_ok

TUNE_ENV = "ATTNC_AUTOTUNE"
REGISTERS_PER_THREAD = 128  # fp32 accumulator values per thread before spilling is likely
FALLBACK_SHARED_MEMORY = 99 * 1024  # when the device does not say (a consumer GPU's limit)
OPTIONS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def enabled(option: bool | None) -> bool:
    if option is not None:
        return bool(option)
    return os.environ.get(TUNE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (opt-in maximum)."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        try:
            import triton
            limit = triton.runtime.driver.active.utils.get_device_properties(
                device.index if device.index is not None else torch.cuda.current_device()
            )["max_shared_mem"]
        except Exception:  # an older driver API: assume the smallest common limit
            limit = FALLBACK_SHARED_MEMORY
    return int(limit)


def forward_shared_memory(cfg: dict, D: int, Dv: int, itemsize: int) -> int:
    """Estimate for the forward kernel: k and v tiles per pipeline stage, the q tile, and the
    probabilities staged for the second dot."""
    bm, bn, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], max(1, cfg["num_stages"])
    bd, bdv = pow2(D), pow2(Dv)
    return itemsize * (bm * bd + stages * bn * (bd + bdv) + bm * bn)


def dkdv_shared_memory(cfg: dict, D: int, Dv: int, itemsize: int) -> int:
    """Estimate for the dk/dv kernel: its resident k and v tiles, q and dO tiles per stage, and
    the probability and gradient tiles staged for its dots."""
    bm, bn, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], max(1, cfg["num_stages"])
    bd, bdv = pow2(D), pow2(Dv)
    return itemsize * (bn * (bd + bdv) + stages * bm * (bd + bdv) + 2 * bm * bn)


def dq_shared_memory(cfg: dict, D: int, Dv: int, itemsize: int) -> int:
    """Estimate for the dq kernel: its resident q and dO tiles, k and v tiles per stage, and the
    gradient tile staged for its last dot."""
    bm, bn, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], max(1, cfg["num_stages"])
    bd, bdv = pow2(D), pow2(Dv)
    return itemsize * (bm * (bd + bdv) + stages * bn * (bd + bdv) + bm * bn)


SHARED_MEMORY = {"forward": forward_shared_memory, "dkdv": dkdv_shared_memory,
                 "dq": dq_shared_memory}


def _registers_ok(cfg: dict, rows: int, D: int, Dv: int) -> bool:
    accumulators = rows * (pow2(D) + pow2(Dv))  # fp32 values a program keeps live
    return accumulators <= REGISTERS_PER_THREAD * 32 * cfg["num_warps"]


def rows(kernel: str, cfg: dict) -> int:
    """The rows of `kernel`'s tiles, split among its warps: keys for the dk/dv kernel (it works
    in the k.q^T orientation), queries for the forward and dq kernels."""
    return cfg["BLOCK_N"] if kernel == "dkdv" else cfg["BLOCK_M"]


def fits(kernel: str, cfg: dict, D: int, Dv: int, itemsize: int, limit: int,
         warps_matter: bool = True, registers: bool = True) -> bool:
    """Whether one kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) passes the pruning rules
    (shared memory; with `registers` the register budget; with `warps_matter` no warp
    repeating another's rows)."""
    r = rows(kernel, cfg)
    return (SHARED_MEMORY[kernel](cfg, D, Dv, itemsize) <= limit
            and (not registers or _registers_ok(cfg, r, D, Dv))
            and (not warps_matter or rows_per_warp_ok(r, cfg["num_warps"])))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) choices on a GPU: the forward's, and each backward
# kernel's (the dk/dv kernel's rows are its BLOCK_N keys; asymmetric tiles let the kernel that
# holds more rows take 128 of them on two warpgroups)
GRIDS = {
    ("forward", "low"): ((64, 128), (64, 128), (4, 8), (2, 3, 4)),
    ("forward", "fp32"): ((32, 64), (32, 64), (4, 8), (2, 3)),
    ("dkdv", "low"): ((32, 64), (64, 128), (4, 8), (2, 3)),
    ("dq", "low"): ((64, 128), (32, 64), (4, 8), (2, 3)),
    ("dkdv", "fp32"): ((16, 32), (32, 64), (2, 4), (1, 2)),
    ("dq", "fp32"): ((32, 64), (16, 32), (2, 4), (1, 2)),
}
INTERPRETER_GRIDS = {"forward": ((16, 32), (16, 32), (4,), (1,)),
                     "dkdv": ((16, 32), (32,), (4,), (1,)), "dq": ((32,), (16, 32), (4,), (1,))}
KERNELS = {"forward": ("forward",), "backward": ("dkdv", "dq")}


def candidates(kind: str, default: dict, D: int, Dv: int, dtype: torch.dtype,
               device: torch.device, fixed: dict) -> list[dict]:
    """The default first, then every grid point of this device's grid that fits its shared
    memory and matches `fixed` (upper-case BLOCK_M/BLOCK_N keys, like the configs). `kind` is
    "forward" or "backward", optionally with a suffix ("backward-m64")."""
    base = kind.split("-")[0]
    precision = "fp32" if dtype == torch.float32 else "low"
    on_gpu = device.type == "cuda"
    grids = {kernel: GRIDS[(kernel, precision)] if on_gpu else INTERPRETER_GRIDS[kernel]
             for kernel in KERNELS[base]}
    return prune(base, default, grids, D, Dv, dtype, shared_memory_limit(device), fixed,
                 warps_matter=on_gpu)


def prune(kind: str, default: dict, grids: Mapping[str, tuple], D: int, Dv: int,
          dtype: torch.dtype, limit: int, fixed: dict, warps_matter: bool = True) -> list[dict]:
    """`default`, then the configs of `grids` (per kernel of `kind`, as in GRIDS) within `limit`
    bytes of shared memory, the register budget and the warps' rows, agreeing with `fixed`. A
    backward config pairs a dk/dv choice with a dq choice, the dq's under its DQ_ keys. Where
    no choice of a kernel keeps within the register budget (heads so wide that 16 rows per warp
    already exceed it) its spilling choices are kept, for the timing to decide among."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_kernel = []
    for kernel in KERNELS[kind]:
        choices = [dict(zip(OPTIONS, point)) for point in itertools.product(*grids[kernel])]
        fitting = [cfg for cfg in choices
                   if fits(kernel, cfg, D, Dv, itemsize, limit, warps_matter)] or [
            cfg for cfg in choices
            if fits(kernel, cfg, D, Dv, itemsize, limit, warps_matter, registers=False)]
        per_kernel.append([{DQ_KEYS[k]: v for k, v in cfg.items()} if kernel == "dq" else cfg
                           for cfg in fitting])
    out = [dict(default)]
    for parts in itertools.product(*per_kernel):
        cfg = {k: v for part in parts for k, v in part.items()}
        if any(cfg.get(k) != v for k, v in fixed.items()) or cfg in out:
            continue
        out.append(cfg)
    return out


# linear kernels: (BV, num_warps, num_stages) on a GPU; BV is further limited per spec
LINEAR_GRIDS = {"chunked": ((16, 32, 64), (2, 4, 8), (1, 2, 3)),
                "recurrent": ((16, 32, 64), (1, 2, 4), (1, 3))}
LINEAR_INTERPRETER_GRID = ((16, 32, 64), (4,), (1,))


def linear_shared_memory(cfg: dict, BK: int, states: int, BT: int, itemsize: int) -> int:
    """Estimate for the chunked linear kernel: q, k (BT x BK) and v (BT x BV) tiles per stage,
    each state (BK x BV, fp32) staged for its dots, and the BT x BT score tile."""
    bv, stages = cfg["BV"], max(1, cfg["num_stages"])
    return itemsize * stages * BT * (2 * BK + bv) + 4 * (states * BK * bv + BT * BT)


def linear_candidates(algorithm: str, default: Mapping, widths: tuple[int, ...], BK: int,
                      states: int, BT: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """`default`, then (BV in `widths`) x warps x stages that fit: each program keeps its states
    (BK x BV fp32 each) in registers, and the chunked kernel's tiles in shared memory."""
    grid = LINEAR_GRIDS[algorithm] if device.type == "cuda" else LINEAR_INTERPRETER_GRID
    limit = shared_memory_limit(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = [dict(default)]
    for bv, warps, stages in itertools.product(*grid):
        cfg = {"BV": bv, "num_warps": warps, "num_stages": stages}
        if bv not in widths or cfg in out:
            continue
        if states * BK * bv > REGISTERS_PER_THREAD * 32 * warps:
            continue
        if algorithm == "chunked" and linear_shared_memory(cfg, BK, states, BT, itemsize) > limit:
            continue
        out.append(cfg)
    return out


@dataclass(frozen=True)
class Trial:
    config: dict
    ms: float | None
    note: str = ""


@dataclass(frozen=True)
class Result:
    best: dict
    trials: tuple[Trial, ...] = field(default_factory=tuple)


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]


def _max_rel_error(got, want) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        if a is None or b is None or b.numel() == 0:
            continue
        a, b = a.double(), b.double()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return float("inf")
        diff = (a[finite] - b[finite]).norm()
        worst = max(worst, float(diff / b[finite].norm().clamp_min(1e-30)))
    return worst


def measure(fn, device: torch.device) -> float:
    """Median milliseconds of fn(): do_bench on a GPU, wall time in the interpreter."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def tune(run, configs: list[dict], device: torch.device, dtype: torch.dtype) -> Result:
    """Time run(config) for each config (outputs: a tuple of tensors, compared with the first
    config's); the fastest valid one wins. Raises if no candidate runs."""
    reference, trials = None, []
    for cfg in configs:
        try:
            outputs = tuple(run(cfg))
            if reference is None:
                reference = outputs
            else:
                err = _max_rel_error(outputs, reference)
                if err > tolerance(dtype):
                    trials.append(Trial(cfg, None, f"differs from the default by {err:.1e}"))
                    continue
            trials.append(Trial(cfg, measure(lambda: run(cfg), device)))
        except Exception as exc:  # noqa: BLE001 - any failure only disqualifies this candidate
            if reference is None:
                raise
            trials.append(Trial(cfg, None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                                if str(exc) else type(exc).__name__))
    timed = [t for t in trials if t.ms is not None]
    best = min(timed, key=lambda t: t.ms or 0.0)
    dropped = [t for t in trials if t.note.startswith("differs")]
    if dropped:
        warnings.warn(f"attnc autotune: {len(dropped)} configuration(s) gave results different "
                      f"from the default and were dropped: {[t.config for t in dropped]}",
                      RuntimeWarning, stacklevel=3)
    return Result(best.config, tuple(trials))


def record(result: Result, kind: str, shape: tuple) -> dict:
    """The config as persisted: the winner's launch options, how it was chosen, every trial."""
    return {**result.best, "source": "tuned", "kind": kind, "shape": list(shape),
            "trials": [{"config": t.config, "ms": t.ms, "note": t.note} for t in result.trials]}


RECORD_KEYS = ("source", "kind", "shape", "trials")


def config_key(kernel_key: str, kind: str, q: torch.Tensor, v: torch.Tensor, fixed: dict) -> str:
    """Cache key of a launch configuration: (kernel, which launch, dtype, device, head dims,
    the options the user fixed)."""
    cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else "interpreter"
    return cache.digest(kernel_key, kind, str(q.dtype), str(cap), str(q.shape[-1]),
                        str(v.shape[-1]), repr(sorted(fixed.items())))


def resolve(memo: dict, kernel_key: str, kind: str, q: torch.Tensor, v: torch.Tensor,
            fixed: dict, default, make_candidates, run, tuning: bool, shape: tuple) -> dict:
    """The launch configuration of one launch `kind` of a kernel: from `memo`, else the disk
    cache, else `default()`. With `run` and `tuning` and nothing tuned stored yet,
    make_candidates() are tuned on run(config) and the winner is written to the cache (a new
    process reuses it); a call with an empty q or v launches nothing and so tunes nothing.
    memo[key] keeps the whole record; the launch options are returned."""
    if q.numel() == 0 or v.numel() == 0:
        run = None
    key = config_key(kernel_key, kind, q, v, fixed)
    cfg = memo.get(key) or _stored(key, kind, default)
    if run is not None and tuning and (cfg is None or cfg.get("source") != "tuned"):
        cfg = record(tune(run, make_candidates(), q.device, q.dtype), kind, shape)
        cache.write_config(key, cfg)
    elif cfg is None:
        cfg = {**default(), "source": "default", "kind": kind}
    memo[key] = cfg
    return {k: v for k, v in cfg.items() if k not in RECORD_KEYS}


def _stored(key: str, kind: str, default) -> dict | None:
    """The tuned record cached under `key`, or None. A record that does not fit this launch
    (damaged, or from another version) is ignored with a warning, so the call retunes or runs
    the default instead of crashing or launching with nonsense."""
    cfg = cache.read_config(key)
    if cfg is None or _fits(cfg, kind, default()):
        return cfg
    cache.report_damaged(f"launch configuration {key[:16]}",
                         f"it is not a tuned {kind} record with the launch options "
                         f"{sorted(default())}", cache.IGNORED)
    return None


def _fits(cfg: dict, kind: str, default: Mapping) -> bool:
    """Whether a stored record is a tuned one for `kind` with `default`'s launch options, all
    positive integers, the tile sizes (upper-case) powers of two."""
    options = {k: v for k, v in cfg.items() if k not in RECORD_KEYS}
    return (cfg.get("source") == "tuned" and cfg.get("kind") == kind
            and isinstance(cfg.get("shape"), list) and isinstance(cfg.get("trials"), list)
            and options.keys() == default.keys()
            and all(type(v) is int and v > 0 for v in options.values())
            and all(v & (v - 1) == 0 for k, v in options.items() if k.isupper()))
