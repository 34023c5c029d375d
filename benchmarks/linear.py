"""Linear (state-update) attention: attnc.ops against flash-linear-attention, forward and
forward+backward.

    python -m benchmarks.linear [--quick] [--device cuda|cpu] [--autotune/--no-autotune]
        [--out FILE] [--ops gla simple_gla delta_rule gated_delta_rule retention]
        [--lengths 2048 4096 8192] [--head-dims 128 64] [--tokens 32768] [--heads 16]
        [--dtype bf16] [--modes fwd fwdbwd] [--check-length 256]

Both sides are called the way a model calls them: fla's layout [B, T, H, D], keyword arguments
of the same names (attnc.ops mirrors fla), `output_final_state=False` in the timed calls.
Inputs: q, k, v random normal; log gates `g` kept in fp32 (fla's Gated DeltaNet layer makes
them so; its kernels accumulate gates in fp32 either way) -- `logsigmoid(randn)` per key
feature for gla, `logsigmoid(randn) / 16` per head for simple_gla and the gated delta rule;
`beta = sigmoid(randn)`; the delta rules normalize q and k (`use_qk_l2norm_in_kernel=True`).
The batch is `--tokens // T`, so every length moves the same number of tokens.

Timing: `fwd` is one forward call under no_grad; `fwdbwd` is a forward on leaves that require
grad plus `o.backward(do)` (gradients reset to None first, so nothing accumulates).
Throughput is tokens per second: B * T / time.

Checks before timing, each a relative error ||a - b|| / ||b||:
  * on a slice (the first sequence, its first --check-length steps): attnc's chunked function
    against an eager float64 recurrence written here from the update rules -- o, the final
    state and, for `fwdbwd`, every input gradient (autograd through the recurrence);
  * at the benchmarked size: against fla's function where it runs (o, final state and, for
    `fwdbwd`, every gradient), else against attnc's step-by-step `fused_recurrent_*` kernel
    (o and final state only: that op's backward is the same chunked backward).
The column shows the largest error and the tensor it came from ("fp64 ..." = the slice).
Over the dtype's tolerance the suite exits 1 (the table is still written).
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F

import attnc  # noqa: F401 -- first: on a CPU-only machine it selects Triton's interpreter
from attnc import ops
from benchmarks import common

SUITE = "linear"
MODULE = "benchmarks.linear"
OPS = ("gla", "simple_gla", "delta_rule", "gated_delta_rule", "retention")
MODES = ("fwd", "fwdbwd")
FLA_MODULES = {"gla": "fla.ops.gla", "simple_gla": "fla.ops.simple_gla",
               "delta_rule": "fla.ops.delta_rule",
               "gated_delta_rule": "fla.ops.gated_delta_rule",
               "retention": "fla.ops.retention"}
# largest accepted relative error between two implementations, by input dtype
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}

GPU_SIZES = {"lengths": [2048, 4096, 8192], "head_dims": [128, 64], "tokens": 32768,
             "heads": 16}
QUICK_SIZES = {"lengths": [64], "head_dims": [16], "tokens": 64, "heads": 2}


# ----------------------------------------------------------------------------- formulas

def tokens_per_second(batch: int, length: int, ms: float) -> float:
    """Tokens processed per second by one call over a [batch, length] input taking `ms`."""
    return batch * length / (ms * 1e-3)


def fla_function(op: str):
    """fla's `chunk_<op>`, or (None, why it is unavailable)."""
    try:
        module = importlib.import_module(FLA_MODULES[op])
        return getattr(module, f"chunk_{op}"), None
    except Exception as exc:  # noqa: BLE001 -- any failure makes the peer "-"
        return None, f"fla not usable: {common.reason(exc)}"


def extra_arguments(op: str) -> dict:
    return {"use_qk_l2norm_in_kernel": True} if "delta" in op else {}


def make_inputs(op: str, batch: int, length: int, heads: int, dim: int, device,
                dtype) -> dict[str, torch.Tensor]:
    """The named inputs of `op` in fla's layout, as a model would feed them."""
    shape = (batch, length, heads)
    x = {name: common.randn(*shape, dim, device=device, dtype=dtype) for name in "qkv"}
    if op == "gla":
        x["g"] = F.logsigmoid(common.randn(*shape, dim, device=device, dtype=torch.float32))
    if op in ("simple_gla", "gated_delta_rule"):
        x["g"] = F.logsigmoid(common.randn(*shape, device=device, dtype=torch.float32)) / 16
    if "delta" in op:
        x["beta"] = torch.sigmoid(common.randn(*shape, device=device, dtype=torch.float32)
                                  ).to(dtype)
    return x


def _leaves(inputs: dict, requires_grad: bool) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone().requires_grad_(requires_grad) for n, t in inputs.items()}


def run_once(fn, inputs: dict, extra: dict, mode: str, do: torch.Tensor) -> dict:
    """o, the final state and (fwdbwd) every input gradient of one call on fresh leaves."""
    x = _leaves(inputs, mode == "fwdbwd")
    with torch.set_grad_enabled(mode == "fwdbwd"):
        o, final = fn(**x, output_final_state=True, **extra)
    out = {"o": o.detach(), "state": final.detach()}
    if mode == "fwdbwd":
        o.backward(do)
        out.update({f"d{n}": t.grad for n, t in x.items()})
    return out


def timed_call(fn, inputs: dict, extra: dict, mode: str, do: torch.Tensor):
    """The function the suite times (see the module docstring)."""
    if mode == "fwd":
        x = _leaves(inputs, False)

        def forward():
            with torch.no_grad():
                return fn(**x, output_final_state=False, **extra)
        return forward
    x = _leaves(inputs, True)

    def forward_backward():
        for t in x.values():
            t.grad = None
        o, _ = fn(**x, output_final_state=False, **extra)
        o.backward(do)
    return forward_backward


def compare(got: dict, want: dict, prefix: str = "") -> dict[str, float]:
    """Relative errors of the tensors both sides returned, by (prefixed) name."""
    return {prefix + key: common.relative_error(got[key].float(), ref)
            for key, ref in want.items()
            if ref is not None and got.get(key) is not None}


def eager_recurrence(op: str, q, k, v, g=None, beta=None, scale=None):
    """The op's step-by-step recurrence in float64 on fla-layout tensors (written from the
    update rules in attnc.ops' docstring): (o [B, T, H, V], final state [B, H, K, V]).
    Differentiable; memory grows with T, so it runs on a slice only."""
    q, k, v = q.double(), k.double(), v.double()
    if "delta" in op:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1])
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64,
                         device=q.device)[None, :, None, None]
    outs = []
    for t in range(T):
        qt, kt, vt = q[:, t], k[:, t], v[:, t]                      # [B, H, K|V]
        if op == "retention":
            S = gamma * S
        elif op == "gla":
            S = g[:, t].double().exp()[..., None] * S
        elif op in ("simple_gla", "gated_delta_rule"):
            S = g[:, t].double().exp()[..., None, None] * S
        if "delta" in op:
            old = (kt[..., None] * S).sum(-2)                       # S^T k
            vt = beta[:, t].double()[..., None] * (vt - old)
        S = S + kt[..., :, None] * vt[..., None, :]
        outs.append(scale * (qt[..., None] * S).sum(-2))
    return torch.stack(outs, dim=1), S


def check_against_eager(fn, op: str, inputs: dict, extra: dict, mode: str, do, batch: int,
                        length: int) -> tuple[dict, dict[str, float]]:
    """attnc on the first `batch` sequences cut to `length` steps, against
    eager_recurrence in float64 (gradients by autograd through the recurrence): attnc's
    tensors (as run_once returns them) and the errors by name."""
    cut = {n: t[:batch, :length] for n, t in inputs.items()}
    got = run_once(fn, cut, extra, mode, do[:batch, :length])
    ref = {n: t.detach().double().requires_grad_(mode == "fwdbwd") for n, t in cut.items()}
    with torch.set_grad_enabled(mode == "fwdbwd"):
        o, state = eager_recurrence(op, **ref)
    want = {"o": o.detach(), "state": state.detach()}
    if mode == "fwdbwd":
        o.backward(do[:batch, :length].double())
        want.update({f"d{n}": t.grad for n, t in ref.items()})
    return got, compare(got, want, prefix="fp64 ")


# ----------------------------------------------------------------------------- the suite


def run_case(op, dim, length, mode, args, dtype, notes: common.Notes, bench_kw: dict) -> dict:
    device = args.device
    batch = max(1, args.tokens // length)
    row = {"op": op, "dim": dim, "batch": batch, "length": length, "mode": mode,
           "attnc_ms": None, "fla_ms": None, "vs": None, "err": None, "worst": None,
           "ok": False, "attnc_note": "", "fla_note": "",
           "check": min(length, args.check_length)}
    torch.manual_seed(0)
    inputs = make_inputs(op, batch, length, args.heads, dim, device, dtype)
    do = common.randn(batch, length, args.heads, dim, device=device, dtype=dtype)
    extra = extra_arguments(op)
    ours = getattr(ops, f"chunk_{op}")
    peer, why = fla_function(op)
    if peer is None:
        row["fla_note"] = notes.mark(why)

    # correctness: on a slice against float64, at the benchmarked size against a peer
    errors: dict[str, float] = {}
    try:
        got, slice_errors = check_against_eager(ours, op, inputs, extra, mode, do, 1,
                                                args.check_length)
        errors.update(slice_errors)
        if batch > 1 or length > args.check_length:   # else the slice was the whole input
            got = run_once(ours, inputs, extra, mode, do)
    except Exception as exc:  # noqa: BLE001
        row["attnc_note"] = notes.mark(f"attnc chunk_{op} failed: {common.reason(exc)}")
        return row
    want = None
    if peer is not None:
        try:
            want, row["vs"] = run_once(peer, inputs, extra, mode, do), "fla"
        except Exception as exc:  # noqa: BLE001
            peer = None
            row["fla_note"] = notes.mark(f"fla chunk_{op} failed: {common.reason(exc)}")
    if want is None:
        # the step-by-step forward kernel; its backward is the chunked one, so only o, state
        recurrent = getattr(ops, f"fused_recurrent_{op}")
        try:
            want, row["vs"] = run_once(recurrent, inputs, extra, "fwd", do), "recurrent"
            got = {key: got[key] for key in ("o", "state")}
        except Exception as exc:  # noqa: BLE001
            row["attnc_note"] = notes.mark(f"attnc fused_recurrent_{op} failed: "
                                           f"{common.reason(exc)}")
            return row
    errors.update(compare(got, want))
    row["worst"] = max(errors, key=errors.get)
    row["err"] = errors[row["worst"]]
    row["ok"] = row["err"] <= TOLERANCE[dtype]
    del got, want
    common.release(device)

    # timing
    try:
        row["attnc_ms"] = common.bench(timed_call(ours, inputs, extra, mode, do), device,
                                       **bench_kw)
    except Exception as exc:  # noqa: BLE001
        row["ok"] = False
        row["attnc_note"] = notes.mark(f"attnc chunk_{op} failed while timed: {common.reason(exc)}")
    common.release(device)
    if peer is not None:
        try:
            row["fla_ms"] = common.bench(timed_call(peer, inputs, extra, mode, do), device,
                                         **bench_kw)
        except Exception as exc:  # noqa: BLE001
            row["fla_note"] = notes.mark(f"fla chunk_{op} failed while timed: {common.reason(exc)}")
        common.release(device)
    return row


def format_row(row: dict) -> list:
    def ms(key, note):
        return common.fmt(row[key], ".3f") if row[key] is not None else "- " + note

    def rate(key):
        if row[key] is None:
            return "-"
        return f"{tokens_per_second(row['batch'], row['length'], row[key]) / 1e6:.3g}"
    ratio = (row["fla_ms"] / row["attnc_ms"]) if row["fla_ms"] and row["attnc_ms"] else None
    err = "-" if row["err"] is None else f"{row['err']:.1e} ({row['worst']})"
    vs = "-" if row["vs"] is None else f"fp64 1x{row['check']} + {row['vs']}"
    return [row["op"], row["dim"], f"{row['batch']}x{row['length']}", row["mode"],
            ms("attnc_ms", row["attnc_note"]), ms("fla_ms", row["fla_note"]),
            common.fmt(ratio), rate("attnc_ms"), rate("fla_ms"), vs, err,
            "ok" if row["ok"] else "FAIL"]


HEADERS = ["op", "D", "B x T", "mode", "attnc (ms)", "fla (ms)", "fla/attnc",
           "attnc (Mtok/s)", "fla (Mtok/s)", "checked vs", "max rel err (tensor)", "check"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"sequence lengths T (default {GPU_SIZES['lengths']})")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None,
                        help=f"head dims, DK = DV (default {GPU_SIZES['head_dims']})")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"B * T for every length (default {GPU_SIZES['tokens']})")
    parser.add_argument("--heads", type=int, default=None,
                        help=f"heads H (default {GPU_SIZES['heads']})")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--check-length", type=int, default=256,
                        help="steps of the float64 eager check (on the first sequence)")
    args = parser.parse_args(argv)
    autotune = common.set_autotune(args)
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    args.lengths = args.lengths or sizes["lengths"]
    args.head_dims = args.head_dims or sizes["head_dims"]
    args.tokens = args.tokens or sizes["tokens"]
    args.heads = args.heads or sizes["heads"]
    dtype = common.dtype_of(args.dtype)
    bench_kw = {"repeat": 1} if args.quick else {}

    notes = common.Notes()
    rows = []
    for op in args.ops:
        for dim in args.head_dims:
            for length in args.lengths:
                for mode in args.modes:
                    row = run_case(op, dim, length, mode, args, dtype, notes, bench_kw)
                    rows.append(row)
                    print(" | ".join(str(c) for c in format_row(row)), flush=True)

    body = [
        f"attnc.ops `chunk_*` vs flash-linear-attention's functions of the same names; "
        f"{args.dtype}, H = {args.heads}, DK = DV = D, B = {args.tokens} // T, layout "
        f"[B, T, H, D]; autotune {'on' if autotune else 'off'}.",
        "fwd: one forward call (no grad); fwdbwd: forward + `o.backward(do)`. "
        "Times are medians (common.bench); fla/attnc > 1 means attnc is faster. "
        "Throughput: Mtok/s = B * T / time / 1e6.",
        "Inputs: q, k, v ~ N(0, 1); g = logsigmoid(randn) per key feature (gla), "
        "logsigmoid(randn) / 16 per head (simple_gla, gated_delta_rule), fp32; "
        "beta = sigmoid(randn); q, k L2-normalized in the delta rules.",
        f"Check (largest relative error ||a - b|| / ||b|| shown, tolerance "
        f"{TOLERANCE[dtype]:g} for {args.dtype}): on the first sequence's first "
        f"{args.check_length} steps against an eager float64 recurrence (o, final state and, "
        f"in fwdbwd, dq, dk, dv, dg, dbeta; names prefixed `fp64`); at full size against fla "
        f"where it runs (the same tensors), else against attnc's fused_recurrent kernel "
        f"(o and final state: its backward is the chunked one).",
        "",
        common.table(HEADERS, [format_row(r) for r in rows], align="lrrlrrrrrlrl"),
    ]
    if notes.texts:
        body.append(notes.render())
    text = "\n".join(body)
    common.publish(args.device, args.out, SUITE, MODULE, argv, text)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
