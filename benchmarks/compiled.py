"""Compiled code of attnc's kernels on sm_90, measured without a GPU (attnc.inspect).

    python -m benchmarks.compiled [--quick] [--specs ...] [--head-dim 128] [--dtype bf16]
        [--block 64] [--out FILE]
    python -m benchmarks.compiled --library [--out FILE] [--workers N]

Each spec's kernels are compiled as the launchers would launch them at B4 H16 N4096 (Triton and
the ptxas it ships, in subprocesses; no GPU) and read with cuobjdump: registers and spill bytes
per thread, shared memory, tensor-core instructions, the SASS count and the key loop's
instructions: all, MUFU (exp2, log2, rcp, ...) and tensor-core (HGMMA/HMMA).

Without --library: the normalizers. A general cascade's kernels are its schedule's stages
(forward, then backward), launched with --block x --block tiles, so each normalizer is compared
with softmax written as a general cascade (`softmax_general`) in the same kernel shape; the
FlashAttention-style softmax kernel (`causal`) is listed for reference at its own launch
configuration. "K/V reads" counts the forward stages that stream K or V: a k-pass schedule
should read them at most k times.

With --library: `attnc inspect --library`'s table (every library spec, softmax and linear
families and cascades, D = 128, bf16, N = 4096, default configurations), written to
benchmarks/results/inspect-sm_90.md unless --out names another file.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import common

SUITE = "compiled kernels (sm_90)"
LIBRARY_SUITE = "attnc inspect: library kernels (sm_90)"
MODULE = "benchmarks.compiled"
# Softmax through the general path: the math of `causal`, with its division guarded in a form
# online_softmax does not take, so the stage kernels run it (the other normalizers' reference
# point).
SOFTMAX_GENERAL = """cascade softmax_general {
  mask = n <= m + N - M
  QK[m, n] = Q[m, e] * K[n, e]
  S[m, n] = QK[m, n] * scale
  GM[m] = max(n) S[m, n]
  SN[m, n] = exp(S[m, n] - GM[m])
  SD[m] = sum(n) SN[m, n]
  AV[m, f] = sum(n) SN[m, n] * V[n, f]
  O[m, f] = where(SD[m] > 0, AV[m, f] / SD[m], 0)
}
"""
SPECS = ("causal", "softmax_general", "sigmoid_attn", "relu_attn", "softplus_attn",
         "standardized", "sink_softmax", "grouped", "stick_breaking", "sinkhorn")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _kernel(name: str, block: int):
    """The compiled spec; a general cascade launches its stages with block x block tiles."""
    import attnc
    from attnc.runtime.cascade import CascadeKernel
    kernel = attnc.compile(SOFTMAX_GENERAL if name == "softmax_general" else name)
    if isinstance(kernel, CascadeKernel):
        return attnc.compile(SOFTMAX_GENERAL if name == "softmax_general" else name,
                             block_m=block, block_n=block)
    return kernel


def _kv_reads(kernel) -> int:
    """The forward stages that stream K or V (1 for a FlashAttention-style kernel)."""
    plan = getattr(kernel, "plan", None)
    if plan is None or not hasattr(plan, "forward"):
        return 1
    return sum(any(t in ("K", "V") for t, _ in sk.memory) for sk in plan.forward)


def run(specs, dtype: str, block: int, head_dim: int, workers: int = 1) -> str:
    from attnc import inspect
    from attnc.backends.triton.aot_jobs import Shape
    shape = Shape(D=head_dim, dtype=DTYPES[dtype])
    rows = []
    for name in specs:
        kernel = _kernel(name, block)
        kv = _kv_reads(kernel)
        for r in inspect.inspect_kernel(kernel, shape, workers=workers, name=name):
            if not r["ok"]:
                rows.append([name, r["kernel"], "failed: " + r["error"][:80]] + [""] * 7)
                continue
            mix = r["loop_mix"]
            rows.append([name, r["kernel"], kv if r["kernel"].startswith("forward") else "",
                         r["registers"], f"{r['spill_bytes']['store']}/{r['spill_bytes']['load']}",
                         r["shared_bytes"], r["instructions"], r["loop_instructions"],
                         sum(n for op, n in mix.items() if op.startswith("MUFU")),
                         r["mma"]["loop_count"]])
    head = ["spec", "kernel", "K/V reads", "registers", "spill st/ld B", "shared B", "SASS",
            "loop SASS", "loop MUFU", "loop MMA"]
    return (inspect.header(shape, 90) + f" General cascades' stage tiles {block} x {block}.\n\n"
            + common.table(head, rows, "ll" + "r" * 8))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser, "two specs (a smoke run)")
    parser.add_argument("--specs", nargs="+", default=None, help=f"default: {' '.join(SPECS)}")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--library", action="store_true",
                        help="the whole library's `attnc inspect` table")
    parser.add_argument("--workers", type=int, default=1, help="compiling processes")
    args = parser.parse_args(argv)  # --device and --autotune are taken and unused: no launch
    if args.library:
        from attnc import inspect
        text = inspect.library_table(workers=args.workers)
        common.publish(torch.device(args.device),
                       args.out or str(common.RESULTS / "inspect-sm_90.md"), LIBRARY_SUITE,
                       MODULE, argv, text)
        return 0
    specs = args.specs or (["softmax_general", "sigmoid_attn"] if args.quick else SPECS)
    text = run(specs, args.dtype, args.block, args.head_dim, args.workers)
    common.publish(torch.device(args.device), args.out, f"{SUITE}, {args.block}x{args.block} "
                   f"tiles, head dim {args.head_dim}", MODULE, argv, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
