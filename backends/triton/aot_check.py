"""Compile generated kernels ahead of time for a GPU target, without a GPU, as a launch would.

Triton can lower a kernel to PTX and a cubin for a given architecture on a machine with no GPU;
doing so catches everything the interpreter does not check (types, layouts, constexpr handling)
and shows the code a GPU would run. This file imports only Triton, so any Python with any
Triton version can run it:

    python backends/triton/aot_check.py jobs.json

`jobs.json` is a list of jobs, as backends/triton/aot_jobs.py builds them from recorded
launches: {"path", "function", "arch", "constexprs", "options" (num_warps, num_stages), "args"}.
"args" holds the launch's value of every other parameter: an int or float as itself, a tensor
as {"pointer": dtype, "offset": bytes from an aligned allocation}. Triton specializes on those
values as its launcher does (an int that is 1 becomes a constant, ints and pointers divisible
by 16 are marked so, large ints are i64), through its own binder where the installed Triton has
the one this file knows, else by the same rule. A job may give "signature" (types) instead of
"args": then nothing is specialized.

The script prints one JSON line per job with "ok", "error", "shared_bytes", "num_warps" and
"num_stages". A job with "inspect": true also reads the ptxas report (registers, spill store
and load bytes) and the cubin's SASS with the cuobjdump Triton bundles: the instruction count,
each loop's (the instructions between a backward branch and its target), the key loop's
(`key_loop`) with its mix of opcodes, and the tensor-core instructions (HGMMA: wgmma; HMMA:
mma) with their operand types.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def tool_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas(arch: int) -> str:
    """The ptxas Triton compiles for `arch` with (Triton 3.9 has one per architecture range)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - another Triton, or a tool it cannot find
        return os.path.join(tool_dir(), "ptxas")


def missing_tools(arch: int = 90) -> list[str]:
    """Paths of the NVIDIA tools Triton bundles that inspecting needs and that are absent."""
    return [p for p in (ptxas(arch), os.path.join(tool_dir(), "cuobjdump"))
            if not os.path.exists(p)]


class _Pointer:
    """A tensor as Triton's specialization sees it: its address and dtype."""

    def __init__(self, dtype: str, offset: int):
        # a CUDA allocation is aligned to at least 256 bytes; views add their offset
        self.dtype = f"torch.{dtype}"
        self._address = (1 << 20) + offset

    def data_ptr(self) -> int:
        return self._address


def _values(job: dict) -> dict:
    return {name: _Pointer(v["pointer"], v["offset"]) if isinstance(v, dict) else v
            for name, v in job["args"].items()}


def specialize(fn, job: dict, target) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, keyed as this Triton keys them."""
    values = {**_values(job), **job["constexprs"]}
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, _ = binder(**values)
        _, signature, constexprs, attrs = fn._pack_args(backend, {}, bound, spec, {})
        return signature, constexprs, attrs
    except (ImportError, AttributeError, TypeError):  # another Triton: the rule it applies
        return _specialize_by_rule(fn, job, values)


def _specialize_by_rule(fn, job: dict, values: dict) -> tuple[dict, dict, dict]:
    signature: dict = {}
    constexprs: dict = {}
    attrs: dict = {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.name in job["constexprs"] or (isinstance(v, int) and not isinstance(v, bool)
                                          and v == 1):
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            attrs[(i,)] = []
            continue
        if isinstance(v, _Pointer):
            short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int64": "i64",
                     "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "i1"}
            signature[p.name] = "*" + short[v.dtype.removeprefix("torch.")]
            aligned = v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            signature[p.name], aligned = "i1", False
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            aligned = v % 16 == 0
        else:  # floats are not specialized
            signature[p.name] = "fp32"
            continue
        attrs[(i,)] = [["tt.divisibility", 16]] if aligned else []
    return signature, constexprs, attrs


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location(f"aot_{abs(hash(job['path']))}", job["path"])
    assert spec is not None and spec.loader is not None, job["path"]
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, job["function"])
    target = GPUTarget("cuda", job["arch"], 32)
    if "args" in job:
        missing = [p.name for p in fn.params if p.name not in job["args"]
                   and p.name not in job["constexprs"]]
        if missing:
            return {"ok": False, "error": f"no launch value for {missing}"}
        try:
            signature, constexprs, attrs = specialize(fn, job, target)
        except Exception as err:  # e.g. a dtype this Triton does not know
            return {"ok": False, "error": f"specialization: {type(err).__name__}: {err}"}
        src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    else:
        sig = dict(job["signature"])
        sig.update({k: "constexpr" for k in job["constexprs"]})
        missing = [p.name for p in fn.params if p.name not in sig]
        if missing:
            return {"ok": False, "error": f"no signature for {missing}"}
        src = ASTSource(fn, {p.name: sig[p.name] for p in fn.params},
                        constexprs={(fn.arg_names.index(k),): v
                                    for k, v in job["constexprs"].items()})
    try:
        compiled = triton.compile(src, target=target, options=dict(job.get("options") or {}))
    except Exception as err:  # report every failure, keep compiling the rest
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    found = {"ok": "cubin" in compiled.asm, "error": "",
             "shared_bytes": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
             "num_stages": compiled.metadata.num_stages, "triton": triton.__version__}
    if job.get("inspect") and found["ok"]:
        found.update(inspect_cubin(compiled.asm["cubin"]))
    return found


def _local_bytes(op: str) -> int:
    """Bytes one local-memory access moves: STL, STL.64, LDL.LU.128, LDL.U8 ..."""
    parts = op.split(".")
    widths = {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}
    return next((widths[p] for p in parts[1:] if p in widths), 4)


def _mma(ops: list[str]) -> dict:
    """Tensor-core instructions: kind (wgmma for HGMMA, mma for HMMA), count, operand types
    (the opcode's last suffix: HGMMA.64x128x16.F32.BF16, HMMA.1688.F32.TF32)."""
    mma = [op for op in ops if op.startswith(("HGMMA", "HMMA"))]
    kinds = sorted({"wgmma" if op.startswith("HGMMA") else "mma" for op in mma})
    types = sorted({op.split(".")[-1].lower() for op in mma if op.count(".") >= 2})
    return {"kind": "+".join(kinds) or "none", "count": len(mma), "types": types}


def _mix_key(op: str) -> str:
    """An opcode for the instruction mix: its name, with MUFU's function (MUFU.EX2)."""
    parts = op.split(".")
    return ".".join(parts[:2]) if parts[0] == "MUFU" else parts[0]


def _loops(code: list) -> list[list]:
    """Each loop's instructions (from a backward branch's target to the branch), in order."""
    loops = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append([c for c in code if int(target.group(1), 16) <= c[0] <= addr])
    return loops


def key_loop(loops: list[list]) -> list:
    """The loop a kernel spends its time in: of the loops with the most tensor-core
    instructions, the shortest (a causal kernel's unmasked key loop rather than its masked
    diagonal one, an inner loop rather than the outer loop around it); without tensor cores,
    the longest."""
    if not loops:
        return []
    most = max(_mma([op for _, op, _ in loop])["count"] for loop in loops)
    if most == 0:
        return max(loops, key=len)
    return min((loop for loop in loops if _mma([op for _, op, _ in loop])["count"] == most),
               key=len)


def inspect_cubin(cubin: bytes) -> dict:
    """Registers (cuobjdump -res-usage), SASS instruction counts (all, each loop's, the key
    loop's with its opcode mix) and the tensor-core instructions."""
    tool = os.path.join(tool_dir(), "cuobjdump")
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
    code = [(int(a, 16), op, rest) for a, _, op, rest in _INSTRUCTION.findall(sass)]
    loops = _loops(code)
    loop_ops = [op for _, op, _ in key_loop(loops)]
    mix = collections.Counter(_mix_key(op) for op in loop_ops)
    loop_mma = _mma(loop_ops)
    stack = re.search(r"STACK:(\d+)", usage)
    ops = [op for _, op, _ in code]
    # what ptxas -v reports as spill stores and loads: the bytes its local accesses move
    return {"registers": int(regs.group(1)) if regs else -1,
            "stack_bytes": int(stack.group(1)) if stack else -1,
            "spill_store_bytes": sum(_local_bytes(op) for op in ops if op.startswith("STL")),
            "spill_load_bytes": sum(_local_bytes(op) for op in ops if op.startswith("LDL")),
            "instructions": len(code), "loop_instructions": len(loop_ops),
            "loops": [len(loop) for loop in loops],
            "loop_mix": dict(mix.most_common()),
            "loop_mufu": sum(op.startswith("MUFU") for op in loop_ops),
            "loop_mma": loop_mma["count"],
            "mma": {**_mma(ops), "loop_count": loop_mma["count"]}}


def main(argv: list[str]) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
    jobs = json.loads(open(argv[0]).read())
    missing = sorted({p for job in jobs if job.get("inspect") for p in missing_tools(job["arch"])})
    if missing:
        print(json.dumps({"missing_tools": missing}))
        return 3
    status = 0
    for job in jobs:
        res = compile_job(job)
        status |= not res["ok"]
        print(json.dumps({"function": job["function"], **res}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
