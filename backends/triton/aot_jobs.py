"""The jobs backends/triton/aot_check.py compiles: each kernel of a compiled spec (and the
linear backward's core kernels) with a representative launch, built from the kernels'
contracts (their typed signatures) and the launchers' tile rules, so the AOT check compiles
what the launchers would launch."""

from __future__ import annotations

from collections.abc import Mapping

from attnc.backends.triton.contract import KernelContract
from attnc.backends.triton.linear import core
from attnc.backends.triton.linear.backward import CONTRACTS as CORE_CONTRACTS
from attnc.backends.triton.linear.launch import (SEGMENT, chunk_tile, key_limited_tile, tile,
                                                 value_tile)
from attnc.ir.linear import Gate


def job(path: str, contract: KernelContract, dtype: str, values: Mapping[str, object],
        arch: int = 90, overrides: Mapping[str, str] | None = None) -> dict:
    """One job: the contract's signature for `dtype` and its constexprs from `values`."""
    return {"path": path, "function": contract.entry, "arch": arch,
            "signature": contract.aot_signature(dtype, overrides),
            "constexprs": {p.name: values[p.name] for p in contract.constexprs()}}


def jobs_for(kernel, dtype: str = "bf16", arch: int = 90, block_m: int = 128, block_n: int = 64,
             block_d: int = 128, ieee: bool = False, backward: bool = True) -> list[dict]:
    """Jobs for an attnc.Kernel: the forward (as launched, and with key splits, when it writes
    fp32 partial results) and (`backward`, when the kernel has one) the preprocess, dq and dk/dv
    kernels. Backward tiles are capped at 64, as the launcher caps them on a GPU."""
    path = kernel.path
    values = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_DV": block_d,
              "IEEE": ieee, "UPCAST": False, "SPARSE_Q": 128, "SPARSE_KV": 128, "DPARAMS": True,
              "HAS_DLSE": True, "BLOCK_R": 32}
    gen = kernel.generated
    forward = gen.kernel("forward")
    jobs = [job(path, forward, dtype, values, arch),
            job(path, forward, dtype, values, arch, {"Out": "*fp32"})]
    if backward and kernel.kernel_ir.grad is not None:
        capped = {**values, "BLOCK_M": min(block_m, 64), "BLOCK_N": min(block_n, 64)}
        jobs += [job(path, gen.kernel(role), dtype, capped, arch)
                 for role in ("preprocess", "dq", "dkdv")]
    return jobs


def cascade_jobs_for(kernel, dtype: str = "bf16", arch: int = 90, block_p: int = 64,
                     block_l: int = 64, block_d: int = 128, ieee: bool = False,
                     backward: bool = True, inspect: bool = False) -> list[dict]:
    """Jobs for an attnc CascadeKernel's stage kernels (forward, and backward when `backward`),
    with (block_p, block_l) tiles and head dims up to `block_d`."""
    values = {"BLOCK_P": block_p, "BLOCK_L": block_l, "BLOCK_D": block_d, "BLOCK_DV": block_d,
              "IEEE": ieee, "UPCAST": False, "LOWP": {"fp32": 0, "bf16": 1, "fp16": 2}[dtype],
              "SAVE": True}
    return [{**job(kernel.path, contract, dtype, values, arch), "inspect": inspect}
            for contract in kernel.generated.kernels
            if backward or contract.role.startswith("forward")]


def linear_jobs_for(kernel, dtype: str = "bf16", arch: int = 90, dk: int = 128, dv: int = 128,
                    varlen: bool = False, ieee: bool = False) -> list[dict]:
    """Jobs for an attnc.LinearKernel's generated kernels (recurrent, chunked, recurrent
    backward: those it has), with the launchers' tiles for head dims (dk, dv)."""
    plan = kernel.plan
    path = kernel.path
    values = {"HAS_INIT": True, "STORE_FINAL": True, "VARLEN": varlen, "BK": tile(dk),
              "BV": value_tile(plan, dv, dk), "BT": chunk_tile(plan, dk), "IEEE": ieee,
              "UPCAST": False, "SEG": SEGMENT}
    jobs = []
    for contract in kernel.generated.kernels:
        chosen = dict(values)
        if contract.role == "recurrent_bwd":  # one program holds all of DV
            chosen["BV"] = tile(dv)
        jobs.append(job(path, contract, dtype, chosen, arch))
    return jobs


def core_jobs(arch: int = 90, dk: int = 128, dv: int = 128, chunk: int = 32,
              ieee: bool = False) -> list[dict]:
    """Jobs for the linear backward's core kernels, one per class: additive, scalar and vector
    decays, delta rule, gated delta rule."""
    jobs = []
    for gate, delta in ((Gate.NONE, False), (Gate.SCALAR, False), (Gate.VECTOR, False),
                        (Gate.NONE, True), (Gate.SCALAR, True)):
        values = {"GATE": int(gate), "DELTA": delta, "HAS_S0": True, "VARLEN": False,
                  "BT": 16 if gate is Gate.VECTOR else chunk, "BK": tile(dk),
                  "BV": key_limited_tile(dk, dv), "IEEE": ieee, "UPCAST": False}
        jobs += [job(core.__file__, contract, "fp32", values, arch)
                 for contract in CORE_CONTRACTS]
    return jobs
