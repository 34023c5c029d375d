"""Compiling a spec into a callable kernel: the compile options, the pipeline, then the family's
kernel class (`Kernel` for `attention` and `cascade` blocks in attnc/runtime/softmax.py,
`LinearKernel` for `linear` blocks in attnc/runtime/linear.py; both build on
attnc/runtime/base.py)."""

from __future__ import annotations

from dataclasses import replace

from attnc.ir.branches import Branches
from attnc.ir.cascade import AttentionSpec
from attnc.ir.linear import LinearScan
from attnc.ir.stage_kernel import CascadePlan
from attnc.pipeline import FrontendIR, Source, frontend, run_passes
from attnc.runtime.base import CompiledKernel
from attnc.runtime.branches import BranchedKernel
from attnc.runtime.cascade import CascadeKernel
from attnc.runtime.gather import BlockGatherKernel, GatherKernel, compile_gathered
from attnc.runtime.linear import LinearKernel, check_chunk_size
from attnc.runtime.mixing import MixingKernel, mixes
from attnc.runtime.softmax import Kernel, launch_options


def compile_spec(src: Source, options: dict) -> CompiledKernel | BranchedKernel:
    """Compile DSL text; `block_sparse=True` makes a kernel that visits a block mask's blocks,
    `chunk_size=` sets a linear block's steps per chunk, `autotune=` turns tuning on or off
    and the launch options (`block_m`, ...) fix a softmax kernel's configuration."""
    launch_overrides = launch_options(options)
    tune = options.pop("autotune", None)
    if tune is not None and not isinstance(tune, bool):
        raise ValueError(f"autotune must be True, False or None, got {tune!r}")
    block_sparse = options.pop("block_sparse", False)
    chunk_size = options.pop("chunk_size", None)
    if not isinstance(block_sparse, bool):
        raise ValueError(f"block_sparse must be True or False, got {block_sparse!r}")
    _, ir = frontend(src, options)
    if isinstance(ir, Branches):  # one softmax kernel per branch, merged in torch
        if block_sparse or chunk_size is not None:
            raise ValueError(f"{'block_sparse' if block_sparse else 'chunk_size'} does not "
                             "apply to a block of branches")
        return BranchedKernel(src, options, ir, launch_overrides, tune)
    if isinstance(ir, LinearScan):
        if launch_overrides or block_sparse:
            raise ValueError(f"{sorted(launch_overrides) or ['block_sparse']} do not apply to "
                             "a linear block (its launch option is chunk_size)")
        check_chunk_size(chunk_size)
        return compile_ir(replace(ir, chunk_size=chunk_size), src, options, {}, tune)
    if chunk_size is not None:
        raise ValueError("chunk_size applies to linear blocks only")
    if block_sparse:
        ir = replace(ir, block_sparse=True)
    return compile_ir(ir, src, options, launch_overrides, tune)


def compile_ir(ir: FrontendIR, src: Source, options: dict, launch_overrides: dict,
               tune: bool | None = None
               ) -> (Kernel | CascadeKernel | LinearKernel | MixingKernel | GatherKernel
                     | BlockGatherKernel):
    """Run the passes on frontend IR and build the family's kernel (a general cascade's
    several stage kernels: CascadeKernel)."""
    trail = run_passes(ir, src=src)
    if isinstance(ir, LinearScan):
        return LinearKernel(src, options, ir, trail, tune)
    if isinstance(trail[-1][1], CascadePlan):
        return CascadeKernel(src, options, ir, trail, launch_overrides, tune)
    if isinstance(ir, AttentionSpec) and ir.around.gather is not None:  # listed keys only
        return compile_gathered(src, options, ir, trail, launch_overrides, tune)
    if mixes(trail[-1][1]):  # premix / postmix: attnc/runtime/mixing.py
        return MixingKernel(src, options, ir, trail, launch_overrides, tune)
    return Kernel(src, options, ir, trail, launch_overrides, tune)


__all__ = ["compile_spec", "compile_ir", "Kernel", "CascadeKernel", "LinearKernel",
           "BranchedKernel"]
