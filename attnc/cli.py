"""The `attnc` command line.

    attnc list                          library variants and what they are
    attnc passes                        the pipeline, in order
    attnc show SPEC [--stage STAGE]     the IR after a stage (default: kernel)
    attnc compile SPEC [-o FILE]        the generated Triton source
    attnc check SPEC [--dtype ...]      run the kernel against the reference interpreter
    attnc bench SPEC [--dtype ...]      tune the kernel's launch configurations and time it
    attnc inspect SPEC [--arch sm_90]   what each kernel compiles to on a GPU (no GPU needed)
    attnc cache info | clear            the on-disk kernel cache

SPEC is a path to a `.attn` file, a library variant name (see `attnc list`) or DSL text.
`-O name=value` (repeatable) overrides a spec `option` for show, compile and check.

Exit status: 0 success, 1 `check` over tolerance (`inspect`: a kernel failed to compile), 2 a
malformed spec, a spec attnc cannot compile, or bad arguments, 3 `inspect` without the ptxas or
cuobjdump Triton ships. Spec errors print as `file:line:col: message` with the source line
and a caret, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from attnc.errors import CompileError, SpecError

DTYPES = ("float32", "float16", "bfloat16")


def _option(text: str) -> tuple[str, int | float]:
    """Parse `name=value` with a numeric value (int if it reads as one, else float)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, int(value)
    except ValueError:
        if value.lstrip("+-").isdigit():  # beyond Python's int digit limit: no option's range
            raise argparse.ArgumentTypeError(
                f"option {name}: {value[:20]}... ({len(value)} digits) is out of range") from None
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"option {name}: value must be a number, got {value!r}") from None


def _options(args) -> dict:
    out: dict = {}
    for name, value in getattr(args, "option", None) or ():
        out[name] = value  # the last -O for a name wins
    return out


def _emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


# --- subcommands --------------------------------------------------------------------------------

def _cmd_list(args) -> int:
    from attnc.library import describe, variants

    names = variants()
    if not names:
        print("no library variants installed", file=sys.stderr)
        return 0
    width = max(map(len, names))
    for name in names:
        desc = describe(name)
        if desc.startswith(name + ":"):  # files open with "# name: what it is (source)"
            desc = desc[len(name) + 1:].strip()
        print(f"{name:<{width}}  {desc}".rstrip())
    return 0


def _cmd_passes(args) -> int:
    from attnc.pipeline import LINEAR_PASSES, PASSES

    width = max(len(p.name) for p in PASSES + LINEAR_PASSES)
    for title, passes in (("", PASSES), ("linear blocks: ", LINEAR_PASSES)):
        print(f"{title}parse -> cascade -> " + " -> ".join(p.name for p in passes)
              + " -> kernel -> triton")
        for i, p in enumerate(passes, 1):
            print(f"{i:>2}. {p.name:<{width}}  {p.doc}".rstrip())
    return 0


def _cmd_show(args) -> int:
    from attnc.pipeline import read_spec, show

    options = _options(args)
    if options:
        # launch options (block sizes, warps, stages) do not change any IR
        from attnc.runtime.softmax import LAUNCH_OPTIONS
        options = {k: v for k, v in options.items() if k not in LAUNCH_OPTIONS}
    _emit(show(read_spec(args.spec), args.stage, options))
    return 0


def _cmd_compile(args) -> int:
    import attnc

    kernel = attnc.compile(args.spec, **_options(args))
    if args.output:
        with open(args.output, "w") as f:
            f.write(kernel.source)
        print(f"wrote {args.output} ({kernel.name})", file=sys.stderr)
    else:
        _emit(kernel.source)
    return 0


def _cmd_check(args) -> int:
    import torch

    import attnc
    from attnc import testing

    shape = {k: getattr(args, k) for k in ("B", "H", "Hkv", "M", "N", "D", "Dv")
             if getattr(args, k) is not None}
    for k, v in shape.items():
        least = 0 if k in ("M", "N") else 1
        if v < least:
            raise ValueError(f"--{k} must be at least {least}, got {v}")
    dtype = getattr(torch, args.dtype)
    kernel = attnc.compile(args.spec, **_options(args))
    if isinstance(kernel, attnc.LinearKernel):
        return _check_linear(kernel, args, dtype, shape)
    res = testing.check(kernel, dtype=dtype, seed=args.seed, **shape)
    verdict = "ok" if res["ok"] else "FAILED"
    cmp = "<=" if res["rel_error"] <= res["tolerance"] else ">"
    grad = res.get("grad_rel_error")
    grad = "no backward" if grad is None else f"gradients {grad:.3e}"
    print(f"{kernel.name} ({args.dtype}): relative error {res['rel_error']:.3e} {cmp} "
          f"tolerance {res['tolerance']:.0e}; lse max abs error "
          f"{res['lse_max_abs_error']:.3e}; {grad}: {verdict}")
    return 0 if res["ok"] else 1


def _check_linear(kernel, args, dtype, shape: dict) -> int:
    from attnc import testing

    if {"Hkv", "N"} & set(shape):
        raise ValueError(f"{kernel.name} is a linear block: its sizes are B, H, M (as T), D, Dv")
    sizes = {("T" if k == "M" else k): v for k, v in shape.items()}
    verdicts = []
    for algorithm in ("chunked", "recurrent") if kernel.why_not_chunked is None else ("recurrent",):
        res = testing.check_linear(kernel, dtype=dtype, seed=args.seed, algorithm=algorithm,
                                   **sizes)
        verdicts.append(res["ok"])
        cmp = "<=" if res["rel_error"] <= res["tolerance"] else ">"
        print(f"{kernel.name} {algorithm} ({args.dtype}): relative error {res['rel_error']:.3e} "
              f"{cmp} tolerance {res['tolerance']:.0e} (output and final states); gradients "
              f"{res['grad_rel_error']:.3e}: {'ok' if res['ok'] else 'FAILED'}")
    return 0 if all(verdicts) else 1


def _cmd_bench(args) -> int:
    import torch

    import attnc
    from attnc.bench import bench_attention, bench_linear

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    def given(value, default):
        return default if value is None else value
    size = {"B": given(args.B, 4 if gpu else 1), "H": given(args.H, 16 if gpu else 2),
            "N": given(args.N, 4096 if gpu else 64), "D": given(args.D, 128 if gpu else 32)}
    size.update(M=given(args.M, size["N"]), Dv=given(args.Dv, size["D"]),
                Hkv=given(args.Hkv, size["H"]))
    for k, v in size.items():
        if v < 1:
            raise ValueError(f"--{k} must be at least 1, got {v}")
    kernel = attnc.compile(args.spec, **_options(args))
    print(f"{kernel.name}: {str(dtype).removeprefix('torch.')} on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else ' (interpreter)'}")
    if isinstance(kernel, attnc.LinearKernel):
        lines = bench_linear(kernel, B=size["B"], H=size["H"], T=size["N"], D=size["D"],
                             Dv=size["Dv"], dtype=dtype, device=device,
                             backward=not args.no_backward, seed=args.seed)
    else:
        lines = bench_attention(kernel, **size, dtype=dtype, device=device,
                                backward=not args.no_backward, seed=args.seed)
    print("\n".join(lines))
    return 0


def _cmd_inspect(args) -> int:
    import json

    import torch

    from attnc import inspect
    from attnc.backends.triton.aot_jobs import Shape

    if (args.spec is None) == (not args.library):
        raise ValueError("inspect takes a SPEC or --library")
    for name in ("B", "H", "M", "N", "D", "Dv"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    arch = inspect.parse_arch(args.arch)
    shape = Shape(B=args.B, H=args.H, N=args.N, D=args.D, Dv=args.Dv, M=args.M,
                  dtype=getattr(torch, args.dtype))
    kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    try:
        if args.library:
            rows = inspect.library(shape, arch, args.workers)
        else:
            rows = inspect.inspect_spec(args.spec, shape, arch, kernels, _options(args),
                                        args.workers)
    except inspect.ToolsMissing as err:
        print(f"attnc: error: {err}", file=sys.stderr)
        return 3
    if args.json:
        _emit(json.dumps(rows, indent=1))
    else:
        _emit(inspect.header(shape, arch) + "\n\n" + inspect.table(rows, args.library))
    return 0 if all(r["ok"] for r in rows) else 1


def _cmd_cache(args) -> int:
    from attnc import cache

    if args.action == "info":
        info = cache.info()
        print(f"path:    {info['path']}")
        print(f"kernels: {info['kernels']}")
        print(f"configs: {info['configs']}")
        print(f"bytes:   {info['bytes']}")
        if info["temporary"]:  # only then, so the usual report stays four lines
            print(f"temporary files: {info['temporary']} (being written, or left by an "
                  "interrupted writer; `attnc cache clear` removes them)")
    else:
        removed = cache.clear()
        print(f"removed {removed} file{'s' * (removed != 1)} from {cache.cache_dir()}")
    return 0


# --- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from attnc import __version__

    # SHOW_STAGES is a constant of the pipeline; listed here so `--help` works without importing it
    stages = ("parse", "cascade", "desugar", "pass_count", "online_softmax", "online_rescale",
              "mask_bounds", "tile", "autodiff", "schedule", "fuse", "kernel", "triton",
              "chunk_scan", "tile_scan")
    parser = argparse.ArgumentParser(
        prog="attnc", description="A compiler for attention variants: specs in, fused Triton "
        "kernels out. SPEC is a .attn file, a library variant name or DSL text.")
    parser.add_argument("--version", action="version", version=f"attnc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_spec(p):
        p.add_argument("spec", metavar="SPEC", help="a .attn file, a library variant or DSL text")
        p.add_argument("-O", "--option", action="append", type=_option, metavar="NAME=VALUE",
                       help="override a spec option (repeatable)")
        return p

    p = sub.add_parser("list", help="library variants and their descriptions")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("passes", help="the compiler pipeline, in order")
    p.set_defaults(func=_cmd_passes)

    p = with_spec(sub.add_parser("show", help="print the IR after a stage"))
    p.add_argument("--stage", "-s", default="kernel", choices=stages,
                   help="stage to print after (default: kernel)")
    p.set_defaults(func=_cmd_show)

    p = with_spec(sub.add_parser("compile", help="print (or write) the generated Triton source"))
    p.add_argument("-o", "--output", metavar="FILE", help="write the source to FILE")
    p.set_defaults(func=_cmd_compile)

    p = with_spec(sub.add_parser("check", help="run the kernel and its gradients on random "
                                 "inputs against the reference interpreter; exit 1 over "
                                 "tolerance"))
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--seed", type=int, default=0)
    for name in ("B", "H", "Hkv", "M", "N", "D", "Dv"):
        p.add_argument(f"--{name}", type=int, default=None, metavar="INT",
                       help=f"size {name} (default: attnc.testing.check's)")
    p.set_defaults(func=_cmd_check)

    p = with_spec(sub.add_parser("bench", help="tune the kernel's launch configurations on "
                                 "random operands (cached for later runs), print the choice and "
                                 "time it"))
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: bfloat16 on a GPU, float32 in the interpreter")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-backward", action="store_true", help="tune and time the forward only")
    p.add_argument("--seed", type=int, default=0)
    for name, gpu, cpu in (("B", 4, 1), ("H", 16, 2), ("Hkv", "H", "H"), ("M", "N", "N"),
                           ("N", 4096, 64), ("D", 128, 32), ("Dv", "D", "D")):
        p.add_argument(f"--{name}", type=int, default=None, metavar="INT",
                       help=f"size {name} (default {gpu} on a GPU, {cpu} in the interpreter; "
                       "linear blocks: N is T)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("inspect", help="compile each kernel as the launcher would launch it on "
                       "a GPU (no GPU needed) and report registers, spills, shared memory, "
                       "tensor cores and the key loop's SASS")
    p.add_argument("spec", metavar="SPEC", nargs="?",
                   help="a .attn file, a library variant or DSL text")
    p.add_argument("-O", "--option", action="append", type=_option, metavar="NAME=VALUE",
                   help="override a spec option (repeatable)")
    p.add_argument("--library", action="store_true", help="every library spec instead of SPEC")
    p.add_argument("--arch", default="sm_90", help="target architecture (default sm_90)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    for name, default in (("B", 4), ("H", 16), ("M", "N"), ("N", 4096), ("D", 128),
                          ("Dv", "D")):
        p.add_argument(f"--{name}", type=int, default=None if isinstance(default, str)
                       else default, metavar="INT",
                       help=f"size {name} (default {default}; linear blocks: N is T)")
    p.add_argument("--kernels", default=None, metavar="ROLE[,ROLE]",
                   help="only kernels whose role starts so (forward, dq, dkdv, chunked, ...)")
    p.add_argument("--workers", type=int, default=1, help="compiling processes (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as a JSON list")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("cache", help="the on-disk kernel cache ($ATTNC_CACHE_DIR)")
    p.add_argument("action", choices=("info", "clear"))
    p.set_defaults(func=_cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse exits 2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return args.func(args)
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    except (CompileError, ValueError) as err:
        print(f"attnc: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if isinstance(err, BrokenPipeError):  # e.g. `attnc compile SPEC | head`
            # the recipe from the `signal` docs: point stdout at devnull so the flush at exit
            # does not raise again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        print(f"attnc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
