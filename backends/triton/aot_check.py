"""Compile generated kernels ahead of time for a GPU target, without a GPU.

Triton can lower a kernel to PTX and a cubin for a given architecture on a machine with no GPU;
doing so catches everything the interpreter does not check (types, layouts, constexpr handling).
This file imports only Triton, so any Python with any Triton version can run it:

    python backends/triton/aot_check.py jobs.json

`jobs.json` is a list of {"path", "function", "signature", "constexprs", "arch"} objects, as
backends/triton/aot_jobs.py builds them from the kernels' contracts; the script prints one JSON
line per job with "ok" and "error". A job with "inspect": true also reads the cubin with the
cuobjdump Triton bundles: registers and stack (spills) per thread, the number of SASS
instructions, and those of the largest loop (the key loop: the instructions between a backward
branch and its target), with its MUFU (exp, log, ...) and matrix-multiply instructions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


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
    found = {"ok": "cubin" in compiled.asm, "error": "",
             "shared_bytes": compiled.metadata.shared, "triton": triton.__version__}
    if job.get("inspect") and found["ok"]:
        found.update(inspect_cubin(compiled.asm["cubin"], os.path.dirname(triton.__file__)))
    return found


def inspect_cubin(cubin: bytes, triton_dir: str) -> dict:
    """Registers, stack bytes, SASS instruction counts (all, and the largest loop's)."""
    tool = os.path.join(triton_dir, "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    code = [(int(a, 16), op, rest) for a, _, op, rest in _INSTRUCTION.findall(sass)]
    loop: list = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = [c for c in code if int(target.group(1), 16) <= c[0] <= addr]
            loop = max(loop, body, key=len)
    return {"registers": int(regs.group(1)) if regs else -1,
            "stack_bytes": int(stack.group(1)) if stack else -1,
            "instructions": len(code), "loop_instructions": len(loop),
            "loop_mufu": sum(op.startswith("MUFU") for _, op, _ in loop),
            "loop_mma": sum(op.startswith(("HMMA", "HGMMA", "WGMMA")) for _, op, _ in loop)}


def main(argv: list[str]) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
    jobs = json.loads(open(argv[0]).read())
    results = [compile_job(job) for job in jobs]
    for job, res in zip(jobs, results):
        print(json.dumps({"function": job["function"], **res}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
