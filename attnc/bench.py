"""`attnc bench SPEC`: tune one kernel on random operands, report the chosen configurations and
the tuned kernel's times.

Tuning is forced on for the kernel being benched. Every launch the kernel makes is tuned at the
given shape -- the forward, and (with `backward`) the backward kernels of a softmax spec; a
`linear` spec's forward kernel and its chunked backward's core kernels (a sequential scan's
generated backward keeps fixed tiles) -- and the winners are written to the cache, so later
processes use them without tuning. Then the forward (and forward +
backward) are timed with `attnc.autotune.measure`: Triton's do_bench on a GPU, wall time in the
interpreter. Peer comparisons live in the `benchmarks` package, not here.
"""

from __future__ import annotations

import torch

from attnc import autotune
from attnc.ir.cascade import TensorKind
from attnc.testing import random_inputs, random_linear_inputs

LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BV", "num_warps", "num_stages", "DQ_BLOCK_M", "DQ_BLOCK_N",
               "dq_num_warps", "dq_num_stages")


def describe(cfg: dict) -> str:
    return " ".join(f"{k}={cfg[k]}" for k in LAUNCH_KEYS if k in cfg)


def report(records: list[dict]) -> list[str]:
    """Lines for each launch configuration: the choice, then every candidate tried."""
    lines = []
    for rec in records:
        if rec.get("source") != "tuned":
            lines.append(f"{rec['kind']}: {describe(rec)} (heuristic default)")
            continue
        lines.append(f"{rec['kind']}: {describe(rec)} (tuned at shape {rec['shape']} over "
                     f"{len(rec['trials'])} candidates)")
        for i, t in enumerate(rec["trials"]):
            time = f"{t['ms']:10.4f} ms" if t["ms"] is not None else f"  dropped: {t['note']}"
            mark = " <- chosen" if t["config"] == {k: rec[k] for k in t["config"]} else ""
            lines.append(f"    {describe(t['config']):<52}{time}"
                         f"{' (default)' if i == 0 else ''}{mark}")
    return lines


def bench_attention(kernel, *, B: int, H: int, Hkv: int, M: int, N: int, D: int, Dv: int,
                    dtype: torch.dtype, device: torch.device, backward: bool = True,
                    seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    q, k, v = randn(B, H, M, D), randn(B, Hkv, N, D), randn(B, Hkv, N, Dv)
    inputs = random_inputs(kernel, B, H, M, N, device=device, generator=gen)
    backward = backward and kernel.kernel_ir.grad is not None
    leaves = [q, k, v] + [t for d, t in zip(kernel.kernel_ir.inputs, inputs.values())
                          if d.kind is TensorKind.PARAM]
    for t in leaves if backward else ():
        t.requires_grad_(True)
    dout = randn(B, H, M, Dv)

    def forward():
        return kernel(q, k, v, **inputs)

    def step():
        forward().backward(dout)
    return _tune_then_time(kernel, forward, step if backward else None, step if backward
                           else forward, device)


def bench_linear(kernel, *, B: int, H: int, T: int, D: int, Dv: int, dtype: torch.dtype,
                 device: torch.device, backward: bool = True, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
            for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=gen).to(device=device, dtype=dtype)
    inputs = {n: t.to(device) for n, t in random_linear_inputs(kernel, B, H, T, D, Dv,
                                                               generator=gen).items()}
    for t in (q, k, v) if backward else ():
        t.requires_grad_(True)
    dout = torch.randn(B, H, T, Dv, generator=gen).to(device=device, dtype=dtype)

    def forward():
        return kernel(q, k, v, **inputs)

    def step():
        forward().backward(dout)
    note = None
    if kernel.why_not_chunked is not None:
        note = "backward: the generated recurrent backward (its tiles are not tuned)"
    return _tune_then_time(kernel, forward, step if backward else None,
                           step if backward else forward, device, f" ({kernel.algorithm})", note)


def _tune_then_time(kernel, forward, step, tune, device, label: str = "",
                    note: str | None = None) -> list[str]:
    """Run tune() with the kernel's tuning on (every launch it makes is tuned and cached),
    report the configurations, then time forward() and, if given, step() (forward+backward)."""
    kernel.autotune = True
    try:
        tune()
    finally:
        kernel.autotune = None
    lines = report(kernel.launch_records) + ([note] if note and step else [])
    with torch.no_grad():
        lines.append(f"forward{label}: {autotune.measure(forward, device):.4f} ms")
    if step is not None:
        lines.append(f"forward + backward: {autotune.measure(step, device):.4f} ms")
    return lines
