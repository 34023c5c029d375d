"""Compile generated kernels ahead of time for a GPU target, without a GPU.

Triton can lower a kernel to PTX and a cubin for a given architecture on a machine with no GPU;
doing so catches everything the interpreter does not check (types, layouts, constexpr handling).
This file imports only Triton, so any Python with any Triton version can run it:

    python backends/triton/aot_check.py jobs.json

`jobs.json` is a list of {"path", "function", "signature", "constexprs", "arch"} objects, as
backends/triton/aot_jobs.py builds them from the kernels' contracts; the script prints one JSON
line per job with "ok" and "error".
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location(f"aot_{abs(hash(job['path']))}", job["path"])
    assert spec is not None and spec.loader is not None, job["path"]
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
