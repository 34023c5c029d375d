"""The compiler pipeline, as one visible list per family.

    parse -> cascade (frontend IR) -> desugar -> pass_count -> online_softmax -> online_rescale
          -> mask_bounds -> tile -> autodiff -> schedule -> fuse (kernel IR)
          -> kernel (+ the backend's kernels) -> triton

A `linear` block (a state-update scan) takes its own short pipeline:

    parse -> cascade (LinearScan) -> chunk_scan -> tile_scan (kernel IR) -> kernel -> triton

Each pass is a pure function IR -> IR in its own module (passes/), described by its `PASS`
record. After every pass the IR is verified at its level (`verify`), and an analysis must
return its input unchanged. Any stage can be printed (`attnc show SPEC --stage NAME`): an
analysis prints what it found, `kernel` prints the kernel IR and the kernels the backend
generates from it (entry points, grids, signatures), `triton` the generated source.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import lark

from attnc.errors import CompileError, SpecError
from attnc.frontends import source as spec_source
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.branches import Branches
from attnc.ir.cascade import AttentionSpec, Cascade, format_cascade, origin_of, verify
from attnc.ir.kernel import AttentionKernel, format_kernel, verify_kernel
from attnc.ir.linear import LinearScan, format_scan, verify_scan
from attnc.ir.linear_kernel import ScanPlan, format_plan, verify_plan
from attnc.ir.stage_kernel import CascadePlan, format_plan as format_stages
from attnc.ir.stage_kernel import verify_plan as verify_stages
from attnc.library import check_options, variant_path
from attnc.passes import (Pass, PassKind, autodiff, chunk_scan, desugar, fuse, mask_bounds,
                          online_rescale, online_softmax, pass_count, schedule, tile, tile_scan)

PASSES: tuple[Pass, ...] = (desugar.PASS, pass_count.PASS, online_softmax.PASS,
                            online_rescale.PASS, mask_bounds.PASS, tile.PASS, autodiff.PASS,
                            schedule.PASS, fuse.PASS)
LINEAR_PASSES: tuple[Pass, ...] = (chunk_scan.PASS, tile_scan.PASS)
STAGES = ("parse", "cascade") + tuple(p.name for p in PASSES) + ("kernel", "triton")
LINEAR_STAGES = ("parse", "cascade") + tuple(p.name for p in LINEAR_PASSES) + ("kernel", "triton")
SHOW_STAGES = STAGES + tuple(s for s in LINEAR_STAGES if s not in STAGES)

FrontendIR = AttentionSpec | Cascade | LinearScan
IR = AttentionSpec | Cascade | AttentionKernel | CascadePlan | LinearScan | ScanPlan


@dataclass(frozen=True)
class Source:
    text: str
    filename: str


# Spec text, as opposed to a file name or a library name: several lines, a brace, or a block
# keyword first.
_TEXT = re.compile(r"[\n{]|^\s*(attention|cascade|linear)\b")


def read_spec(spec: str | os.PathLike) -> Source:
    """A spec argument is DSL text, a path to a .attn file, or a library variant name. A string
    is DSL text when it holds a newline or a brace or starts with `attention`, `cascade` or
    `linear` (so a spec missing its brace still gets a located parse error); any other string
    names a file, else a library variant."""
    if isinstance(spec, str) and _TEXT.search(spec):
        return Source(spec_source.check_text(spec, "<spec>"), "<spec>")
    name = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else None
    if not isinstance(name, str):
        raise ValueError(f"spec must be DSL text, a path or a library name (a str or an "
                         f"os.PathLike of str), got {type(spec).__name__}")
    # a file name may hold bytes that are no UTF-8 (lone surrogates here): opened as given,
    # shown with U+FFFD, which the cache can hash and a terminal print
    shown = spec_source.printable(name)
    path = Path(name)
    if _is_file(path):
        try:
            return Source(spec_source.read_file(path, shown), shown)
        except OSError as err:
            raise SpecError(f"cannot read the spec file: {err.strerror or err}",
                            filename=shown) from None
    lib = variant_path(name)
    if lib is not None:
        return Source(lib.read_text(), f"variants/{lib.name}")
    if len(shown) > 80:
        shown = shown[:60] + f"... ({len(shown)} characters)"
    raise SpecError(f"no spec file or library variant named {shown!r}", filename=shown,
                    hint="`attnc list` shows the library; spec text starts with `attention`, "
                         "`cascade` or `linear`")


def _is_file(path: Path) -> bool:
    """Whether `path` names a regular file; a name the system refuses to look up (too long, a
    NUL byte) names none."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def frontend(src: Source, options: dict | None = None
             ) -> tuple[lark.Tree, FrontendIR | Branches]:
    # a library variant's options must lie in its domain (attnc.library.ENTRIES); checked
    # before lowering, which would otherwise report a dilation of 0 as a division by zero
    check_options(src.filename, src.text, options or {})
    tree = parse(src.text, src.filename)
    return tree, lower(tree, src.text, src.filename, options)


def verify_ir(ir: IR) -> None:
    """Check `ir` at its level (raises AssertionError naming what is wrong)."""
    if isinstance(ir, Cascade):
        verify(ir)
    elif isinstance(ir, AttentionKernel):
        verify_kernel(ir)
    elif isinstance(ir, CascadePlan):
        verify_stages(ir)
    elif isinstance(ir, LinearScan):
        verify_scan(ir)
    elif isinstance(ir, ScanPlan):
        verify_scan(ir.scan)
        verify_plan(ir)


def passes_for(ir: FrontendIR) -> tuple[Pass, ...]:
    return LINEAR_PASSES if isinstance(ir, LinearScan) else PASSES


def run_passes(ir: FrontendIR, upto: str | None = None,
               src: Source | None = None) -> list[tuple[str, IR]]:
    """Run the pipeline, returning (pass name, IR after it) for each pass run. A pass's
    CompileError is re-raised at the spec statement it names, when `src` is the spec's text."""
    trail: list[tuple[str, IR]] = []
    current: IR = ir
    for p in passes_for(ir):
        try:
            out = p.run(current)
        except CompileError as err:
            where = origin_of(getattr(current, "origins", ()), err.tensor)
            if src is None or where is None or err.line:
                raise
            raise err.located(src.text, src.filename, where.line, where.column) from None
        if p.kind is PassKind.ANALYSIS and out is not current:
            raise AssertionError(f"the analysis {p.name} changed the IR")
        verify_ir(out)
        trail.append((p.name, out))
        current = out
        if p.name == upto:
            break
    return trail


def format_ir(ir: IR) -> str:
    if isinstance(ir, LinearScan):
        return format_scan(ir)
    if isinstance(ir, ScanPlan):
        return format_plan(ir)
    if isinstance(ir, Cascade):
        return format_cascade(ir, passes=pass_count.count(ir))
    if isinstance(ir, AttentionKernel):
        return format_kernel(ir)
    if isinstance(ir, CascadePlan):
        return format_stages(ir)
    return str(ir)


def format_kernels(ir: AttentionKernel | CascadePlan | ScanPlan) -> str:
    """The `kernel` stage: the kernel IR, then the kernels the backend generates from it."""
    from attnc.backends.triton import codegen  # torch and Triton load only for these stages
    text = format_ir(ir).rstrip("\n")
    return text + "\n\n" + codegen.generate(ir).describe()


def stage_text(trail: list[tuple[str, IR]], frontend_ir: FrontendIR, stage: str) -> str:
    """What `attnc show` prints for a pass's stage (or `kernel`) given the trail: an analysis
    prints its findings; a rewrite that had nothing to rewrite says so above the IR."""
    if stage == "kernel":
        return format_kernels(trail[-1][1])  # type: ignore[arg-type]
    before: IR = frontend_ir
    for p, (name, ir) in zip(passes_for(frontend_ir), trail):
        if name == stage:
            if p.report is not None:
                return p.report(ir)
            same = f"# {name} left the IR unchanged (nothing here for it to rewrite)\n"
            return (same if ir is before else "") + format_ir(ir)
        before = ir
    raise ValueError(f"the pipeline stopped before {stage!r}")


def show(src: Source, stage: str, options: dict | None = None) -> str:
    if stage not in SHOW_STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(SHOW_STAGES)}")
    tree, ir = frontend(src, options)
    if stage == "parse":
        return tree.pretty()
    if isinstance(ir, Branches):  # one pipeline per branch
        return ir.show(src, stage)
    if stage == "cascade":
        return format_ir(ir)
    stages = LINEAR_STAGES if isinstance(ir, LinearScan) else STAGES
    if stage not in stages:
        family = "linear blocks" if isinstance(ir, LinearScan) else "attention and cascade blocks"
        raise ValueError(f"stage {stage!r} does not apply to {family}; their stages: "
                         + ", ".join(stages))
    if stage == "triton":
        from attnc.backends.triton import codegen
        return codegen.generate(run_passes(ir, src=src)[-1][1]).source  # type: ignore[arg-type]
    trail = run_passes(ir, upto=None if stage == "kernel" else stage, src=src)
    return stage_text(trail, ir, stage)
