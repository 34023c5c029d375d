"""Compile generated kernels ahead of time for a GPU target, without a GPU.

Triton can lower a kernel to PTX and a cubin for a given architecture on a machine with no GPU;
doing so catches everything the interpreter does not check (types, layouts, constexpr handling).
This file imports only Triton, so any Python with any Triton version can run it:

    python backends/triton/aot_check.py jobs.json

`jobs.json` is a list of {"path", "function", "signature", "constexprs", "arch"} objects, as
`jobs_for` builds them; the script prints one JSON line per job with "ok" and "error".
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def jobs_for(kernel, dtype: str = "bf16", arch: int = 90, block_m: int = 128, block_n: int = 64,
             block_d: int = 128, ieee: bool = False) -> dict:
    """A job for an attnc.Kernel: its cached source, entry point and a launch signature."""
    from attnc import cache
    from attnc.backends.triton.codegen import (BLOCK_LISTS, constexpr_args, kernel_names,
                                               program_args)

    ir = kernel.kernel_ir
    # one representative launch: fp32 params, int64 ids
    types = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Out": f"*{dtype}",
             "Lse": "*fp32", "scale": "fp32"}
    types.update({d.name: "*fp32" if d.kind == "param" else "*i64" for d in ir.inputs})
    types.update({name: "*i32" for name, _, _ in BLOCK_LISTS})
    sig = {name: types.get(name, "i32") for name in program_args(ir)
           if name not in constexpr_args(ir)}
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
                  "BLOCK_DV": block_d, "IEEE": ieee, "UPCAST": False,
                  "SPARSE_Q": 128, "SPARSE_KV": 128}
    constexprs = {name: constexprs[name] for name in constexpr_args(ir)}
    return {"path": str(cache.kernel_path(kernel.key)), "function": kernel_names(ir)[0],
            "signature": sig, "constexprs": constexprs, "arch": arch}


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location(f"aot_{abs(hash(job['path']))}", job["path"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, job["function"])
    sig = dict(job["signature"])
    sig.update({k: "constexpr" for k in job["constexprs"]})
    missing = [p.name for p in fn.params if p.name not in sig]
    if missing:
        return {"ok": False, "error": f"no signature for {missing}"}
    src = ASTSource(fn, {p.name: sig[p.name] for p in fn.params},
                    constexprs={(fn.arg_names.index(k),): v for k, v in job["constexprs"].items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32))
    except Exception as err:  # report every failure, keep compiling the rest
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    return {"ok": "cubin" in compiled.asm, "error": "",
            "shared_bytes": compiled.metadata.shared, "triton": triton.__version__}


def main(argv: list[str]) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
    jobs = json.loads(open(argv[0]).read())
    results = [compile_job(job) for job in jobs]
    for job, res in zip(jobs, results):
        print(json.dumps({"function": job["function"], **res}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
