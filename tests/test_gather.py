"""Gathered keys (`n in idx[b, h, m, :]`, `n // C in blk[b, h, m // C2, :]`): the kernels of
attnc/runtime/gather.py against an eager reference written here from the math -- a dense
boolean mask built from the lists (padding < 0 dropped, a repeated entry is one key) and the
rest of the mask, then a masked softmax in float64. Forward (out, lse) and gradients (torch
autograd through the reference) in fp32 and bf16, ragged lengths, GQA, lists shared by the
heads, padding, rows whose list is all padding (out 0, lse -inf), biases reading the gathered
key, and per-call checks."""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.errors import CompileError
from attnc.runtime.gather import BlockGatherKernel, GatherKernel
from attnc.testing import rel_error

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
ALIBI = ("  param slopes[h]\n"
         "  score = dot(q, k) * scale + slopes[h] * (n - m)\n")


def spec(rows: tuple[str, ...], count: int, key_block: int = 1, query_block: int = 1,
         body: str = "") -> str:
    """A causal block whose mask gathers `n in idx[<rows>, :]` (n // key_block; m read as
    m // query_block), the list `input idx[<rows>, count]`, with `body`'s statements."""
    def of(m: str) -> list[str]:
        return [m if r == "m" and query_block > 1 else r for r in rows]
    dims = ", ".join(of(f"(m + {query_block - 1}) // {query_block}"))
    index = ", ".join(of(f"m // {query_block}"))
    key = "n" if key_block == 1 else f"n // {key_block}"
    return (f"attention topk {{\n  input idx[{dims}, {count}]\n{body}"
            f"  mask = n <= m and {key} in idx[{index}, :]\n}}")


def compile_gathered(rows: tuple[str, ...], count: int, key_block: int = 1,
                     query_block: int = 1, body: str = "", **launch):
    return attnc.compile(spec(rows, count, key_block, query_block, body), **launch)


def expand_lists(idx, rows, B, H, M, query_block=1):
    """[B, H, M, count] lists of every (b, h, m) from lists indexed by `rows`."""
    x = idx.long()
    if "b" not in rows:
        x = x.unsqueeze(0).expand(B, *x.shape)
    if "h" not in rows:
        x = x.unsqueeze(1)
    x = x.expand(B, H, *x.shape[2:])
    return x.repeat_interleave(query_block, 2)[:, :, :M]


def listed(lists, columns):
    """[..., columns] bool: column c is in the row's list (entries < 0 are padding)."""
    dense = torch.zeros(*lists.shape[:-1], columns + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(lists < 0, columns, lists), True)
    return dense[..., :columns]


def reference(q, k, v, visible, scale, bias=None):
    """Softmax attention over the visible (m, n) pairs in float64; a row with none gives out 0
    and lse -inf."""
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.where(visible, p, 0.0) @ vv, lse


def causal(M, N):
    return torch.arange(N)[None, :] <= torch.arange(M)[:, None]


def operands(B, H, Hkv, M, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g).to(dtype).requires_grad_()
            for h, L in ((H, M), (Hkv, N), (Hkv, N))]


def check(kernel, q, k, v, idx, visible, bias=None, **inputs):
    """Forward and gradients of `kernel` against the reference over `visible`."""
    dtype = q.dtype
    out, lse = kernel(q, k, v, idx=idx, return_lse=True, **inputs)
    ref, ref_lse = reference(q, k, v, visible, 1 / math.sqrt(q.shape[-1]), bias)
    assert rel_error(out, ref) <= TOL[dtype]
    empty = ~visible.any(-1)
    assert (lse[empty] == -math.inf).all() and (out[empty] == 0).all()
    assert torch.allclose(lse[~empty].double(), ref_lse[~empty], atol=1e-4, rtol=1e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, got, exp in zip("qkv", grads, want):
        assert rel_error(got, exp) <= TOL[dtype], name
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [("b", "h", "m"), ("b", "m")], ids=["per_head", "shared"])
def test_token_lists(rows, dtype):
    B, H, Hkv, M, N, D, count = 1, 2, 1, 9, 21, 16, 5
    kernel = compile_gathered(rows, count, block_n=16, block_m=16)
    assert isinstance(kernel, GatherKernel)
    q, k, v = operands(B, H, Hkv, M, N, D, dtype)
    g = torch.Generator().manual_seed(1)
    shape = [{"b": B, "h": H, "m": M}[r] for r in rows] + [count]
    idx = torch.randint(-3, N, shape, generator=g)
    idx[..., 1] = idx[..., 0]    # a repeated key counts once
    idx[..., 3, :] = -1          # query row 3: only padding
    lists = expand_lists(idx, rows, B, H, M)
    check(kernel, q, k, v, idx, listed(lists, N) & causal(M, N))


def test_shared_lists_fill_a_tile_of_heads():
    """16 query heads on one kv head share each row's list: one program's tile holds all of
    them (tl.dot rows), each K/V row gathered once."""
    B, H, M, N, D, count = 1, 16, 3, 12, 16, 8
    kernel = compile_gathered(("b", "m"), count)
    q, k, v = operands(B, H, 1, M, N, D, torch.float32)
    idx = torch.randint(-5, N, (B, M, count), generator=torch.Generator().manual_seed(2))
    check(kernel, q, k, v, idx, listed(expand_lists(idx, ("b", "m"), B, H, M), N) & causal(M, N))


def test_bias_reads_the_gathered_key():
    B, H, Hkv, M, N, D, count = 1, 2, 1, 7, 15, 16, 5
    kernel = compile_gathered(("b", "h", "m"), count, body=ALIBI)
    q, k, v = operands(B, H, Hkv, M, N, D, torch.float32)
    idx = torch.randint(-2, N, (B, H, M, count), generator=torch.Generator().manual_seed(3))
    slopes = torch.rand(H, generator=torch.Generator().manual_seed(4))
    bias = slopes.double()[:, None, None] * (torch.arange(N)[None, :]
                                             - torch.arange(M)[:, None]).double()
    check(kernel, q, k, v, idx, listed(expand_lists(idx, ("b", "h", "m"), B, H, M), N)
          & causal(M, N), bias, slopes=slopes)


def test_token_lists_per_query_block():
    B, H, Hkv, M, N, D, count = 1, 1, 1, 9, 17, 16, 7
    kernel = compile_gathered(("b", "h", "m"), count, query_block=4)
    q, k, v = operands(B, H, Hkv, M, N, D, torch.float32)
    idx = torch.randint(-2, N, (B, H, 3, count), generator=torch.Generator().manual_seed(5))
    lists = expand_lists(idx, ("b", "h", "m"), B, H, M, query_block=4)
    check(kernel, q, k, v, idx, listed(lists, N) & causal(M, N))


def test_only_listed_keys_are_read():
    """Keys no list names hold NaN: a kernel that touched them would return NaN."""
    B, H, M, N, D = 1, 1, 5, 24, 16
    kernel = compile_gathered(("b", "h", "m"), 4)
    q, k, v = operands(B, H, H, M, N, D, torch.float32)
    idx = torch.randint(0, 8, (B, H, M, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        k[:, :, 8:] = math.nan
        v[:, :, 8:] = math.nan
    out = kernel(q, k, v, idx=idx)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad[:, :, :8]).all()


def test_backward_is_deterministic():
    B, H, Hkv, M, N, D = 1, 2, 1, 6, 8, 16
    kernel = compile_gathered(("b", "h", "m"), 8)
    idx = torch.randint(0, N, (B, H, M, 8), generator=torch.Generator().manual_seed(7))
    runs = []
    for _ in range(2):
        q, k, v = operands(B, H, Hkv, M, N, D, torch.float32)
        kernel(q, k, v, idx=idx).square().sum().backward()
        runs.append((k.grad, v.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [("b", "h", "m"), ("b", "m")], ids=["per_head", "shared"])
def test_block_lists(rows, dtype):
    """NSA's selected blocks: lists of 16-key blocks per 16-row query block."""
    B, H, Hkv, M, N, D, count = 1, 2, 1, 40, 70, 16, 3
    kernel = compile_gathered(rows, count, key_block=16, query_block=16)
    assert isinstance(kernel, BlockGatherKernel)
    q, k, v = operands(B, H, Hkv, M, N, D, dtype)
    shape = [{"b": B, "h": H, "m": 3}[r] for r in rows] + [count]
    idx = torch.randint(-2, 5, shape, generator=torch.Generator().manual_seed(8))
    blocks = listed(expand_lists(idx, rows, B, H, M, query_block=16), 5)
    visible = blocks.repeat_interleave(16, -1)[..., :N] & causal(M, N)
    check(kernel, q, k, v, idx, visible)


def test_block_lists_read_only_listed_blocks():
    B, H, M, N, D = 1, 1, 32, 64, 16
    kernel = compile_gathered(("b", "h", "m"), 1, key_block=16, query_block=16)
    q, k, v = operands(B, H, H, M, N, D, torch.float32)
    with torch.no_grad():
        k[:, :, 16:] = math.nan
    out = kernel(q, k, v, idx=torch.zeros(B, H, 2, 1, dtype=torch.int64))
    assert torch.isfinite(out).all()


def test_call_checks_name_the_list():
    B, H, M, N, D = 1, 2, 8, 16, 16
    kernel = compile_gathered(("b", "h", "m"), 4)
    q, k, v = operands(B, H, H, M, N, D, torch.float32)
    idx = torch.zeros(B, H, M, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="idx.*integer"):
        kernel(q, k, v, idx=idx.float())
    with pytest.raises(ValueError, match="idx has shape"):
        kernel(q, k, v, idx=idx[:, :, :, :3])
    with pytest.raises(ValueError, match="idx lists keys up to 16"):
        kernel(q, k, v, idx=idx + 16)
    with pytest.raises(ValueError, match="block_mask"):
        kernel(q, k, v, idx=idx, block_mask=object())
    blocks = compile_gathered(("b", "h", "m"), 2, key_block=16, query_block=16)
    with pytest.raises(ValueError, match="idx lists key blocks up to 1, but there are only 1"):
        blocks(q, k, v, idx=torch.ones(B, H, 1, 2, dtype=torch.int64))


def test_param_gradients_are_refused():
    kernel = compile_gathered(("b", "h", "m"), 2, body=ALIBI)
    q, k, v = operands(1, 2, 2, 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="slopes requires grad"):
        kernel(q, k, v, idx=torch.zeros(1, 2, 4, 2, dtype=torch.int64),
               slopes=torch.ones(2, requires_grad=True))


def test_compile_refusals():
    with pytest.raises(ValueError, match="powers of two >= 16"):
        compile_gathered(("b", "h", "m"), 2, key_block=8, query_block=16)
    with pytest.raises(ValueError, match="query block C2 of `m // C2` is 1"):
        compile_gathered(("b", "h", "m"), 2, key_block=16)
    with pytest.raises(ValueError, match="without block_sparse=True"):
        compile_gathered(("b", "h", "m"), 2, block_sparse=True)
    with pytest.raises(CompileError, match="do not combine") as err:
        compile_gathered(("b", "h", "m"), 2, body="  param gt[b, h, m]\n"
                         "  gate = sigmoid(gt[b, h, m])\n")
    assert (err.value.line, err.value.column) == (5, 21)  # the `in` conjunct
    with pytest.raises(CompileError, match="indexed by b, h and m"):
        attnc.compile("attention t {\n  input idx[h, b, m, 2]\n"
                      "  mask = n in idx[h, b, m, :]\n}")


def test_library_variants():
    """token_topk (lists shared by the heads) and nsa_selected (64-key blocks per 64 queries)."""
    B, H, M, N, D = 1, 2, 6, 70, 16
    q, k, v = operands(B, H, 1, M, N, D, torch.float32)
    topk = attnc.load("token_topk", topk=3)
    idx = torch.tensor([[[0, -1, -1], [0, 1, -1], [2, 0, 1], [3, 0, 1], [4, 3, 2],
                         [5, 69, 1]]])
    visible = listed(expand_lists(idx, ("b", "m"), B, H, M), N) & causal(M, N)
    check(topk, q, k, v, idx, visible)
    nsa = attnc.load("nsa_selected", count=2)
    q, k, v = operands(B, H, 1, N, N, D, torch.float32)
    blocks = torch.tensor([[[[0, -1], [1, 0]], [[-1, -1], [1, 1]]]])
    visible = listed(expand_lists(blocks, ("b", "h", "m"), B, H, N, 64), 2).repeat_interleave(
        64, -1)[..., :N] & causal(N, N)
    out, lse = nsa(q, k, v, blocks=blocks, return_lse=True)
    ref, _ = reference(q, k, v, visible, 1 / math.sqrt(D))
    assert rel_error(out, ref) <= TOL[torch.float32]
    assert (lse[0, 1, :64] == -math.inf).all()


def test_inspect_jobs_launch_like_a_gpu():
    """`attnc inspect`'s jobs (recorded launches on meta tensors): the three kernels, the
    shared list's heads in one tile, the GPU's configuration."""
    from attnc.backends.triton import aot_jobs
    kernel = attnc.load("token_topk", topk=64)
    jobs = kernel.aot_jobs(aot_jobs.Shape(B=1, H=16, Hkv=1, N=512, D=128))
    assert [j["kernel"] for j in jobs] == ["forward", "dq", "dkdv"]
    forward = aot_jobs.values(jobs[0])
    assert (forward["BLOCK_H"], forward["BLOCK_N"], forward["CHUNKS"]) == (16, 128, 1)
    assert aot_jobs.values(jobs[2])["BLOCK_G"] == 16 and not forward["UPCAST"]


def test_gradient_through_the_lse():
    B, H, Hkv, M, N, D = 1, 2, 1, 6, 13, 16
    kernel = compile_gathered(("b", "h", "m"), 4)
    q, k, v = operands(B, H, Hkv, M, N, D, torch.float32)
    idx = torch.randint(-1, N, (B, H, M, 4), generator=torch.Generator().manual_seed(9))
    idx[0, 0, 2] = -1
    visible = listed(expand_lists(idx, ("b", "h", "m"), B, H, M), N) & causal(M, N)
    out, lse = kernel(q, k, v, idx=idx, return_lse=True)
    ref, ref_lse = reference(q, k, v, visible, 1 / math.sqrt(D))
    seen = visible.any(-1)
    w = torch.randn(B, H, M, generator=torch.Generator().manual_seed(10))
    grads = torch.autograd.grad(out.sum() + (lse * w)[seen].sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum() + (ref_lse * w)[seen].sum(), (q, k, v))
    for name, got, exp in zip("qkv", grads, want):
        assert rel_error(got, exp) <= TOL[torch.float32], name
