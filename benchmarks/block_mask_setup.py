"""Block-mask construction: attnc.create_block_mask vs torch's, same masks, same device.

    python -m benchmarks.block_mask_setup [--lengths 1024 4096 16384 131072] [--device cpu|cuda]
                                          [--torch-max 16384] [--data-max 16384]

torch's create_block_mask evaluates the mask_mod on all Q_LEN x KV_LEN pairs. attnc traces it:
for masks the analysis bounds (causal, windows, prefix, sinks, chunks) it derives the blocks
from each row's key intervals and never evaluates the mask; document masks (data) are evaluated
blockwise over the key range the causal part leaves open. Both results are checked equal before
timing; above --torch-max only attnc runs (torch would evaluate L^2 pairs, 17e9 at 128k), and
above --data-max the data-dependent mask is left out (attnc evaluates it too, blockwise).
Times are medians over --repeat runs after one warm-up (CUDA synchronized). Writes the
"block mask" section of benchmarks/results/<device>-<date>.md and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

import attnc
from benchmarks import common

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def masks(length: int, device) -> dict:
    doc = (torch.arange(length, device=device) * 7 // length).view(1, -1)  # 7 documents

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < 1024

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < length // 8

    def sinks(b, h, q_idx, kv_idx):
        return kv_idx < 4

    def document(b, h, q_idx, kv_idx):
        return doc[0, q_idx] == doc[0, kv_idx]

    return {
        "causal": causal,
        "sliding_window(1024)": attnc.and_masks(causal, window),
        "prefix_lm(N/8)": attnc.or_masks(causal, prefix),
        "streaming(4 sinks, 1024)": attnc.and_masks(causal, attnc.or_masks(sinks, window)),
        "causal document (data)": attnc.and_masks(causal, document),
    }


def _time(fn, device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(lengths, device, repeat: int, block: int, torch_max: int, data_max: int) -> list[dict]:
    rows = []
    for length in lengths:
        for name, mod in masks(length, device).items():
            if "(data)" in name and length > data_max:
                continue
            def ours():
                return attnc.create_block_mask(mod, 1, 1, length, length, device=device,
                                               BLOCK_SIZE=block)

            def theirs():
                return torch_block_mask(mod, 1, 1, length, length, device=device,
                                        BLOCK_SIZE=block)
            row = {"length": length, "mask": name, "attnc_ms": 1e3 * _time(ours, device, repeat),
                   "torch_ms": None, "speedup": None, "equal": None}
            if length <= torch_max:
                a, b = ours(), theirs()
                row["equal"] = all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)
                row["torch_ms"] = 1e3 * _time(theirs, device, repeat)
                row["speedup"] = row["torch_ms"] / row["attnc_ms"]
            rows.append(row)
            print(f"{length:>7} {name:26s} attnc {row['attnc_ms']:9.2f} ms  torch "
                  f"{_fmt(row['torch_ms'], '9.2f')} ms  x{_fmt(row['speedup'], '7.1f')}  "
                  f"equal={row['equal']}", flush=True)
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows) -> str:
    lines = ["Median wall time after a warm-up; BLOCK_SIZE as given; the results are compared "
             "equal (all four index tensors) before timing.", "",
             "| Q_LEN = KV_LEN | mask | attnc (ms) | torch (ms) | speed-up | equal |",
             "|---:|---|---:|---:|---:|:---:|"]
    for r in rows:
        equal = {None: "not run", True: "yes", False: "NO"}[r["equal"]]
        lines.append(f"| {r['length']} | {r['mask']} | {r['attnc_ms']:.2f} | "
                     f"{_fmt(r['torch_ms'], '.2f')} | {_fmt(r['speedup'], '.1f')}"
                     f"{'x' if r['speedup'] else ''} | {equal} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 4096, 16384, 32768, 131072])
    parser.add_argument("--torch-max", type=int, default=16384,
                        help="longest length to run torch's create_block_mask at")
    parser.add_argument("--data-max", type=int, default=16384,
                        help="longest length to run the data-dependent mask at")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--out", default=None,
                        help="results file (default: benchmarks/results/<device>-<date>.md)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(args.lengths, device, args.repeat, args.block, args.torch_max, args.data_max)
    common.publish(device, args.out, "block mask", "benchmarks.block_mask_setup", argv,
                   table(rows))
    return 0 if all(r["equal"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
