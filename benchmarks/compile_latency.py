"""Compile latency: how long until a new attention variant first runs, attnc vs FlexAttention.

    python -m benchmarks.compile_latency [--quick] [--device cuda|cpu] [--specs ...]
        [--length 1024] [--head-dim 64] [--flex/--no-flex] [--out FILE]

Every measurement runs in a fresh Python process (imports are not counted: each child times
from after its imports), with its own attnc, Triton and TorchInductor cache directories:

  spec -> source   attnc.compile on an empty cache: parse, passes and code generation, no
                   Triton compilation (that happens at the first call)
  cold first call  attnc.load(spec) + the first forward call (synchronized) with every cache
                   empty: the spec's passes, code generation, and Triton's compilation of the
                   kernel (on a CPU: its first run through the interpreter)
  warm first call  the same in a new process whose caches hold the previous run's files
  steady call      a later call in that process: subtracting it from a first call leaves the
                   compile overhead alone (on a CPU the interpreter's run time dominates it)
  flex API cold    attnc.flex_attention with the mod (tracing the Python mod included), cold;
                   like torch's below, its block mask is built before the clock starts (which
                   already loads sympy and analyses the mask, so it reads lower than `cold`)
  torch.compile(flex_attention) cold / warm first call, and steady call: the same mod, with
                   its block mask built before the clock starts

The ratio flex cold / attnc cold says how many times sooner attnc's kernel first runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common

SUITE = "compile latency"
MODULE = "benchmarks.compile_latency"
SPECS = ("causal", "sliding_window", "alibi", "softcap")

# One child per measurement. argv: system, spec, B, H, L, D, dtype, device. Prints JSON.
CHILD = r'''
import json, sys, time
system, spec, B, H, L, D, dtype, device = sys.argv[1:9]
B, H, L, D = int(B), int(H), int(L), int(D)
import torch
if system != "flex":
    import attnc  # before torch's flex_attention: on a CPU it selects Triton's interpreter
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

dtype = getattr(torch, dtype)
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
           for _ in range(3))
slopes = torch.linspace(0.05, 0.5, H, device=device)
WINDOW, CAP = 256, 50.0


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def alibi(score, b, h, q_idx, kv_idx):
    return score + slopes[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return CAP * torch.tanh(score / CAP)


MODS = {"causal": (None, causal), "sliding_window": (None, window), "alibi": (alibi, causal),
        "softcap": (softcap, causal)}
OPTIONS = {"sliding_window": {"window": WINDOW}, "softcap": {"cap": CAP}}
score_mod, mask_mod = MODS[spec]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


result = {}
if system == "source":
    result["first"], _ = timed(lambda: attnc.compile(spec, **OPTIONS.get(spec, {})).source)
elif system == "attnc":
    extra = {"slopes": slopes} if spec == "alibi" else {}
    kernel_box = []

    def first():
        kernel_box.append(attnc.load(spec, **OPTIONS.get(spec, {})))
        return kernel_box[0](q, k, v, **extra)
    result["first"], _ = timed(first)
    result["steady"], _ = timed(lambda: kernel_box[0](q, k, v, **extra))
elif system == "flex_api":
    block_mask = attnc.create_block_mask(mask_mod, None, None, L, L, device=device)
    call = lambda: attnc.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    result["first"], _ = timed(call)
    result["steady"], _ = timed(call)
else:
    block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
    compiled = torch.compile(flex_attention)
    call = lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
    result["first"], _ = timed(call)
    result["steady"], _ = timed(call)
print("RESULT " + json.dumps(result))
'''


def run_child(system: str, spec: str, caches: Path, args) -> dict:
    env = dict(os.environ, ATTNC_CACHE_DIR=str(caches / "attnc"),
               TRITON_CACHE_DIR=str(caches / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"))
    env.pop("ATTNC_AUTOTUNE", None)
    argv = [system, spec, str(args.batch), str(args.heads), str(args.length),
            str(args.head_dim), args.dtype, args.device]
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True,
                          text=True, timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{system} {spec}: exit {done.returncode}: {tail}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(spec: str, args, root: Path) -> dict:
    """Every measurement of one spec; a failing one is recorded as an error string."""
    row: dict = {"spec": spec}

    def attempt(label, fn):
        try:
            row.update(fn())
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            row.setdefault("errors", []).append(f"{label}: {str(err).splitlines()[0]}")

    attempt("source", lambda: {"source": run_child("source", spec, root / "source", args)["first"]})

    def cold_and_warm(system):
        """A first call on empty caches, then one in a new process on the caches it left."""
        cold = run_child(system, spec, root / system, args)
        warm = run_child(system, spec, root / system, args)
        return {f"{system}_cold": cold["first"], f"{system}_warm": warm["first"],
                f"{system}_steady": warm["steady"]}
    attempt("attnc", lambda: cold_and_warm("attnc"))
    attempt("flex API", lambda: {"flex_api_cold": run_child("flex_api", spec, root / "api",
                                                            args)["first"]})
    if args.flex:
        attempt("torch flex", lambda: cold_and_warm("flex"))
    if row.get("flex_cold") and row.get("attnc_cold"):
        row["ratio"] = row["flex_cold"] / row["attnc_cold"]
    return row


def render(rows: list[dict], args) -> str:
    def s(row, key, spec=".2f"):
        return common.fmt(row.get(key), spec)
    body = [f"B={args.batch}, H={args.heads}, L={args.length}, D={args.head_dim}, {args.dtype}, "
            "forward. Seconds; each first call in a fresh process (imports not counted). "
            "ratio = torch.compile(flex) cold first call / attnc cold first call. Both flex "
            "APIs build their block mask before the clock starts (attnc's thereby loads sympy "
            "and analyses the mask, so its flex-API first call reads lower than `attnc cold`)."]
    if args.device == "cpu":
        body.append("On a CPU attnc's kernel runs in Triton's interpreter, which compiles "
                    "nothing: a warm first call saves only the code generation, and the steady "
                    "call is the interpreter's run time (inside every first call too).")
    body.append("")
    body.append(common.table(
        ["spec", "spec -> source", "attnc cold", "attnc warm", "attnc steady",
         "attnc flex API cold", "flex cold", "flex warm", "flex steady", "ratio"],
        [[r["spec"], s(r, "source", ".3f"), s(r, "attnc_cold"), s(r, "attnc_warm"),
          s(r, "attnc_steady", ".3f"), s(r, "flex_api_cold"), s(r, "flex_cold"),
          s(r, "flex_warm"), s(r, "flex_steady", ".3f"),
          common.fmt(r.get("ratio"), ".1f") + ("x" if r.get("ratio") else "")] for r in rows]))
    errors = [f"- {r['spec']}: {e}" for r in rows for e in r.get("errors", [])]
    if errors:
        body += ["", "Failures:", *errors]
    return "\n".join(body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser, "one small spec set (a CPU smoke run)")
    parser.add_argument("--specs", nargs="+", default=None, choices=SPECS)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile(flex_attention)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per child process")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.specs = args.specs or (["causal"] if args.quick else list(SPECS))
    args.batch = args.batch or (4 if gpu else 1)
    args.heads = args.heads or (16 if gpu else 2)
    args.length = args.length or (4096 if gpu else 128 if args.quick else 256)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    rows = []
    with tempfile.TemporaryDirectory(prefix="attnc-latency-") as tmp:
        for spec in args.specs:
            rows.append(measure(spec, args, Path(tmp) / spec))
            print(json.dumps(rows[-1]), flush=True)
    common.publish(args.device, args.out, SUITE, MODULE, argv, render(rows, args))
    return 1 if any(r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
