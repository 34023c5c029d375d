"""Run every benchmark suite, one after another, into one results file.

    python -m benchmarks [--suites softmax linear decode compile_latency block_mask compiled gather]
                         [--quick] [--device cuda|cpu] [--out FILE] [--no-autotune]

On a GPU machine this one command is the whole measurement: each suite runs at its default
(GPU) sizes and writes its section of benchmarks/results/<device>-<date>.md, which names the
device, driver, versions and each suite's command. The full sweep compiles FlexAttention for
every shape and tunes attnc for every (spec, head dim): it takes hours. `--short` picks the
headline points (D = 128; 4k and 16k tokens; decoding at batch 1 and 16 over 4k and 128k
caches). Tuning compiles some 15-25 candidates per launch; with `--no-autotune` (heuristic
configurations) a `--short` run should fit a GPU session of about ten minutes -- an estimate:
it has not run on a GPU yet. `--quick` runs each suite at its smoke-test size (CPU).
Exit status: 1 if any suite failed a check
or crashed (the others still run).
"""

from __future__ import annotations

import argparse
import importlib
import traceback

from benchmarks import common

SUITES = {"softmax": "benchmarks.softmax", "linear": "benchmarks.linear",
          "decode": "benchmarks.decode", "compile_latency": "benchmarks.compile_latency",
          "block_mask": "benchmarks.block_mask_setup", "compiled": "benchmarks.compiled",
          "gather": "benchmarks.gather"}
# block_mask_setup predates the common flags: its sizes for a quick run, and no autotuning
BLOCK_MASK_QUICK = ["--lengths", "256", "512", "--torch-max", "512", "--repeat", "1",
                    "--block", "64"]
SHORT = {"softmax": ["--head-dims", "128", "--lengths", "4096", "16384"],
         "linear": ["--head-dims", "128", "--lengths", "4096"],
         "decode": ["--batches", "1", "16", "--cache", "4096", "131072"],
         "compile_latency": ["--specs", "causal", "alibi"],
         "block_mask": ["--lengths", "8192", "32768", "131072", "--torch-max", "32768"],
         "compiled": [], "gather": ["--lengths", "4096", "16384"]}


def suite_argv(name: str, args) -> list[str]:
    argv = ["--device", args.device] + (["--out", args.out] if args.out else [])
    if args.short:
        argv += SHORT[name]
    if name == "block_mask":
        return argv + (BLOCK_MASK_QUICK if args.quick else [])
    if args.quick:
        argv.append("--quick")
    if args.autotune is not None:
        argv.append("--autotune" if args.autotune else "--no-autotune")
    return argv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES))
    common.add_common_arguments(parser)
    parser.add_argument("--short", action="store_true",
                        help="the headline sizes only")
    args = parser.parse_args(argv)
    failed = []
    for name in args.suites:
        print(f"== {name}", flush=True)
        try:
            status = importlib.import_module(SUITES[name]).main(suite_argv(name, args))
        except Exception:  # noqa: BLE001 - one suite's crash must not hide the others' results
            traceback.print_exc()
            status = 1
        if status:
            failed.append(name)
    print("all suites passed their checks" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
