"""What every benchmark suite shares: timing, the environment header, tables and results files.

Timing: on a GPU `triton.testing.do_bench` (CUDA events, L2 flushed between runs, the median
of `rep` ms of runs after `warmup` ms of warm-up); on a CPU (Triton's interpreter, where do_bench
has no device to time) the median wall time of `repeat` runs after one warm-up. Suites never
time a kernel's first call: compilation is the compile-latency suite's business.

Results: each suite run rewrites its own section (`## <suite>`) of
`benchmarks/results/<device>-<date>.md`, under a header naming the device, driver, versions and
the command of every section, so one file holds a whole session's runs on one device.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_arguments(parser, quick_help: str = "tiny sizes (a CPU smoke run)") -> None:
    """--device, --quick, --autotune/--no-autotune, --out: the flags every suite takes."""
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None,
                        help="tune attnc's launch configurations first (default: on a GPU)")
    parser.add_argument("--out", default=None,
                        help="results file (default: benchmarks/results/<device>-<date>.md)")


def set_autotune(args) -> bool:
    """Switch attnc's autotuner for this process (ATTNC_AUTOTUNE), per --autotune; tuning runs
    at a kernel's first call for a new (kernel, head dims, dtype, device) and is cached."""
    on = args.autotune if args.autotune is not None else torch.device(args.device).type == "cuda"
    os.environ["ATTNC_AUTOTUNE"] = "1" if on else "0"
    return on


def bench(fn, device, *, warmup: int = 25, rep: int = 100, repeat: int = 3) -> float:
    """Median time of fn() in milliseconds (see the module docstring for how)."""
    if torch.device(device).type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine() or 'cpu'}, {os.cpu_count()} cores"


def device_slug(device) -> str:
    """The device part of a results file name: `cpu`, or the GPU's name in lower-case words."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else "-"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "-"


def environment(device) -> list[str]:
    """Header lines: device, driver, versions."""
    import triton

    import attnc
    device = torch.device(device)
    lines = [f"- device: {device_name(device)} ({device.type})"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- driver {driver_version()}, CUDA {torch.version.cuda}, "
                     f"{props.multi_processor_count} SMs, capability {props.major}.{props.minor}")
    else:
        lines.append("- no GPU: attnc kernels run through Triton's interpreter")
    lines.append(f"- torch {torch.__version__}, triton {triton.__version__}, attnc "
                 f"{attnc.__version__}, python {platform.python_version()}")
    return lines


def command(module: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", module] + [shlex.quote(a) for a in args])


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; `align` has one character per column: l(eft) or r(ight)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_path(device, out: str | None = None) -> Path:
    if out:
        return Path(out)
    return RESULTS / f"{device_slug(device)}-{datetime.date.today()}.md"


def write_section(path: Path, device, suite: str, cmd: str, body: str) -> Path:
    """Replace (or add) `## suite` in the results file; the header is rewritten each time so it
    names the latest environment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sections: dict[str, str] = {}
    if path.is_file():
        for chunk in re.split(r"(?m)^## ", path.read_text())[1:]:
            name, _, rest = chunk.partition("\n")
            sections[name.strip()] = rest.strip("\n")
    sections[suite] = f"- command: `{cmd}`\n- date: {datetime.date.today()}\n\n{body.strip()}"
    header = [f"# attnc benchmarks: {device_name(device)}", "", *environment(device), ""]
    text = "\n".join(header) + "\n" + "\n\n".join(
        f"## {name}\n\n{sections[name]}" for name in sorted(sections)) + "\n"
    path.write_text(text)
    return path


def publish(device, out: str | None, suite: str, module: str, argv, text: str) -> Path:
    """Write the suite's section of the results file and print it."""
    path = write_section(results_path(device, out), device, suite, command(module, argv), text)
    print()
    print(text)
    print(f"wrote {path}")
    return path


def randn(*shape, device, dtype, requires_grad: bool = False, scale: float = 1.0):
    """Random normal data (benchmarks never run on zeros: they can take fast paths)."""
    t = torch.randn(*shape, device=device, dtype=dtype)  # in dtype: no fp32 copy of a cache
    if scale != 1.0:
        t = t * scale
    return t.requires_grad_(requires_grad)


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| alone where b is all zeros); inf where either
    side has a NaN or an infinity, so a broken result can never pass a check."""
    a, b = a.detach().double(), b.detach().double()
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    err = diff / ref if ref > 0 else diff
    return err if math.isfinite(err) else math.inf


class Notes:
    """Numbered footnotes for a table: each distinct text once, numbered in order of first use;
    `mark` returns the reference to put in a cell, `render` the list to put under the table."""

    def __init__(self):
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        text = " ".join(str(text).split()).replace("|", "/")
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def render(self) -> str:
        return "\n".join(f"[{i}] {t}" for i, t in enumerate(self.texts, 1))


def reason(exc: BaseException, limit: int = 160) -> str:
    """An exception as one short line for a footnote."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def release(device) -> None:
    """Return cached device memory between cases (large cases follow small ones)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def raise_recompile_limit(n: int = 1 << 12) -> None:
    """Every shape is a new static graph for torch.compile(flex_attention); keep dynamo from
    falling back to eager after its default number of recompilations."""
    import torch._dynamo
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
