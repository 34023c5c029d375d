"""Compiled softmax-family kernels (`attention` and `cascade` blocks) as callables and torch
ops.

A `Kernel` wraps its generated forward in a `torch.library.custom_op` with a fake
implementation, so it works under `torch.compile(fullgraph=True)`. A second op runs the backward
kernels and is registered as the first's autograd formula; param gradients leave the kernels as
partial sums and are reduced deterministically (attnc/runtime/params.py).
`Kernel.__call__` validates every argument and says which one is wrong and what was expected.
A kernel with something around its score (operands, prologues, a gate, a head map) is called
through attnc/runtime/around.py instead (a torch.autograd.Function).
"""

from __future__ import annotations

import itertools
import math
import threading
import warnings

import sympy
import torch

from attnc import autotune, cache
from attnc.backends.triton.softmax.launch import (Config, backward_config, backward_overrides,
                                                  default_config, launch, launch_backward,
                                                  launch_packed, packs_heads, pow2)
from attnc.block_mask import BlockMask
from attnc.expr import symbols as S
from attnc.ir.cascade import TensorKind
from attnc.ir.kernel import AttentionKernel
from attnc.library import call_checks
from attnc.passes.mask_bounds import monotone
from attnc.pipeline import IR, FrontendIR, Source
from attnc.runtime import around, validate
from attnc.runtime import paged as paging
from attnc.runtime.base import CompiledKernel
from attnc.runtime.params import ParamGradients

LAUNCH_OPTIONS = ("block_m", "block_n", "num_warps", "num_stages", "kv_splits")
_OPS: dict[str, object] = {}
_KERNELS: dict[str, Kernel] = {}
_LOCK = threading.Lock()
LAYOUT = {"q": "[B, H, M, D]", "k": "[B, H, N, D]", "v": "[B, H, N, Dv]"}


class Kernel(CompiledKernel):
    """A compiled attention variant:
    `kernel(q, k, v=None, *, scale=None, return_lse=False, block_mask=None, **tensors)` (v is
    required unless the spec's value is another operand, `v = k`; `tensors`: params, inputs
    and declared operands by name); a block-sparse
    kernel (compiled with block_sparse=True) requires `block_mask`, others refuse it; it masks
    partial blocks with the spec's own mask and warns once when the block mask brings another
    mask_mod. Outputs are differentiable in q, k, v and every `param` that requires grad."""

    def __init__(self, src: Source, options: dict, frontend_ir: FrontendIR,
                 trail: list[tuple[str, IR]], launch_overrides: dict,
                 autotune: bool | None = None):
        super().__init__(src, options, frontend_ir, trail, autotune)
        assert isinstance(self.final_ir, AttentionKernel)
        self.kernel_ir: AttentionKernel = self.final_ir
        self._overrides = launch_overrides
        self.inputs = tuple(d.name for d in self.kernel_ir.inputs)
        self.block_sparse = self.kernel_ir.block_sparse
        self.packs_heads = packs_heads(self.kernel_ir)  # GQA heads may share programs
        # something around the score: called through attnc/runtime/around.py (a plain bool, so
        # torch.compile traces the plain path without reading the IR)
        self.around = not self.kernel_ir.around.plain
        self._op = _make_op(self)
        prepare_call_checks(self, src, frontend_ir)
        self._paged_facts = paging.prepare(self)  # what kernel.paged checks, read once
        # a block mask's mask_mod that is not this mask is ignored: warned about once
        self._spec_mask = getattr(frontend_ir, "mask", None)
        self._mask_mods_seen: dict[int, bool] = {}
        self._mask_mod_warned = False

    def __repr__(self) -> str:
        extra = f", inputs={list(self.inputs)}" if self.inputs else ""
        return f"attnc.Kernel({self.name!r}{extra})"

    # --- running ----------------------------------------------------------------------------
    def _backward(self, q, k, v, extras, out, lse, dout, dlse, block_lists, block_sizes, scale,
                  param_grads) -> list[torch.Tensor]:
        """dq, dk, dv, then the gradient of each param flagged in `param_grads`."""
        if self.kernel_ir.grad is None:
            raise RuntimeError(f"{self.name}: no backward: {self.kernel_ir.no_backward}")
        named = dict(zip(self.inputs, extras))
        wanted = [t for t, flag in zip(extras, param_grads) if flag]
        names = [d.name for d, flag in zip(self.kernel_ir.inputs, param_grads) if flag]
        grads = ParamGradients(self.kernel_ir, named, names, q.shape[0], q.shape[1],
                               q.shape[2], k.shape[2])

        def run(config, on_partial=(lambda *partial: None) if names else None):
            return launch_backward(
                self.module(), self.kernel_ir, q, k, v, named, out, lse, dout, dlse, scale,
                config, block_lists[:4], block_lists[4:],
                tuple(block_sizes) if block_sizes else None, on_partial=on_partial)
        config = self.backward_config(q, k, v, run)
        dq, dk, dv = run(config, grads.add if names else None)
        return [dq, dk, dv] + [grads.grads[n].to(t.dtype) for n, t in zip(names, wanted)]

    def config(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run=None) -> Config:
        """The forward's launch configuration for these operands. With `run` (config ->
        outputs) and tuning on (compile option `autotune`, else $ATTNC_AUTOTUNE), a cache
        without a tuned config for this (kernel, head dims, dtype, device) is tuned first."""
        def default():
            return default_config(q.shape[-1], v.shape[-1], q.dtype, q.device)
        return self._config("forward", q, k, v, run, default)

    def backward_config(self, q, k, v, run=None) -> Config:
        """The backward kernels' launch configuration (tuned like the forward's)."""
        def default():
            return backward_config(self.config(q, k, v), q.dtype, q.device)
        return self._config("backward", q, k, v, run, default)

    def _config(self, kind: str, q, k, v, run, default) -> Config:
        fixed = {k.upper() if k.startswith("block") else k: v
                 for k, v in self._overrides.items() if k != "kv_splits"}
        if kind == "backward":  # the options fixed apply to both backward kernels
            fixed = backward_overrides(fixed)
        # short queries (decoding) tune apart from long ones: rows per program differ
        kind += f"-m{min(pow2(q.shape[2]), 128)}"
        splits = {k: v for k, v in self._overrides.items() if k == "kv_splits"}

        def candidates():
            return autotune.candidates(kind, {**default(), **fixed}, q.shape[-1], v.shape[-1],
                                       q.dtype, q.device, fixed)
        cfg = self.resolve(kind, q, v, self._overrides, lambda: {**default(), **fixed},
                           candidates, run, (*q.shape, k.shape[1], k.shape[2], v.shape[-1]))
        return Config(**{**cfg, **splits})

    def __call__(self, q, k, v=None, *, scale=None, return_lse=False, block_mask=None,
                 **inputs):
        if self.around:
            if not isinstance(return_lse, bool):
                raise ValueError(f"{self.name}: return_lse must be True or False, got "
                                 f"{return_lse!r}")
            return around.call(self, q, k, v, scale, return_lse, block_mask, inputs)
        return self._call(q, k, v, scale, return_lse, block_mask, inputs)

    def paged(self, q, k_cache, v_cache, page_table, kv_lens, **options):
        """The forward over a paged KV cache (attnc/runtime/paged.py states the call):
        `kernel.paged(q, k_cache, v_cache, page_table, kv_lens, *, q_start=None,
        k_start=None, q_lens=None, scale=None, return_lse=False, prologues_applied=False,
        **tensors)`."""
        return paging.call(self, q, k_cache, v_cache, page_table, kv_lens, **options)

    def launch_forward(self, q, k, v, named, scale, config, block_lists, block_sizes,
                       around_args=None):
        """One forward launch with this kernel's module (GQA heads packed when allowed)."""
        go = launch_packed if self.packs_heads else launch
        return go(self.module(), q, k, v, named, scale, config, block_lists, block_sizes,
                  **({} if around_args is None else {"around": around_args}))

    def _call(self, q, k, v, scale, return_lse, block_mask, inputs: dict,
              own_mask_mod: bool = False):
        """The call, with the keywords as arguments. `own_mask_mod`: the block mask's
        mask_mod is this kernel's mask by construction (attnc.flex_attention traced it), so
        there is nothing to warn about."""
        if not isinstance(return_lse, bool):
            raise ValueError(f"{self.name}: return_lse must be True or False, got "
                             f"{return_lse!r}")
        extras = self._validate(q, k, v, scale, inputs)
        lists, sizes = self._block_lists(q, k, block_mask, own_mask_mod)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, lse = self._op(q, k, v, extras, lists, sizes, scale)
        return (out, lse) if return_lse else out

    def _block_lists(self, q, k, block_mask, own_mask_mod: bool = False
                     ) -> tuple[list[torch.Tensor], list[int]]:
        """The block mask's four lists broadcast to [B, H, ...], and its block sizes."""
        if not self.block_sparse:
            if block_mask is not None:
                raise ValueError(f"{self.name}: this kernel takes no block_mask; compile the spec "
                                 "with block_sparse=True to visit a block mask's key blocks")
            return [], []
        if block_mask is None:
            raise ValueError(f"{self.name}: a block-sparse kernel needs block_mask=")
        if not isinstance(block_mask, BlockMask):
            if not hasattr(block_mask, "kv_num_blocks"):
                raise ValueError(f"{self.name}: block_mask must be an attnc.BlockMask or a torch "
                                 f"BlockMask, got {type(block_mask).__name__}")
            block_mask = BlockMask.from_torch(block_mask)
        if not own_mask_mod:
            self._check_mask_mod(block_mask.mask_mod)
        B, H, M, _ = q.shape
        block_mask.check_call(self.name, B, H, M, k.shape[2], q.device)
        bq, bkv = block_mask.BLOCK_SIZE
        for name, size in (("query", bq), ("key", bkv)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"{self.name}: block_mask's {name} block size is {size}; "
                                 "kernels need a power of two >= 16")
        # the key lists drive the forward and dq kernels, the query lists the dk/dv kernel
        lists = [t.expand(B, H, *t.shape[2:]) for t in (
            block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices, block_mask.q_num_blocks, block_mask.q_indices,
            block_mask.full_q_num_blocks, block_mask.full_q_indices)]
        return lists, [bq, bkv]

    def _check_mask_mod(self, mask_mod) -> None:
        """Warn (once per kernel) when a block mask brings a mask_mod other than this spec's
        mask: the kernel masks partial blocks with its spec's mask only, so that mask_mod is
        ignored. A no-op mask_mod, or one that traces to the spec's mask, is not warned about."""
        # (not while torch.compile traces the call: tracing a mod is Python over sympy)
        if self._mask_mod_warned or mask_mod is None or torch.compiler.is_compiling():
            return
        key = id(mask_mod)
        if key not in self._mask_mods_seen:
            if len(self._mask_mods_seen) > 64:  # mods re-created per call: keep this bounded
                self._mask_mods_seen.clear()
            self._mask_mods_seen[key] = _traces_to(mask_mod, self._spec_mask)
        if self._mask_mods_seen[key]:
            return
        self._mask_mod_warned = True
        name = getattr(mask_mod, "__name__", type(mask_mod).__name__)
        warnings.warn(
            f"{self.name}: the block mask's mask_mod {name!r} is ignored: a kernel compiled "
            "with block_sparse=True uses the block mask's lists, and masks partial blocks with "
            "its spec's own mask (" + (str(self._spec_mask) if self._spec_mask is not None
                                        else "none") + "). Put the mask in the spec, or call "
            "attnc.flex_attention to apply a mask_mod. (Warned once per kernel.)",
            UserWarning, stacklevel=5)

    def _validate(self, q, k, v, scale, inputs) -> list[torch.Tensor]:
        return check_call(self, q, k, v, scale, inputs)


def prepare_call_checks(kernel, src: Source, frontend_ir: FrontendIR) -> None:
    """What `check_call` reads, computed once per kernel from its kernel IR (`inputs`,
    `loads`): the index-range checks, a library variant's call requirements
    (attnc.library.ENTRIES) and each input's shape as a plain function of (B, H, M, N) (the
    call path runs no sympy, so dynamo can trace it under torch.compile)."""
    kernel._checks = _index_checks(kernel.kernel_ir)
    kernel._requirements = call_checks(src.filename, src.text,
                                       getattr(frontend_ir, "options", ()), ("B", "H", "M", "N"))
    # a declared dim `d` (a gain's feature axis) is the head dim D of q
    kernel._shapes = [sympy.lambdify((S.B, S.H, S.M, S.N, S.D), list(d.dims), "math")
                      for d in kernel.kernel_ir.inputs]


def check_call(kernel, q, k, v, scale, inputs) -> list[torch.Tensor]:
    """The checks of a softmax-family call (this module's Kernel and the general cascades'
    CascadeKernel): operands, scale, the call requirements of a library variant, every param's
    and input's shape, device and kind, and the range of every load's index; returns the
    params and inputs in call order."""
    validate.operands(kernel.name, LAYOUT, q=q, k=k, v=v)
    B, H, M, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{kernel.name}: batch sizes differ: q {B}, k {k.shape[0]}, "
                         f"v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{kernel.name}: k and v must have the same number of heads, got "
                         f"{k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"{kernel.name}: q heads ({H}) must be a multiple of k/v heads "
                         f"({k.shape[1]}) for GQA/MQA")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{kernel.name}: k and v must have the same length, got {k.shape[2]} "
                         f"and {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"{kernel.name}: k head dim {k.shape[3]} differs from q head dim {D}")
    for name, d in (("q/k head dim D", D), ("v head dim Dv", v.shape[3])):
        if not 1 <= d <= 256:
            raise ValueError(f"{kernel.name}: {name} is {d}; supported 1..256")
    validate.scale(kernel.name, scale)
    validate.known(kernel.name, inputs, kernel.inputs)
    N = k.shape[2]
    for requirement in kernel._requirements:
        requirement.check(kernel.name, {"B": B, "H": H, "M": M, "N": N})
    extras = []
    for decl, shape_of in zip(kernel.kernel_ir.inputs, kernel._shapes):
        if decl.name not in inputs:
            raise ValueError(f"{kernel.name}: missing {decl.kind.value} {decl.name!r} "
                             f"(shape [{', '.join(map(str, decl.dims))}])")
        t = inputs[decl.name]
        validate.spec_tensor(kernel.name, decl, t, tuple(int(d) for d in shape_of(B, H, M, N, D)),
                             q.device)
        if decl.kind is TensorKind.INPUT and t.requires_grad:
            raise ValueError(f"{kernel.name}: {decl.name} is an input (ids, masks: read, never "
                             "differentiated) but requires grad; declare it `param` to learn "
                             "it, or pass it detached")
        extras.append(t.to(torch.uint8) if t.dtype == torch.bool else t)
    for load, dim, fn, extent, at_corners in kernel._checks:
        lo, hi = _index_range(fn, {"B": B, "H": H, "M": M, "N": N}, at_corners)
        size = int(extent(B, H, M, N))
        if min(M, N) > 0 and (lo < 0 or hi >= size):
            raise ValueError(
                f"{kernel.name}: index {dim} of {load.tensor} ({load.index[dim]}) ranges over "
                f"[{lo}, {hi}] for these shapes but the dimension has size {size}; clamp the "
                "index in the spec (e.g. clamp(x, 0, size - 1))")
    return extras


def _traces_to(mask_mod, mask) -> bool:
    """Whether `mask_mod` is a no-op or traces to exactly `mask` (None: no mask). A mod the
    tracer cannot read is not shown equal."""
    from attnc.frontends.flex import Captures, trace_mask_mod
    try:
        traced = trace_mask_mod(mask_mod, Captures())
    except Exception:  # any mod the tracer refuses: it cannot be the spec's mask
        return False
    return traced is sympy.true or (mask is not None and bool(traced == mask))


def _index_checks(k: AttentionKernel):
    """Index expressions monotone in each of b, h, m, n: their range is set by box corners."""
    checks = []
    decls = {d.name: d for d in k.inputs}
    for ld in k.loads:
        for dim, ix in enumerate(ld.index):
            ix = sympy.sympify(ix)
            corners = all(monotone(ix, s) is not None for s in (S.b, S.h, S.m, S.n))
            if corners or not (ix.has(S.m) or ix.has(S.n)):
                fn = sympy.lambdify((S.b, S.h, S.m, S.n, S.B, S.H, S.M, S.N), ix, "math")
                extent = sympy.lambdify((S.B, S.H, S.M, S.N), decls[ld.tensor].dims[dim], "math")
                checks.append((ld, dim, fn, extent, corners))
    return checks


def _index_range(fn, size: dict, corners: bool) -> tuple[int, int]:
    """Range of an index over the valid box: at the corners when it is monotone in every
    variable, else (it depends on b and h only) over every (b, h)."""
    if corners:
        points = itertools.product((0, size["B"] - 1), (0, size["H"] - 1), (0, size["M"] - 1),
                                   (0, size["N"] - 1))
    else:
        points = itertools.product(range(size["B"]), range(size["H"]), (0,), (0,))
    vals = [math.floor(fn(b, h, m, n, size["B"], size["H"], size["M"], size["N"]))
            for b, h, m, n in points]
    return min(vals), max(vals)


def _make_op(kernel: Kernel):
    """Register `attnc::<name>_<hash>` (forward) and `..._backward` once per process, with the
    backward as the forward's autograd formula; the backward op itself refuses to be
    differentiated (double backward)."""
    # One op per (kernel, launch options). It runs with the Kernel object registered last
    # under its name: an equal kernel compiled again (into another cache directory, say) must
    # use its own launch configurations, not the first object's.
    options = cache.digest(repr(sorted(kernel._overrides.items())), repr(kernel.autotune))
    name = f"attnc::{kernel.name}_{kernel.key[:12]}_{options[:8]}"
    with _LOCK:
        _KERNELS[name] = kernel
        if name in _OPS:
            return _OPS[name]

        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    extras: list[torch.Tensor], block_lists: list[torch.Tensor],
                    block_sizes: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
            kernel = _KERNELS[name]
            go = launch_packed if kernel.packs_heads else launch
            named = dict(zip(kernel.inputs, extras))

            def run(config):
                sizes = (block_sizes[0], block_sizes[1]) if block_sizes else None
                return go(kernel.module(), q, k, v, named, scale, config,
                          list(block_lists[:4]), sizes)
            return run(kernel.config(q, k, v, run))

        op = torch.library.custom_op(name, forward, mutates_args=())

        @op.register_fake
        def _(q, k, v, extras, block_lists, block_sizes, scale):
            B, H, M, _ = q.shape
            return (q.new_empty(B, H, M, v.shape[-1]),
                    q.new_empty(B, H, M, dtype=torch.float32))

        def backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          extras: list[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                          dout: torch.Tensor, dlse: torch.Tensor | None,
                          block_lists: list[torch.Tensor], block_sizes: list[int], scale: float,
                          param_grads: list[bool]) -> list[torch.Tensor]:
            return _KERNELS[name]._backward(q, k, v, list(extras), out, lse, dout, dlse,
                                            list(block_lists), block_sizes, scale,
                                            list(param_grads))

        bwd = torch.library.custom_op(f"{name}_backward", backward_impl, mutates_args=())

        @bwd.register_fake
        def _(q, k, v, extras, out, lse, dout, dlse, block_lists, block_sizes, scale,
              param_grads):
            return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + [
                torch.empty_like(t) for t, wanted in zip(extras, param_grads) if wanted]

        def refuse(ctx, *grads):
            raise RuntimeError(f"{kernel.name}: double backward (a gradient of attnc's gradient, "
                               "e.g. autograd.grad(..., create_graph=True) then backward again) "
                               "is not supported")

        bwd.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)

        def setup_context(ctx, inputs, output):
            q, k, v, extras, block_lists, block_sizes, scale = inputs
            ctx.save_for_backward(q, k, v, *output, *extras, *block_lists)
            ctx.counts = (len(extras), block_sizes, scale)
            ctx.param_grads = [d.kind is TensorKind.PARAM and t.requires_grad
                               for d, t in zip(kernel.kernel_ir.inputs, extras)]

        def backward(ctx, dout, dlse):
            q, k, v, out, lse, *rest = ctx.saved_tensors
            n, block_sizes, scale = ctx.counts
            grads = bwd(q, k, v, rest[:n], out, lse, dout, dlse, rest[n:], block_sizes, scale,
                        ctx.param_grads)
            params = iter(grads[3:])
            dextras = [next(params) if wanted else None for wanted in ctx.param_grads]
            lists = [None] * (len(rest) - n)
            # the structure must mirror the inputs': torch takes a list of ints as one leaf, but
            # an empty list as a list
            sizes: list | None = [] if not block_sizes else None
            return grads[0], grads[1], grads[2], dextras, lists, sizes, None

        op.register_autograd(backward, setup_context=setup_context)
        _OPS[name] = op
        return op


def launch_options(options: dict) -> dict:
    """Pop and check the launch options (tile sizes, warps, stages) from `options`."""
    launch_overrides = {k: options.pop(k) for k in LAUNCH_OPTIONS if k in options}
    for k, v in launch_overrides.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or (
                k.startswith("block") and (v < 16 or v & (v - 1))):
            raise ValueError(f"{k} must be " + ("a power of two >= 16" if k.startswith("block")
                                                else "a positive integer") + f", got {v!r}")
    return launch_overrides
