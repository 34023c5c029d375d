"""Compiled code of the normalizers: what each kernel costs on sm_90, measured without a GPU.

    python -m benchmarks.compiled [--quick] [--specs ...] [--head-dim 128] [--dtype bf16]
        [--block 64] [--out FILE]

Each spec is compiled by attnc, and its generated kernels are lowered by Triton for sm_90
(Hopper) in a subprocess (backends/triton/aot_check.py; Triton's bundled ptxas and cuobjdump,
no GPU needed). Per kernel the table gives registers and stack bytes (spills) per thread, the
SASS instruction count, and the key loop's instructions: all, MUFU (exp2, log2, rcp, ...) and
tensor-core (HGMMA/HMMA). A general cascade's kernels are its schedule's stages (forward,
then backward), all at one tile shape (--block x --block), so each normalizer is compared with
softmax written as a general cascade (`softmax_general`) in the same kernel shape; the
FlashAttention-style softmax kernel (`causal`) is listed for reference at its own launch
tiles. "K/V reads" counts the forward stages that stream K or V: a k-pass schedule should
read them at most k times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from benchmarks import common

SUITE = "compiled kernels (sm_90)"
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


def _kernel(name: str):
    import attnc
    return attnc.compile(SOFTMAX_GENERAL if name == "softmax_general" else name)


def jobs(name: str, dtype: str, block: int, head_dim: int) -> tuple[list[dict], list[str], int]:
    """The AOT jobs of a spec's kernels, their labels, and the forward's K/V-reading stages."""
    from attnc.backends.triton import aot_jobs
    from attnc.runtime.cascade import CascadeKernel
    kernel = _kernel(name)
    if isinstance(kernel, CascadeKernel):
        found = aot_jobs.cascade_jobs_for(kernel, dtype=dtype, block_p=block, block_l=block,
                                          block_d=head_dim, inspect=True)
        labels = [c.role for c in kernel.generated.kernels]
        kv = sum(any(t in ("K", "V") for t, _ in sk.memory) for sk in kernel.plan.forward)
        return found, labels, kv
    found = aot_jobs.jobs_for(kernel, dtype=dtype, block_d=head_dim)
    keep = [0, 3, 4] if len(found) > 3 else [0]  # forward (as launched), dq, dk/dv
    found = [{**found[i], "inspect": True} for i in keep if i < len(found)]
    labels = ["forward (FlashAttention kernel)", "dq", "dkdv"][:len(found)]
    return found, labels, 1


def run(specs, dtype: str, block: int, head_dim: int, python: str = sys.executable) -> str:
    from attnc.backends.triton import aot_check
    rows = []
    everything, where = [], []
    for name in specs:
        found, labels, kv = jobs(name, dtype, block, head_dim)
        where += [(name, label, kv) for label in labels]
        everything += found
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jobs.json")
        with open(path, "w") as f:
            json.dump(everything, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([python, aot_check.__file__, path], capture_output=True,
                              text=True, env=env, timeout=3600)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(results) != len(everything):
        raise RuntimeError(f"the AOT compile stopped: {proc.stderr[-2000:]}")
    for (name, label, kv), res in zip(where, results):
        if not res["ok"]:
            rows.append([name, label, "failed: " + res["error"][:80]] + [""] * 7)
            continue
        rows.append([name, label, kv if label.startswith("forward") else "",
                     res["registers"], res["stack_bytes"], res["shared_bytes"],
                     res["instructions"], res["loop_instructions"], res["loop_mufu"],
                     res["loop_mma"]])
    head = ["spec", "kernel", "K/V reads", "registers", "stack B", "shared B", "SASS",
            "loop SASS", "loop MUFU", "loop MMA"]
    return (f"Triton {results[0].get('triton', '?')}, sm_90, {dtype}, head dim {head_dim}, "
            f"stage tiles {block} x {block}.\n\n" + common.table(head, rows, "ll" + "r" * 8))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser, "two specs (a smoke run)")
    parser.add_argument("--specs", nargs="+", default=None, help=f"default: {' '.join(SPECS)}")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args(argv)  # --device and --autotune are taken and unused: no launch
    specs = args.specs or (["softmax_general", "sigmoid_attn"] if args.quick else SPECS)
    text = run(specs, args.dtype, args.block, args.head_dim)
    common.publish(torch.device(args.device), args.out, f"{SUITE}, {args.block}x{args.block} "
                   f"tiles, head dim {args.head_dim}", MODULE, argv, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
