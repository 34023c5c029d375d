"""Token top-k attention (`token_topk`: each query attends to its own k keys, the list shared by
the heads, as DeepSeek-V3.2's sparse attention) against the torch glue it replaces.

    python -m benchmarks.gather [--device cuda|cpu] [--lengths 4096 16384] [--topk 2048]
                                [--heads 16] [--head-dim 128] [--out FILE]

On a GPU, per length: the attnc kernel, torch's SDPA over a dense boolean mask built from the
lists (the mask built outside timing), and a torch gather (the listed K/V rows gathered into
[B, M, k, D], then scores, softmax and the weighted sum over them), forward and forward +
backward, each checked against the attnc output first. Without a GPU the kernels cannot be
timed; the suite then compiles attnc's kernels for sm_90 exactly as the launcher would launch
them (`attnc inspect`'s machinery: registers, spills, tensor cores, the SASS of the loop) for
token_topk and for the dense `causal` kernel at the same shape, and estimates the loop
instructions each runs per query row and head: programs x warps x loop iterations x loop SASS.
"""

# attnc's Triton backend first: without a GPU it switches Triton to its interpreter, which must
# happen before anything imports Triton.
import attnc  # noqa: I001
import attnc.backends.triton  # noqa: F401

import argparse
import math

import torch
import torch.nn.functional as F
import triton

from benchmarks import common


def lists(B: int, M: int, N: int, topk: int, device) -> torch.Tensor:
    """[B, M, topk] causal key lists (random keys n <= m, -1 padding where m < topk)."""
    score = torch.rand(B, M, N, device=device)
    causal = torch.arange(N, device=device)[None, :] <= torch.arange(M, device=device)[:, None]
    top = score.masked_fill(~causal, -1.0).topk(min(topk, N), -1)
    return torch.where(top.values < 0, -1, top.indices)


def torch_dense(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def torch_gather(q, k, v, idx, scale):
    """The listed rows of k and v (one kv head) gathered per query, then a softmax over them."""
    B = q.shape[0]
    rows = torch.arange(B, device=q.device)[:, None, None]
    safe = idx.clamp(min=0)
    kg, vg = k[:, 0][rows, safe], v[:, 0][rows, safe]                     # [B, M, k, D]
    s = torch.einsum("bhmd,bmkd->bhmk", q, kg).float() * scale
    s = s.masked_fill((idx < 0)[:, None], -math.inf)
    return torch.einsum("bhmk,bmkd->bhmd", torch.softmax(s, -1).to(v.dtype), vg)


def gpu_rows(args, kernel) -> list[list]:
    dev, dtype = args.device, torch.bfloat16
    rows = []
    for L in args.lengths:
        B, H, D = 1, args.heads, args.head_dim
        q, k, v = (common.randn(B, h, L, D, device=dev, dtype=dtype, requires_grad=True)
                   for h in (H, 1, 1))
        idx = lists(B, L, L, args.topk, dev)
        mask = torch.zeros(B, L, L + 1, dtype=torch.bool, device=dev)
        mask.scatter_(-1, torch.where(idx < 0, L, idx), True)
        mask = mask[:, None, :, :L]
        scale = 1 / math.sqrt(D)
        runs = {"attnc": lambda: kernel(q, k, v, idx=idx, scale=scale),
                "torch dense mask": lambda: torch_dense(q, k, v, mask, scale),
                "torch gather": lambda: torch_gather(q, k, v, idx, scale)}
        ref = runs["attnc"]().float()
        for name, fn in runs.items():
            try:
                err = common.relative_error(fn().float(), ref)
                dout = torch.randn(B, H, L, D, device=dev, dtype=dtype)
                fwd = common.bench(fn, dev)
                both = common.bench(lambda: torch.autograd.grad(fn(), (q, k, v), dout), dev)
                rows.append([L, args.topk, name, common.fmt(fwd), common.fmt(both),
                             f"{err:.1e}"])
            except torch.cuda.OutOfMemoryError:
                rows.append([L, args.topk, name, "OOM", "OOM", "-"])
            common.release(dev)
    return rows


def estimate(row: dict, programs: int, iterations: float, per: int) -> str:
    """Estimated SASS instructions of the loop per (query row, head): every warp of every
    program runs the loop body `iterations` times."""
    warps = row["config"]["num_warps"]
    return common.fmt(programs * warps * iterations * row["loop_instructions"] / per, ".0f")


def cpu_rows(args, kernel) -> str:
    """Compiled figures for sm_90 (no GPU needed) and the estimated loop work."""
    from attnc import inspect
    from attnc.backends.triton import aot_jobs
    compiled, work = [], []
    for L in args.lengths:
        B, H, D, K = 1, args.heads, args.head_dim, args.topk
        shape = aot_jobs.Shape(B=B, H=H, Hkv=1, N=L, D=D)
        per = B * H * L
        cfg = kernel.config(torch.device("cuda"))
        heads = min(triton.next_power_of_2(H), 64)  # query heads per tile (one kv head)
        programs = L * B * triton.cdiv(H, heads)
        # per program: k entries per row (forward, dq); a key's transposed list holds k entries
        # on average (M * k entries over N = M keys), BLOCK_M // heads per step, for each chunk
        # of `heads` query heads (dk/dv)
        loops = {"forward": (programs, K / cfg["BLOCK_N"]), "dq": (programs, K / cfg["BLOCK_N"]),
                 "dkdv": (L * B, K / max(1, cfg["BLOCK_M"] // heads) * triton.cdiv(H, heads))}
        jobs = kernel.aot_jobs(shape, inspect=True)
        for j, r in zip(jobs, inspect.compile_jobs(jobs, 2)):
            row = inspect._row(f"token_topk L={L} k={K}", j, r, 90)
            compiled.append(row)
            if row["ok"]:
                n, it = loops[j["kernel"]]
                work.append([L, K, "token_topk " + j["kernel"], n, f"{it:.0f}",
                             estimate(row, n, it, per)])
        dense = attnc.load("causal")
        jobs = aot_jobs.kernel_jobs(dense, shape, inspect=True)
        for j, r in zip(jobs, inspect.compile_jobs(jobs, 2)):
            row = inspect._row(f"causal L={L}", j, r, 90)
            compiled.append(row)
            role = j["kernel"].split()[0]
            if not row["ok"] or role not in ("forward", "dq", "dkdv"):
                continue
            tile, step = j["constexprs"]["BLOCK_M"], j["constexprs"]["BLOCK_N"]
            if role == "dkdv":  # a key tile walks the causal query tiles of every head
                n, it = triton.cdiv(L, step) * B, L / 2 / tile * H
            else:               # a query tile walks its causal key tiles (N / 2 on average)
                n, it = triton.cdiv(L, tile) * B * H, L / 2 / step
            work.append([L, "-", "causal (dense) " + j["kernel"], n, f"{it:.0f}",
                         estimate(row, n, it, per)])
    return (inspect.table(compiled, spec_column=True) + "\n"
            + common.table(["L", "k", "kernel", "programs", "loop iterations / program",
                            "loop SASS / (row x head)"], work)
            + "\nloop SASS / (row x head): programs x warps x iterations x the loop's SASS, "
              "per query row and head (dense causal: N / 2 keys per row on average; "
              "token_topk: k listed keys). No GPU: nothing was timed.\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.lengths = args.lengths or ([4096, 16384] if cuda else [8192, 32768])
    kernel = attnc.load("token_topk", topk=args.topk)
    if cuda:
        body = common.table(["L", "k", "implementation", "fwd ms", "fwd+bwd ms", "err vs attnc"],
                            gpu_rows(args, kernel))
    else:
        body = cpu_rows(args, kernel)
    print(body)
    common.publish(args.device, args.out, "gather", "benchmarks.gather", argv, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
