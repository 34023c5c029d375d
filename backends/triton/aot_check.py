"""Compile generated kernels ahead of time for a GPU target, without a GPU.

Triton can lower a kernel to PTX and a cubin for a given architecture on a machine with no GPU;
doing so catches everything the interpreter does not check (types, layouts, constexpr handling).
This file imports only Triton, so any Python with any Triton version can run it:

    python backends/triton/aot_check.py jobs.json

`jobs.json` is a list of {"path", "function", "signature", "constexprs", "arch"} objects, as
`jobs_for` (attention: forward and backward kernels) and `linear_jobs_for` (linear blocks:
recurrent and chunked kernels) build them; the script prints one JSON line per job with "ok"
and "error".
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys


def jobs_for(kernel, dtype: str = "bf16", arch: int = 90, block_m: int = 128, block_n: int = 64,
             block_d: int = 128, ieee: bool = False, backward: bool = True) -> list[dict]:
    """Jobs for an attnc.Kernel's cached source: the forward and (`backward`, when the kernel
    has one) the preprocess, dq and dk/dv kernels, each with one representative launch
    signature. Backward tiles are capped at 64, as the launcher caps them on a GPU."""
    from attnc import cache
    from attnc.backends.triton.backward import (Q_LISTS, backward_names, bwd_constexprs,
                                                dkdv_args, dq_args)
    from attnc.backends.triton.codegen import (BLOCK_LISTS, PRELUDE_PREPROCESS, constexpr_args,
                                               kernel_names, program_args)

    ir = kernel.kernel_ir
    # fp32 params and partial sums, int64 ids, int32 block lists
    types = {name: f"*{dtype}" for name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DVo")}
    types.update({"Lse": "*fp32", "Delta": "*fp32", "DLse": "*fp32", "scale": "fp32"})
    types.update({d.name: "*fp32" if d.kind == "param" else "*i64" for d in ir.inputs})
    types.update({name: "*i32" for name, _, _ in BLOCK_LISTS + Q_LISTS})
    types.update({f"D_{ld.name}": "*fp32" for ld in ir.loads})
    values = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_DV": block_d,
              "IEEE": ieee, "UPCAST": False, "SPARSE_Q": 128, "SPARSE_KV": 128, "DPARAMS": True,
              "HAS_DLSE": True, "BLOCK_R": 32}
    path = str(cache.kernel_path(kernel.key))

    def job(function, args, constexprs, **override):
        return {"path": path, "function": function, "arch": arch,
                "signature": {a: types.get(a, "i32") for a in args if a not in constexprs},
                "constexprs": {a: {**values, **override}[a] for a in constexprs}}

    jobs = [job(kernel_names(ir)[0], program_args(ir), constexpr_args(ir))]
    # with key splits the forward writes fp32 partial results: a second specialization
    split = job(kernel_names(ir)[0], program_args(ir), constexpr_args(ir))
    split["signature"]["Out"] = "*fp32"
    jobs.append(split)
    if backward and ir.grad is not None:
        job = functools.partial(job, BLOCK_M=min(block_m, 64), BLOCK_N=min(block_n, 64))
        names = backward_names(ir)
        jobs.append(job(PRELUDE_PREPROCESS, ["Out", "DO", "DLse", "Delta", "R", "DV"],
                        ("HAS_DLSE", "BLOCK_R", "BLOCK_DV")))
        jobs.append(job(names["dq"], dq_args(ir), bwd_constexprs(ir)))
        jobs.append(job(names["dkdv"], dkdv_args(ir), bwd_constexprs(ir)))
    return jobs


def linear_jobs_for(kernel, dtype: str = "bf16", arch: int = 90, dk: int = 128, dv: int = 128,
                    chunk: int | None = None, varlen: bool = False,
                    ieee: bool = False) -> list[dict]:
    """Jobs for an attnc.LinearKernel's recurrent, chunked and recurrent-backward kernels (those
    it has), with the launchers' tile choices for head dims (dk, dv) (and chunk size unless
    given)."""
    from attnc import cache
    from attnc.backends.triton.linear_codegen import kernel_args, kernel_names, tensor_args
    from attnc.backends.triton.linear_recurrent_bwd import kernel_args as bwd_args
    from attnc.linear_runtime import chunk_tile, tile, value_tile

    scan = kernel.scan
    qk = "*fp32" if scan.maps else f"*{dtype}"  # feature maps run in fp32 before the kernel
    types = {"q": qk, "k": qk, "v": f"*{dtype}", "o": f"*{dtype}", "cu_seqlens": "*i32",
             "scale": "fp32"}
    types.update({f"x_{d.name}": "*fp32" for d in tensor_args(scan)})
    types.update({f"{p}_{s.name}": "*fp32" for s in scan.states for p in ("init", "final")})
    values = {"HAS_INIT": True, "STORE_FINAL": True, "VARLEN": varlen,
              "BK": tile(dk), "BV": value_tile(scan, dv, dk),
              "BT": chunk_tile(scan, chunk or kernel.chunk_size, dk), "IEEE": ieee,
              "UPCAST": False}
    types.update({"do": f"*{dtype}", "dq": "*fp32", "dk": "*fp32", "dv": "*fp32"})
    types.update({f"{p}_{s.name}": "*fp32" for s in scan.states
                  for p in ("dfinal", "ck", "sc", "dinit")})
    types.update({f"dx_{d.name}": "*fp32" for d in tensor_args(scan)})
    values["SEG"] = 64
    jobs = []
    for algorithm, function in kernel_names(scan).items():
        if algorithm == "recurrent_bwd":
            args = [a.split(":")[0] for a in bwd_args(scan, tensor_args(scan))]
        else:
            args = [a.split(":")[0] for a in kernel_args(scan, chunked=algorithm == "chunked")]
        constexprs = [a for a in args if a in values]
        chosen = dict(values)
        if algorithm == "recurrent_bwd":  # one program holds all of DV
            chosen["BV"] = tile(dv)
        jobs.append({"path": str(cache.kernel_path(kernel.key)), "function": function,
                     "arch": arch,
                     "signature": {a: types.get(a, "i32") for a in args if a not in constexprs},
                     "constexprs": {a: chosen[a] for a in constexprs}})
    return jobs


def core_jobs(arch: int = 90, dk: int = 128, dv: int = 128, chunk: int = 32,
              ieee: bool = False) -> list[dict]:
    """Jobs for the linear backward's fixed core kernels (backends/triton/linear_core.py), one
    per class: additive, scalar and vector decays, delta rule, gated delta rule."""
    from attnc.backends.triton import linear_core
    from attnc.linear_runtime import key_limited_tile, tile

    bk, bv = tile(dk), key_limited_tile(dk, dv)
    jobs = []
    for gate, delta in ((0, False), (1, False), (2, False), (0, True), (1, True)):
        values = {"GATE": gate, "DELTA": delta, "HAS_S0": True, "VARLEN": False,
                  "BT": 16 if gate == 2 else chunk, "BK": bk, "BV": bv, "IEEE": ieee,
                  "UPCAST": False}
        for fn in (linear_core.core_forward, linear_core.core_backward):
            args = fn.arg_names
            pointers = [a for a in args if a not in values and a not in (
                "T", "H", "K", "V", "NV_STRIDE")]
            jobs.append({"path": linear_core.__file__, "function": fn.__name__, "arch": arch,
                         "signature": {a: ("*i32" if a in ("cu_seqlens", "chunk_offsets")
                                           else "*fp32") if a in pointers else "i32"
                                       for a in args if a not in values},
                         "constexprs": {a: values[a] for a in args if a in values}})
    return jobs


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
