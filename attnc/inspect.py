"""What a spec's kernels compile to on a GPU, read without one (`attnc inspect`).

Every kernel of a spec is compiled as its launcher would launch it at a given shape (launch
configuration, warps, stages, key splits, integer and stride specialization: see
backends/triton/aot_jobs.py) for a target architecture, by Triton and the ptxas it ships, in a
subprocess (backends/triton/aot_check.py); the cubin is read with the cuobjdump Triton ships.
Per kernel the report gives the configuration, registers, spill store/load bytes, shared memory
and whether it fits the architecture's limit, the tensor-core instructions (kind: wgmma for
HGMMA, mma for HMMA; count; operand types) and the key loop's SASS instruction count and mix.
This module runs nothing on a GPU and never launches a kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

# Shared memory one block may use, by architecture (bytes): what a launch beyond fails
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                100: 227 * 1024, 120: 99 * 1024}
# The reported fields, in the human table's order
FIELDS = ("kernel", "config", "registers", "spill_bytes", "shared_bytes", "fits", "mma",
          "loop_instructions", "loop_mix")


class ToolsMissing(RuntimeError):
    """Triton's bundled ptxas or cuobjdump is not installed."""


def parse_arch(text: str | int) -> int:
    """90 from "sm_90", "sm_90a", "90" or 90."""
    digits = str(text).lower().removeprefix("sm_").removesuffix("a")
    if not digits.isdigit():
        raise ValueError(f"--arch must look like sm_90, got {text!r}")
    return int(digits)


def compile_jobs(jobs: list[dict], workers: int = 1, python: str = sys.executable) -> list[dict]:
    """aot_check's result for each job (in order), compiled in `workers` subprocesses."""
    if not jobs:
        return []
    chunks = [jobs[i::workers] for i in range(min(workers, len(jobs)))]
    with ThreadPoolExecutor(len(chunks)) as pool:
        done = list(pool.map(lambda chunk: _run(chunk, python), chunks))
    results: list[dict] = [{}] * len(jobs)
    for i, found in enumerate(done):
        results[i::len(chunks)] = found
    return results


def _run(jobs: list[dict], python: str) -> list[dict]:
    from attnc.backends.triton import aot_check
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jobs.json")
        with open(path, "w") as f:
            json.dump(jobs, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said quietly
        proc = subprocess.run([python, aot_check.__file__, path], capture_output=True,
                              text=True, env=env, timeout=3600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines and "missing_tools" in lines[0]:
        raise ToolsMissing("Triton's bundled NVIDIA tools are missing: "
                           + ", ".join(lines[0]["missing_tools"]))
    if len(lines) != len(jobs):
        raise RuntimeError(f"the AOT compile stopped: {proc.stderr[-2000:]}")
    return lines


def _row(spec: str, job: dict, res: dict, arch: int) -> dict:
    config = {**job["config"], "num_warps": res.get("num_warps", job["config"].get("num_warps")),
              "num_stages": res.get("num_stages", job["config"].get("num_stages"))}
    row = {"spec": spec, "kernel": job["kernel"], "function": job["function"], "config": config,
           "ok": res["ok"], "error": res["error"]}
    if not res["ok"]:
        return row
    limit = SHARED_LIMIT.get(arch, 227 * 1024)
    row.update(registers=res["registers"], stack_bytes=res["stack_bytes"],
               spill_bytes={"store": res["spill_store_bytes"], "load": res["spill_load_bytes"]},
               shared_bytes=res["shared_bytes"], fits=res["shared_bytes"] <= limit,
               mma=res["mma"], instructions=res["instructions"],
               loop_instructions=res["loop_instructions"], loops=res["loops"],
               loop_mix=res["loop_mix"])
    return row


def inspect_kernel(kernel, shape=None, arch: int = 90, kernels: list[str] | None = None,
                   backward: bool = True, workers: int = 1, name: str | None = None
                   ) -> list[dict]:
    """The report's rows for a compiled spec (attnc.compile / attnc.load): one per kernel
    launch at `shape` (aot_jobs.Shape; default B4 H16 N4096 D128 bf16); `kernels` keeps those
    whose role starts with one of the given names ("forward", "dq", "chunked", ...)."""
    from attnc.backends.triton import aot_jobs
    jobs = aot_jobs.kernel_jobs(kernel, shape or aot_jobs.Shape(), arch, backward, inspect=True)
    if kernels:
        # a branch's kernels are named `branch/role`
        jobs = [j for j in jobs if j["kernel"].rsplit("/", 1)[-1].startswith(tuple(kernels))]
    results = compile_jobs(jobs, workers)
    return [_row(name or kernel.name, j, r, arch) for j, r in zip(jobs, results)]


def inspect_spec(spec: str, shape=None, arch: int = 90, kernels: list[str] | None = None,
                 options: dict | None = None, workers: int = 1) -> list[dict]:
    """inspect_kernel for a spec (a .attn file, a library name or DSL text, as attnc.compile
    takes it) compiled with `options`."""
    import attnc
    return inspect_kernel(attnc.compile(spec, **(options or {})), shape, arch, kernels,
                          workers=workers)


# --- reports --------------------------------------------------------------------------------

def _config_text(config: dict) -> str:
    tiles = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK_") and
                     k not in ("BLOCK_D", "BLOCK_DV"))
    linear = " ".join(f"{k}{config[k]}" for k in ("BT", "BK", "BV") if k in config)
    return " ".join(x for x in (tiles, linear, f"w{config.get('num_warps')}",
                                f"s{config.get('num_stages')}") if x)


def _mma_text(mma: dict) -> str:
    if not mma["count"]:
        return "none"
    return f"{mma['kind']} {'/'.join(mma['types'])} {mma['count']} ({mma['loop_count']} in loop)"


def _mix_text(mix: dict, top: int = 8) -> str:
    return " ".join(f"{op} {n}" for op, n in list(mix.items())[:top])


def table(rows: list[dict], spec_column: bool = False) -> str:
    """A markdown table of report rows."""
    head = (["spec"] if spec_column else []) + [
        "kernel", "config", "regs", "spill st/ld B", "shared B", "fits", "tensor cores",
        "loop SASS", "loop mix (top 8)"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if h in ("spec", "kernel", "config", "tensor cores",
                                           "loop mix (top 8)") else "---:" for h in head) + "|"]
    for r in rows:
        cells = [r["spec"]] if spec_column else []
        cells += [r["kernel"], _config_text(r["config"])]
        if not r["ok"]:
            cells += ["failed: " + r["error"].splitlines()[0][:100]] + [""] * (len(head) - 3)
        else:
            cells += [r["registers"], f"{r['spill_bytes']['store']}/{r['spill_bytes']['load']}",
                      r["shared_bytes"], "yes" if r["fits"] else "NO", _mma_text(r["mma"]),
                      r["loop_instructions"], _mix_text(r["loop_mix"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def header(shape, arch: int) -> str:
    import triton
    s = shape.sizes
    dtype = str(shape.dtype).removeprefix("torch.")
    return (f"sm_{arch}, Triton {triton.__version__}, B{s['B']} H{s['H']} M{s['M']} N{s['N']} "
            f"D{s['D']} Dv{s['Dv']} {dtype}, the launchers' default configurations; spill "
            "bytes per thread; loop: the key loop (of the loops with the most tensor-core "
            "instructions, the shortest).")


# Library specs inspected at a head dim of their own: BASED's second-order Taylor map has
# 1 + D + D^2 features (16 513 at D = 128, a 14 MB PTX kernel no model launches); its paper
# maps 16 query/key features.
LIBRARY_HEAD_DIMS = {"based": 16}


# Library specs whose kernels aot_jobs cannot record yet, with the reason.
NOT_COMPILED_AHEAD = {"head_mixing": "the head-mixing kernels have no recorded launches yet"}


def library(shape=None, arch: int = 90, workers: int = 1) -> list[dict]:
    """Report rows of every library spec's kernels (softmax kernels, general cascades and
    linear blocks with their core kernels), in library order, except NOT_COMPILED_AHEAD; specs
    in LIBRARY_HEAD_DIMS at their own query/key head dim (values keep the shape's)."""
    import dataclasses

    import attnc
    from attnc.backends.triton import aot_jobs
    shape = shape or aot_jobs.Shape()
    jobs, names = [], []
    for name in attnc.variants():
        if name in NOT_COMPILED_AHEAD:
            continue
        own = shape
        if name in LIBRARY_HEAD_DIMS:
            own = dataclasses.replace(shape, D=LIBRARY_HEAD_DIMS[name],
                                      Dv=shape.sizes["Dv"])
        found = aot_jobs.kernel_jobs(attnc.load(name), own, arch, inspect=True)
        jobs += found
        names += [name] * len(found)
    results = compile_jobs(jobs, workers)
    return [_row(n, j, r, arch) for n, j, r in zip(names, jobs, results)]


def library_table(shape=None, arch: int = 90, workers: int = 1,
                  rows: list[dict] | None = None) -> str:
    """The markdown report of the whole library (what benchmarks/results keeps), from `rows`
    when library() has already made them."""
    from attnc.backends.triton import aot_jobs
    shape = shape or aot_jobs.Shape()
    rows = library(shape, arch, workers) if rows is None else rows
    own = ", ".join(f"{name} at D = {d}" for name, d in LIBRARY_HEAD_DIMS.items())
    skipped = "; ".join(f"{name} ({why})" for name, why in NOT_COMPILED_AHEAD.items())
    return (header(shape, arch) + f" Query/key head dims of their own: {own}. Not shown: "
            f"{skipped}.\n\n" + table(rows, spec_column=True))
