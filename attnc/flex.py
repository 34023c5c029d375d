"""`attnc.flex_attention`: FlexAttention's API on attnc's compiler.

The score_mod and the block mask's mask_mod are traced into one AttentionSpec (named "flex"),
which runs through the same pipeline as a `.attn` spec. Kernels are memoized by that IR, not by
the functions: a lambda re-created every step, or a captured tensor with new values, reuses the
compiled kernel; a captured Python number is a constant of the IR, so a new value compiles a new
kernel.

Which keys a query tile visits:
  * no block mask: all of them (plus whatever `where(cond, score, -inf)` in the score_mod lets
    mask_bounds prune: such a condition is moved into the mask);
  * a block mask that attnc's create_block_mask derived from an exactly analyzable mask_mod: the
    kernel uses the static mask bounds (finer than the block lists, and no index loads);
  * any other block mask (data-dependent mask_mod, lists chosen from the data, a torch
    BlockMask): a block-sparse kernel walks the mask's lists; mask_mod runs on partial blocks
    only, full blocks run without it (as FlexAttention's kernels do), wherever mask_mod is.
Either way the block mask must have been built for the call's lengths, with B and H 1 or the
call's (BlockMask.check_call).
"""

from __future__ import annotations

import threading

import sympy
import torch

from attnc import cache
from attnc.block_mask import BlockMask
from attnc.expr import symbols as S
from attnc.frontends.flex import Captures, hoist_mask, trace_mask_mod, trace_score_mod
from attnc.ir.cascade import QK, AttentionSpec, Normalizer
from attnc.passes.mask_bounds import analyze
from attnc.pipeline import Source
from attnc.runtime import compile_ir, validate
from attnc.runtime.base import TRACED
from attnc.runtime.softmax import Kernel

_KERNELS: dict[str, Kernel] = {}
LAYOUT = {"query": "[B, Hq, M, D]", "key": "[B, Hkv, N, D]", "value": "[B, Hkv, N, Dv]"}
_LOCK = threading.Lock()


def _as_block_mask(block_mask) -> BlockMask | None:
    if block_mask is None or isinstance(block_mask, BlockMask):
        return block_mask
    if all(hasattr(block_mask, a) for a in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE")):
        return BlockMask.from_torch(block_mask)
    raise ValueError("flex_attention: block_mask must be an attnc.BlockMask, a torch BlockMask or "
                     f"None, got {type(block_mask).__name__}")


def trace_spec(score_mod, block_mask: BlockMask | None, sizes: dict
               ) -> tuple[AttentionSpec, dict[str, torch.Tensor]]:
    """The AttentionSpec of (score_mod, block_mask) and the captured tensors it reads."""
    captures = Captures()
    qk = S.access(QK, S.m, S.n) * S.scale
    score = trace_score_mod(score_mod, captures) if score_mod is not None else qk
    mask = None
    if block_mask is not None:
        mask = trace_mask_mod(block_mask.mask_mod, captures)
        mask = None if mask is sympy.true else mask
    sparse = block_mask is not None and not (block_mask.derived and analyze(mask).exact)
    if not sparse:  # full blocks skip the mask, so only a static kernel may absorb the score's
        score, hoisted = hoist_mask(score)
        if hoisted is not None:
            mask = hoisted if mask is None else sympy.And(mask, hoisted)
    spec = AttentionSpec(name="flex", decls=captures.decls(sizes), score=score, mask=mask,
                         normalize=Normalizer.SOFTMAX, block_sparse=sparse)
    return spec, captures.tensors()


def kernel_for(spec: AttentionSpec) -> Kernel:
    """The compiled kernel of a traced spec, memoized by the spec itself."""
    key = cache.digest(sympy.srepr(spec.score), sympy.srepr(spec.mask), repr(spec.decls),
                       str(spec.block_sparse), str(cache.cache_dir()))
    with _LOCK:
        if key in _KERNELS:
            return _KERNELS[key]
    kernel = compile_ir(spec, Source(str(spec), TRACED), {}, {})
    assert isinstance(kernel, Kernel)
    with _LOCK:
        return _KERNELS.setdefault(key, kernel)


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                   enable_gqa=False, return_lse=False):
    """softmax(score_mod(q.k * scale) masked by block_mask) @ value, as
    torch.nn.attention.flex_attention.flex_attention computes it.

    query [B, Hq, M, D], key [B, Hkv, N, D], value [B, Hkv, N, Dv]; Hq != Hkv needs
    enable_gqa=True. Returns out [B, Hq, M, Dv], and lse [B, Hq, M] (natural log) with
    return_lse=True. Rows that see no key give 0 and lse = -inf.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flex_attention: {name} must be a 4-D tensor [B, H, L, D], got "
                             f"{got}")
    # dtypes and devices under flex_attention's own argument names (the kernel says q, k, v)
    validate.operands("flex_attention", LAYOUT, query=query, key=key, value=value)
    for name, flag in (("enable_gqa", enable_gqa), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise ValueError(f"flex_attention: {name} must be True or False, got {flag!r}")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"flex_attention: query has {query.shape[1]} heads and key "
                         f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention")
    for name, fn in (("score_mod", score_mod),):
        if fn is not None and not callable(fn):
            raise ValueError(f"flex_attention: {name} must be callable or None")
    bm = _as_block_mask(block_mask)
    B, H, M, _ = query.shape
    if bm is not None:  # also when the kernel will not read its lists (static mask bounds)
        bm.check_call("flex_attention", B, H, M, key.shape[2], query.device)
    sizes = {S.B: B, S.H: H, S.M: M, S.N: key.shape[2]}
    spec, tensors = trace_spec(score_mod, bm, sizes)
    kernel = kernel_for(spec)
    # the kernel's mask is the block mask's mask_mod, traced: _call need not compare them
    return kernel._call(query, key, value, scale, return_lse,
                      bm if spec.block_sparse else None,
                      {n: t.to(query.device) for n, t in tensors.items()}, own_mask_mod=True)
