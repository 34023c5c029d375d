"""The compiler pipeline, as one visible list.

    parse -> cascade (frontend IR) -> desugar -> pass_count -> online_softmax -> mask_bounds
          -> tile -> autodiff -> fuse (kernel IR) -> triton (forward and backward source)

A `linear` block (a state-update scan) takes its own short pipeline:

    parse -> cascade (LinearScan) -> chunk_scan -> triton (recurrent and chunked kernels)

Each pass is a pure function IR -> IR in its own module; the cascade is verified after every
pass, and any stage can be printed (`attnc show SPEC --stage NAME`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from attnc.errors import SpecError
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir import Cascade, format_cascade, verify
from attnc.kernel_ir import AttentionKernel, format_kernel
from attnc.linear_ir import LinearScan, format_scan
from attnc.passes import (autodiff, chunk_scan, desugar, fuse, mask_bounds, online_softmax,
                          pass_count, tile)

PASSES = (desugar, pass_count, online_softmax, mask_bounds, tile, autodiff, fuse)
LINEAR_PASSES = (chunk_scan,)
STAGES = ("parse", "cascade") + tuple(p.NAME for p in PASSES) + ("kernel", "triton")
LINEAR_STAGES = ("parse", "cascade") + tuple(p.NAME for p in LINEAR_PASSES) + ("kernel", "triton")
SHOW_STAGES = STAGES + tuple(s for s in LINEAR_STAGES if s not in STAGES)

PASS_DOCS = {
    "desugar": "score/mask/normalize blocks into FuseMax's 3-pass softmax cascade",
    "pass_count": "analysis: FuseMax's number of passes over the key rank n",
    "online_softmax": "max/exp/sum/divide chain into one pass with running max and sum",
    "mask_bounds": "sympy analysis of the mask: key-loop bounds per query tile, full tiles",
    "tile": "grid over (b, h, query tiles), sequential loop over key tiles",
    "autodiff": "sympy derivatives of the score: the backward cascade (dq, dk, dv, d<param>)",
    "fuse": "inline everything into one kernel; place param/input loads",
    "chunk_scan": "classify each state update: its chunkwise-parallel form, or why it has none",
}


@dataclass(frozen=True)
class Source:
    text: str
    filename: str


def read_spec(spec: str | os.PathLike) -> Source:
    """A spec argument is DSL text, a path to a .attn file, or a library variant name."""
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "{" not in spec):
        path = Path(spec)
        if path.is_file():
            return Source(path.read_text(), str(path))
        from attnc.library import variant_path
        lib = variant_path(str(spec))
        if lib is not None:
            return Source(lib.read_text(), f"variants/{lib.name}")
        raise SpecError(f"no spec file or library variant named {str(spec)!r}",
                        filename=str(spec), hint="`attnc list` shows the library")
    return Source(spec, "<spec>")


def frontend(src: Source, options: dict | None = None):
    tree = parse(src.text, src.filename)
    return tree, lower(tree, src.text, src.filename, options)


def run_passes(ir, upto: str | None = None) -> list[tuple[str, object]]:
    """Run the pipeline, returning (pass name, IR after it) for each pass run."""
    trail = []
    for p in (LINEAR_PASSES if isinstance(ir, LinearScan) else PASSES):
        ir = p.run(ir)
        if isinstance(ir, Cascade):
            verify(ir)
        trail.append((p.NAME, ir))
        if p.NAME == upto:
            break
    return trail


def format_ir(ir) -> str:
    if isinstance(ir, LinearScan):
        return format_scan(ir)
    if isinstance(ir, Cascade):
        return format_cascade(ir, passes=pass_count.count(ir))
    if isinstance(ir, AttentionKernel):
        return format_kernel(ir)
    return str(ir)


def show(src: Source, stage: str, options: dict | None = None) -> str:
    if stage not in SHOW_STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(SHOW_STAGES)}")
    tree, ir = frontend(src, options)
    if stage == "parse":
        return tree.pretty()
    if stage == "cascade":
        return format_ir(ir)
    if isinstance(ir, LinearScan):
        if stage not in LINEAR_STAGES:
            raise ValueError(f"stage {stage!r} does not apply to a linear block; its stages: "
                             + ", ".join(LINEAR_STAGES))
        scan = run_passes(ir)[-1][1]
        if stage == "triton":
            from attnc.backends.triton.linear_codegen import generate as generate_linear
            return generate_linear(scan)
        return format_ir(scan)
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} applies to linear blocks only; stages: "
                         + ", ".join(STAGES))
    if stage in ("kernel", "triton"):
        from attnc.backends.triton.codegen import generate
        kernel = run_passes(ir)[-1][1]
        return format_kernel(kernel) if stage == "kernel" else generate(kernel)
    return format_ir(run_passes(ir, upto=stage)[-1][1])
