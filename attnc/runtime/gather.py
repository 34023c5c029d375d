"""Kernels for gathered keys: `mask = ... and n in idx[b, h, m, :]` (per-query key lists, token
top-k as in DeepSeek-V3.2's sparse attention) and `mask = ... and n // C in blk[b, h, m // C2, :]`
(per-query-block key-block lists, NSA's selected blocks). A row sees only the keys (blocks) its
list names, and among those only the ones the rest of the mask allows.

Contract:
  * The list tensor is a declared integer `input`; its index before `:` is a subsequence of
    (b, h, m) in that order (m may be `m // C2`): `idx[b, h, m, :]`, `idx[b, m, :]` (one list
    shared by the query heads) ... Entries < 0 are padding; an entry >= N (>= the number of key
    blocks) is a ValueError naming the tensor, as are a non-integer dtype or a wrong shape.
  * A key listed twice in one list counts once (the mask is membership: `n in list`); the
    runtime sorts each list and drops repeats before the kernels run.
  * Token lists (key_block 1) run `GatherKernel`: the kernels of
    attnc/backends/triton/softmax/gather.py, which visit only listed keys; lists shared by the
    heads gather each K/V row once for a GQA group's heads. The backward computes dq per row
    and dk/dv per key from transposed lists built with a stable sort at call time: no atomics,
    the same bits every run. Param gradients (a learnable bias next to the lists) are refused
    at call time, not computed.
  * Block lists (key_block C > 1, per query block C2) run the block-sparse kernel of the spec
    without the gather (`BlockGatherKernel`, a `Kernel` compiled with block_sparse=True, which
    the compile option block_sparse=True may repeat), whose block mask is built from the lists
    at each call: block sizes (C2, C), every listed block a partial block masked by the rest of
    the mask. C and C2 must be powers of two >= 16.
  * Both are called like `attnc.Kernel`: `kernel(q, k, v, *, scale=None, return_lse=False,
    **tensors)`; a `block_mask=` is refused (the lists are the block mask).
"""

from __future__ import annotations

import math
from dataclasses import replace

import sympy
import torch

from attnc.backends.triton.contract import GeneratedModule
from attnc.backends.triton.softmax import gather as backend
from attnc.backends.triton.softmax.forward import KernelNames
from attnc.block_mask import BlockMask, dense_to_ordered
from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.around import Around, Gather
from attnc.ir.cascade import AttentionSpec, TensorKind, origin_of
from attnc.ir.kernel import AttentionKernel
from attnc.pipeline import IR, Source, run_passes
from attnc.runtime.base import CompiledKernel
from attnc.runtime.softmax import Kernel, check_call, prepare_call_checks


def compile_gathered(src: Source, options: dict, frontend_ir: AttentionSpec,
                     trail: list[tuple[str, IR]], launch_overrides: dict,
                     tune: bool | None) -> GatherKernel | BlockGatherKernel:
    """The kernel of a spec whose mask gathers its keys: token lists or block lists."""
    gather = frontend_ir.around.gather
    assert gather is not None
    if frontend_ir.block_sparse and gather.key_block == 1:
        raise ValueError(f"{frontend_ir.name}: its keys are gathered from "
                         f"{gather.tensor}; compile it without block_sparse=True (a block mask "
                         "cannot narrow a list of keys)")
    others = replace(frontend_ir.around, gather=None)
    if others != Around():
        raise _refuse(src, frontend_ir, "gathered keys do not combine with operands, prologues, "
                      "gates, head maps or head mixing yet",
                      "apply the prologue in torch before the call, or drop the gather")
    rows = _row_dims(src, frontend_ir, gather)
    if gather.key_block == 1:
        return GatherKernel(src, options, frontend_ir, trail, launch_overrides, tune, rows)
    return BlockGatherKernel(src, options, frontend_ir, launch_overrides, tune, rows)


def _refuse(src: Source, ir: AttentionSpec, message: str, hint: str) -> CompileError:
    err = CompileError(f"{ir.name}: {message}", tensor="gather", hint=hint)
    where = origin_of(ir.origins, "gather")  # the `in` conjunct (frontends/lower_around.py)
    return err if where is None else err.located(src.text, src.filename, where.line,
                                                 where.column)


def _row_dims(src: Source, ir: AttentionSpec, gather: Gather) -> tuple[str, ...]:
    """What the list tensor's dims before the list are ("b", "h", "m" in order, a subsequence),
    and the query block size C2 of an index `m // C2` as the last one ("m" stays the name)."""
    decl = next((d for d in ir.decls if d.name == gather.tensor), None)
    if decl is None or decl.kind is not TensorKind.INPUT:
        raise _refuse(src, ir, f"the key list {gather.tensor} must be a declared integer "
                      "input", f"declare it: input {gather.tensor}[b, h, m, count]")
    names: list[str] = []
    for ix in gather.index:
        ix = sympy.sympify(ix)
        name = next((x for x, sym in (("b", S.b), ("h", S.h), ("m", S.m)) if ix == sym), "")
        names.append("m" if not name and _query_block(ix) is not None else name)
    ordered = "" not in names and names == sorted(set(names), key=lambda x: "bhm".index(x))
    if not ordered or "m" not in names or len(decl.dims) != len(names) + 1:
        raise _refuse(src, ir, f"the list {gather} must be indexed by b, h and m (or m // C) "
                      "in that order, some of them dropped, then `:` over the last dim",
                      f"e.g. n in {gather.tensor}[b, h, m, :] or n in {gather.tensor}[b, m, :]")
    return tuple(names)


def _query_block(ix: sympy.Expr) -> int | None:
    """C2 for an index floor(m / C2) (C2 an integer > 1), else None."""
    if isinstance(ix, sympy.floor):
        num, den = ix.args[0].as_numer_denom()
        if num == S.m and den.is_Integer and den > 1:
            return int(den)
    return None


def _check_list(kernel, t: torch.Tensor, name: str, rows: tuple[str, ...], want: dict[str, int],
                bound: int, what: str) -> None:
    """An integer tensor [<rows>, count] whose dims match the call, entries < bound."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{kernel.name}: {name} lists {what} and must be an integer tensor, got "
                         f"{t.dtype}")
    for dim, (r, size) in enumerate(zip(rows, t.shape)):
        if size != want[r]:
            raise ValueError(f"{kernel.name}: {name} has {size} entries along dim {dim} ({r}); "
                             f"this call needs {want[r]}")
    if t.numel() and not torch.compiler.is_compiling():
        top = int(t.max())
        if top >= bound:
            raise ValueError(f"{kernel.name}: {name} lists {what} up to {top}, but there are "
                             f"only {bound} (entries < 0 are padding)")


def _as_rows(t: torch.Tensor, rows: tuple[str, ...], B: int) -> torch.Tensor:
    """The lists as [B, 1 or H, rows along m, count]: missing b broadcast, missing h kept 1."""
    x = t
    if "b" not in rows:
        x = x.unsqueeze(0).expand(B, *x.shape)
    if "h" not in rows:
        x = x.unsqueeze(1)
    return x


class GatherKernel(CompiledKernel):
    """A compiled spec over per-query key lists (`n in idx[b, h, m, :]`):
    `kernel(q, k, v, *, scale=None, return_lse=False, **inputs)`, differentiable in q, k, v.
    Its module is generated by backends/triton/softmax/gather.py, cached under its own key."""

    SALT = "gather"

    def __init__(self, src: Source, options: dict, frontend_ir: AttentionSpec,
                 trail: list[tuple[str, IR]], launch_overrides: dict, tune: bool | None,
                 rows: tuple[str, ...]):
        final = trail[-1][1]
        assert isinstance(final, AttentionKernel) and final.around.gather is not None
        if tune:
            raise ValueError(f"{final.name}: a gathered-keys kernel runs its fixed heuristic "
                             "tiles; autotune=True is not supported")
        if "kv_splits" in launch_overrides:
            raise ValueError(f"{final.name}: kv_splits does not apply to gathered keys (each "
                             "row walks its own list)")
        self.kernel_ir: AttentionKernel = final
        self.gather: Gather = final.around.gather
        self.rows = rows
        self.block = next((c for c in map(_query_block, map(sympy.sympify, self.gather.index))
                           if c is not None), 1)
        self.shared = "h" not in rows  # one list for every query head of (b, m)
        self.inputs = tuple(d.name for d in final.inputs)
        self._overrides = launch_overrides
        super().__init__(src, options, frontend_ir, trail, tune)
        prepare_call_checks(self, src, frontend_ir)

    def __repr__(self) -> str:
        return f"attnc.GatherKernel({self.name!r}, lists={self.gather.tensor!r})"

    def _codegen(self, final, header: str) -> GeneratedModule:
        return backend.generate(final, header=header)

    def _contracts(self, final, names: dict) -> tuple:
        return backend.contracts(final, KernelNames(final, names))

    def config(self, device: torch.device) -> dict[str, int]:
        fixed = {k.upper() if k.startswith("block") else k: v for k, v in self._overrides.items()}
        return {**backend.default_config(device), **fixed}

    def aot_jobs(self, shape, arch: int = 90, backward: bool = True,
                 inspect: bool = False) -> list[dict]:
        """The jobs `attnc inspect` compiles (backends/triton/aot_jobs.py): the forward and
        (`backward`) the dq and dk/dv kernels as a CUDA device launches them at `shape`
        (aot_jobs.Shape), on meta tensors; every list full (its declared count of keys), a key
        listed by `count` queries in the transposed lists."""
        from attnc.backends.triton import aot_jobs
        s = shape.sizes
        q, k, v = aot_jobs._operands(shape)
        extras = aot_jobs._extras(self.kernel_ir.inputs, shape)
        count = extras[self.gather.tensor].shape[-1]
        heads = 1 if self.shared else s["H"]
        lists = aot_jobs._meta(s["B"], heads, s["M"], count, dtype=torch.int32)
        ends = aot_jobs._meta(s["B"], heads, s["M"], dtype=torch.int32)
        mod, launches = aot_jobs.recording(self.generated.kernels)
        config = self.config(torch.device("cuda"))
        scale = 1.0 / math.sqrt(s["D"])
        out, lse = backend.launch_forward(mod, q, k, v, extras, lists, ends, scale, config,
                                          self.shared)
        if backward and self.kernel_ir.grad is not None:
            keys = s["B"] * (1 if self.shared else s["Hkv"]) * s["N"]
            rows = aot_jobs._meta(lists.numel(), dtype=torch.int32)
            starts = aot_jobs._meta(keys + 1, dtype=torch.int64)
            backend.launch_backward(mod, q, k, v, extras, lists, ends, rows, starts,
                                    self.shared, lse, lse, torch.empty_like(out), scale, config)
        return aot_jobs._labelled(self.path, launches, arch, inspect)

    def __call__(self, q, k, v=None, *, scale=None, return_lse=False, block_mask=None,
                 **inputs):
        if not isinstance(return_lse, bool):
            raise ValueError(f"{self.name}: return_lse must be True or False, got "
                             f"{return_lse!r}")
        if block_mask is not None:
            raise ValueError(f"{self.name}: takes no block_mask; its keys are the lists in "
                             f"{self.gather.tensor}")
        extras = check_call(self, q, k, v, scale, inputs)
        B, H, M, _ = q.shape
        N = k.shape[2]
        named = dict(zip(self.inputs, extras))
        for d in self.kernel_ir.inputs:
            if d.kind is TensorKind.PARAM and named[d.name].requires_grad and \
                    torch.is_grad_enabled():
                raise ValueError(f"{self.name}: param {d.name} requires grad, but gathered-keys "
                                 "kernels compute no param gradients yet; pass it detached")
        t = named[self.gather.tensor]
        want = {"b": B, "h": H, "m": -(-M // self.block)}
        _check_list(self, t, self.gather.tensor, self.rows, want, N, "keys")
        lists, ends = self.prepare(t, B, M, N)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, lse = _Gathered.apply(self, scale, lists, ends, q, k, v, *extras)
        return (out, lse) if return_lse else out

    def prepare(self, t: torch.Tensor, B: int, M: int, N: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The lists as the kernels read them: [B, 1 or H, M, count] int32, each row its distinct
        keys in ascending order (K/V rows read in address order) then N for padding and
        repeats, and per row the count of its distinct keys."""
        x = _as_rows(t, self.rows, B).long()
        x = torch.where(x < 0, N, x).sort(-1).values
        repeat = torch.zeros_like(x, dtype=torch.bool)
        repeat[..., 1:] = x[..., 1:] == x[..., :-1]
        # sorted again, the repeats join the padding at the end, which the kernels skip
        x = torch.where(repeat, N, x).sort(-1).values
        ends = (x < N).sum(-1)
        if self.block > 1:  # lists per query block: each row reads its block's list
            x = x.repeat_interleave(self.block, 2)[:, :, :M]
            ends = ends.repeat_interleave(self.block, 2)[:, :, :M]
        return x.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()

    def transpose(self, lists: torch.Tensor, H: int, Hkv: int, N: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key (per (b, key) for shared lists, else per (b, kv head, key)) the query rows
        that list it, in a fixed order: (rows, starts) with the key's rows at
        rows[starts[key]:starts[key + 1]]; a row is m (shared lists) or (h % group) * M + m."""
        B, _, M, _ = lists.shape
        group = H // Hkv
        b, h, m, _ = (lists < N).nonzero(as_tuple=True)
        n = lists[lists < N].long()  # boolean indexing walks in nonzero's (row-major) order
        if self.shared:
            owner, row, keys = b * N + n, m, B * N
        else:
            owner, row, keys = (b * Hkv + h // group) * N + n, (h % group) * M + m, B * Hkv * N
        owner, order = torch.sort(owner, stable=True)
        starts = torch.searchsorted(owner, torch.arange(keys + 1, device=lists.device))
        # int64 offsets: B * H * M * count entries may pass 2**31 (128 heads, long lists)
        return row[order].to(torch.int32).contiguous(), starts.to(torch.int64)


class _Gathered(torch.autograd.Function):
    """out, lse of a GatherKernel; the backward runs its dq and dk/dv kernels."""

    @staticmethod
    def forward(ctx, kernel: GatherKernel, scale: float, lists, ends, q, k, v, *extras):
        named = dict(zip(kernel.inputs, extras))
        out, lse = backend.launch_forward(kernel.module(), q, k, v, named, lists, ends, scale,
                                          kernel.config(q.device), kernel.shared)
        ctx.kernel, ctx.scale = kernel, scale
        ctx.save_for_backward(q, k, v, out, lse, lists, ends, *extras)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        kernel: GatherKernel = ctx.kernel
        if kernel.kernel_ir.grad is None:
            raise RuntimeError(f"{kernel.name}: no backward: {kernel.kernel_ir.no_backward}")
        q, k, v, out, lse, lists, ends, *extras = ctx.saved_tensors
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse
        rows, starts = kernel.transpose(lists, q.shape[1], k.shape[1], k.shape[2])
        dq, dk, dv = backend.launch_backward(
            kernel.module(), q, k, v, dict(zip(kernel.inputs, extras)), lists, ends, rows,
            starts, kernel.shared, lse, delta.contiguous(), dout.contiguous(), ctx.scale,
            kernel.config(q.device))
        return (None, None, None, None, dq, dk, dv) + (None,) * len(extras)


class BlockGatherKernel(Kernel):
    """A compiled spec over per-query-block key-block lists (`n // C in blk[b, h, m // C2, :]`):
    the spec's block-sparse kernel without the gather, its block mask built from the lists."""

    def __init__(self, src: Source, options: dict, frontend_ir: AttentionSpec,
                 launch_overrides: dict, tune: bool | None, rows: tuple[str, ...]):
        gather = frontend_ir.around.gather
        assert gather is not None
        block_q = next((c for c in map(_query_block, map(sympy.sympify, gather.index))
                        if c is not None), 1)
        for what, size in (("key block C of `n // C`", gather.key_block),
                           ("query block C2 of `m // C2`", block_q)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"{frontend_ir.name}: the {what} is {size}; lists of key "
                                 "blocks run on the block-sparse kernel, whose blocks are "
                                 "powers of two >= 16 (list per query block: m // 64)")
        self.gather, self.rows, self.block_sizes = gather, rows, (block_q, gather.key_block)
        inner = replace(frontend_ir, around=Around(), block_sparse=True)
        super().__init__(src, options, inner, run_passes(inner, src=src), launch_overrides, tune)

    def __repr__(self) -> str:
        return f"attnc.BlockGatherKernel({self.name!r}, lists={self.gather.tensor!r})"

    def __call__(self, q, k, v=None, *, scale=None, return_lse=False, block_mask=None,
                 **inputs):
        if block_mask is not None:
            raise ValueError(f"{self.name}: takes no block_mask; its key blocks are the lists "
                             f"in {self.gather.tensor}")
        check_call(self, q, k, v, scale, inputs)  # q, k, v and the list's declared shape first
        return self._call(q, k, v, scale, return_lse, self.block_mask(q, k, inputs[
            self.gather.tensor]), inputs, own_mask_mod=True)

    def block_mask(self, q, k, t: torch.Tensor) -> BlockMask:
        """The lists `t` as a BlockMask of block sizes (C2, C): each listed block partial (the
        rest of the mask applies inside), repeats merged, padding dropped."""
        name = self.gather.tensor
        B, H, M, _ = q.shape
        N = k.shape[2]
        bq, bk = self.block_sizes
        blocks = -(-N // bk)
        _check_list(self, t, name, self.rows, {"b": B, "h": H, "m": -(-M // bq)}, blocks,
                    "key blocks")
        x = _as_rows(t.to(q.device), self.rows, B).long()
        dense = torch.zeros(*x.shape[:3], blocks + 1, dtype=torch.int32, device=x.device)
        dense.scatter_(-1, torch.where(x < 0, blocks, x), 1)
        num, idx = dense_to_ordered(dense[..., :blocks])
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(bq, bk), seq_lengths=(M, N))
