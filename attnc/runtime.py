"""Compiled kernels as callables and torch ops.

`compile_spec` runs the pipeline, fetches (or generates and caches) the Triton source, and wraps
the kernel in a `torch.library.custom_op` with a fake implementation, so it works under
`torch.compile(fullgraph=True)`. A second op runs the backward kernels and is registered as the
first's autograd formula; param gradients leave the kernels as partial sums and are reduced here
(`ParamGradients`, deterministically). `Kernel.__call__` validates every argument and says which one is
wrong and what was expected.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import replace

import sympy
import torch

import attnc.backends.triton as triton_backend
from attnc import autotune, cache
from attnc import symbols as S
from attnc.kernel_ir import AttentionKernel
from attnc.linear_ir import LinearScan
from attnc.passes.mask_bounds import monotone
from attnc.pipeline import Source, format_ir, frontend, run_passes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAUNCH_OPTIONS = ("block_m", "block_n", "num_warps", "num_stages", "kv_splits")
_OPS: dict[str, object] = {}
_KERNELS: dict[str, "Kernel"] = {}
TRACED = "<traced mods>"  # the Source filename of kernels built from Python mods
_LOCK = threading.Lock()


class Kernel:
    """A compiled attention variant:
    `kernel(q, k, v, *, scale=None, return_lse=False, block_mask=None, **inputs)`; a block-sparse
    kernel (compiled with block_sparse=True) requires `block_mask`, others refuse it. Outputs
    are differentiable in q, k, v and every `param` that requires grad."""

    def __init__(self, src: Source, options: dict, frontend_ir, trail, key: str, source: str,
                 cache_hit: bool, launch_overrides: dict, autotune: bool | None = None):
        self.name = trail[-1][1].name
        self.spec = src
        self._options = options
        self.kernel_ir: AttentionKernel = trail[-1][1]
        self.key = key
        self.source = source
        self.cache_hit = cache_hit
        self._frontend_ir = frontend_ir
        self._trail = trail
        self._overrides = launch_overrides
        self.autotune = autotune  # None: follow $ATTNC_AUTOTUNE
        self._mod = None
        self._configs: dict = {}
        self.inputs = tuple(d.name for d in self.kernel_ir.inputs)
        self.block_sparse = self.kernel_ir.schedule.keys == "block_mask"
        from attnc.backends.triton.launcher import packs_heads
        self.packs_heads = packs_heads(self.kernel_ir)  # GQA heads may share programs
        self._op = _make_op(self)
        self._checks = _index_checks(self.kernel_ir)
        # Shapes as plain functions of (B, H, M, N): the call path runs no sympy, so dynamo can
        # trace it under torch.compile.
        self._shapes = [sympy.lambdify((S.B, S.H, S.M, S.N), list(d.dims), "math")
                        for d in self.kernel_ir.inputs]

    def __repr__(self) -> str:
        extra = f", inputs={list(self.inputs)}" if self.inputs else ""
        return f"attnc.Kernel({self.name!r}{extra})"

    def ir(self, stage: str = "kernel") -> str:
        """The IR after a stage (see attnc.pipeline.STAGES), printed."""
        if stage == "triton":
            return self.source
        if stage == "cascade" or (stage == "parse" and self.spec.filename == TRACED):
            return format_ir(self._frontend_ir)
        if stage == "kernel":
            return format_ir(self.kernel_ir)
        for name, ir in self._trail:
            if name == stage:
                return format_ir(ir)
        from attnc.pipeline import show
        return show(self.spec, stage, self._options)

    # --- running ----------------------------------------------------------------------------
    def _module(self):
        if self._mod is None:
            triton_backend.check_interpreter()
            self._mod = cache.import_kernel(self.key)
        return self._mod

    def _function(self):
        from attnc.backends.triton.codegen import kernel_names
        return getattr(self._module(), kernel_names(self.kernel_ir)[0])

    def _backward(self, q, k, v, extras, out, lse, dout, dlse, block_lists, block_sizes, scale,
                  param_grads) -> list[torch.Tensor]:
        """dq, dk, dv, then the gradient of each param flagged in `param_grads`."""
        from attnc.backends.triton.backward import backward_names
        from attnc.backends.triton.codegen import PRELUDE_PREPROCESS
        from attnc.backends.triton.launcher import launch_backward
        if self.kernel_ir.grad is None:
            raise RuntimeError(f"{self.name}: no backward: {self.kernel_ir.no_backward}")
        module = self._module()
        fns = {role: getattr(module, fn) for role, fn in backward_names(self.kernel_ir).items()}
        fns[PRELUDE_PREPROCESS] = getattr(module, PRELUDE_PREPROCESS)
        wanted = [t for t, flag in zip(extras, param_grads) if flag]
        names = [d.name for d, flag in zip(self.kernel_ir.inputs, param_grads) if flag]
        grads = ParamGradients(self.kernel_ir, dict(zip(self.inputs, extras)), names,
                               q.shape[0], q.shape[1], q.shape[2], k.shape[2])

        def run(config, on_partial=(lambda *partial: None) if names else None):
            return launch_backward(
                fns, self.kernel_ir, q, k, v, extras, out, lse, dout, dlse, scale, config,
                block_lists[:4], block_lists[4:], tuple(block_sizes) if block_sizes else None,
                on_partial=on_partial)
        config = self.backward_config(q, k, v, run)
        dq, dk, dv = run(config, grads.add if names else None)
        return [dq, dk, dv] + [grads.grads[n].to(t.dtype) for n, t in zip(names, wanted)]

    def config(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run=None) -> dict:
        """The forward's launch configuration for these operands. With `run` (config ->
        outputs) and tuning on (compile option `autotune`, else $ATTNC_AUTOTUNE), a cache
        without a tuned config for this (kernel, head dims, dtype, device) is tuned first."""
        from attnc.backends.triton.launcher import default_config

        def default():
            return default_config(q.shape[-1], v.shape[-1], q.dtype, q.device)
        return self._config("forward", q, k, v, run, default)

    @property
    def launch_records(self) -> list[dict]:
        """The launch configurations used so far in this process, each with how it was chosen
        ("source": default or tuned; a tuned one lists its "trials")."""
        return list(self._configs.values())

    def backward_config(self, q, k, v, run=None) -> dict:
        """The backward kernels' launch configuration (tuned like the forward's)."""
        from attnc.backends.triton.launcher import backward_config

        def default():
            return backward_config(self.config(q, k, v), q.dtype, q.device)
        return self._config("backward", q, k, v, run, default)

    def _config(self, kind: str, q, k, v, run, default) -> dict:
        from attnc.backends.triton.launcher import pow2
        # short queries (decoding) tune apart from long ones: rows per program differ
        kind += f"-m{min(pow2(q.shape[2]), 128)}"
        fixed = {k.upper() if k.startswith("block") else k: v
                 for k, v in self._overrides.items() if k != "kv_splits"}
        splits = {k: v for k, v in self._overrides.items() if k == "kv_splits"}

        def candidates():
            return autotune.candidates(kind, {**default(), **fixed}, q.shape[-1], v.shape[-1],
                                       q.dtype, q.device, fixed)
        cfg = autotune.resolve(self._configs, self.key, kind, q, v, self._overrides,
                               lambda: {**default(), **fixed}, candidates, run,
                               autotune.enabled(self.autotune),
                               (*q.shape, k.shape[1], k.shape[2], v.shape[-1]))
        return {**cfg, **splits}

    def __call__(self, q, k, v, *, scale=None, return_lse=False, block_mask=None, **inputs):
        extras = self._validate(q, k, v, scale, inputs)
        lists, sizes = self._block_lists(q, k, block_mask)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, lse = self._op(q, k, v, extras, lists, sizes, scale)
        return (out, lse) if return_lse else out

    def _block_lists(self, q, k, block_mask) -> tuple[list[torch.Tensor], list[int]]:
        """The block mask's four lists broadcast to [B, H, ...], and its block sizes."""
        if not self.block_sparse:
            if block_mask is not None:
                raise ValueError(f"{self.name}: this kernel takes no block_mask; compile the spec "
                                 "with block_sparse=True to visit a block mask's key blocks")
            return [], []
        from attnc.block_mask import BlockMask
        if block_mask is None:
            raise ValueError(f"{self.name}: a block-sparse kernel needs block_mask=")
        if not isinstance(block_mask, BlockMask):
            if not hasattr(block_mask, "kv_num_blocks"):
                raise ValueError(f"{self.name}: block_mask must be an attnc.BlockMask or a torch "
                                 f"BlockMask, got {type(block_mask).__name__}")
            block_mask = BlockMask.from_torch(block_mask)
        B, H, M, _ = q.shape
        N = k.shape[2]
        bq, bkv = block_mask.BLOCK_SIZE
        for name, size in (("query", bq), ("key", bkv)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"{self.name}: the block mask's {name} block size is {size}; "
                                 "kernels need a power of two >= 16")
        if tuple(block_mask.seq_lengths) != (M, N):
            raise ValueError(f"{self.name}: the block mask is for lengths "
                             f"{tuple(block_mask.seq_lengths)}, the call has (M, N) = ({M}, {N})")
        mb, mh, qblocks, kblocks = block_mask.kv_indices.shape
        if mb not in (1, B) or mh not in (1, H):
            raise ValueError(f"{self.name}: the block mask has B={mb}, H={mh}; expected 1 or "
                             f"the call's B={B}, H={H} (query heads)")
        if qblocks < -(-M // bq) or kblocks < -(-N // bkv):
            raise ValueError(f"{self.name}: the block mask has {qblocks} x {kblocks} blocks, too "
                             f"few for lengths ({M}, {N}) with blocks {(bq, bkv)}")
        if block_mask.device != q.device:
            raise ValueError(f"{self.name}: the block mask is on {block_mask.device}, q is on "
                             f"{q.device}; use block_mask.to(device)")
        # the key lists drive the forward and dq kernels, the query lists the dk/dv kernel
        lists = [t.expand(B, H, *t.shape[2:]) for t in (
            block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices, block_mask.q_num_blocks, block_mask.q_indices,
            block_mask.full_q_num_blocks, block_mask.full_q_indices)]
        return lists, [bq, bkv]

    def _validate(self, q, k, v, scale, inputs) -> list[torch.Tensor]:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{self.name}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{self.name}: {name} must be 4-D [B, H, {'M' if name == 'q' else 'N'}, "
                                 f"{'Dv' if name == 'v' else 'D'}], got shape {tuple(t.shape)}")
            if t.dtype not in DTYPES:
                raise ValueError(f"{self.name}: {name} has dtype {t.dtype}; expected float32, "
                                 "float16 or bfloat16")
            if t.device != q.device:
                raise ValueError(f"{self.name}: {name} is on {t.device}, q is on {q.device}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"{self.name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                             f"{v.dtype}")
        B, H, M, D = q.shape
        if k.shape[0] != B or v.shape[0] != B:
            raise ValueError(f"{self.name}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"{self.name}: k and v must have the same number of heads, got "
                             f"{k.shape[1]} and {v.shape[1]}")
        if k.shape[1] == 0 or H % k.shape[1]:
            raise ValueError(f"{self.name}: q heads ({H}) must be a multiple of k/v heads "
                             f"({k.shape[1]}) for GQA/MQA")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"{self.name}: k and v must have the same length, got {k.shape[2]} "
                             f"and {v.shape[2]}")
        if k.shape[3] != D:
            raise ValueError(f"{self.name}: k head dim {k.shape[3]} differs from q head dim {D}")
        for name, d in (("q/k head dim D", D), ("v head dim Dv", v.shape[3])):
            if not 1 <= d <= 256:
                raise ValueError(f"{self.name}: {name} is {d}; supported 1..256")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ValueError(f"{self.name}: scale must be a Python number or None, got {scale!r}")
        interp = triton_backend.interpreting()
        if q.device.type == "cpu" and not interp:
            raise ValueError(f"{self.name}: tensors are on the CPU but this process runs Triton "
                             "natively; use CUDA tensors, or set TRITON_INTERPRET=1 before "
                             "importing attnc to run on the CPU through Triton's interpreter")
        if q.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{self.name}: device {q.device} is not supported (cuda or cpu)")
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise ValueError(f"{self.name}: unexpected input {unknown[0]!r}; this kernel takes "
                             f"{', '.join(self.inputs) or 'no extra inputs'}")
        N = k.shape[2]
        extras = []
        for decl, shape_of in zip(self.kernel_ir.inputs, self._shapes):
            if decl.name not in inputs:
                raise ValueError(f"{self.name}: missing {decl.kind} {decl.name!r} "
                                 f"(shape [{', '.join(map(str, decl.dims))}])")
            t = inputs[decl.name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{self.name}: {decl.name} must be a torch.Tensor")
            want = tuple(int(d) for d in shape_of(B, H, M, N))
            if tuple(t.shape) != want:
                raise ValueError(f"{self.name}: {decl.name} has shape {tuple(t.shape)}, expected "
                                 f"{want} ([{', '.join(map(str, decl.dims))}])")
            if t.device != q.device:
                raise ValueError(f"{self.name}: {decl.name} is on {t.device}, q is on {q.device}")
            if decl.kind == "param" and not t.is_floating_point():
                raise ValueError(f"{self.name}: param {decl.name} must be floating point, got {t.dtype}")
            if t.is_complex():
                raise ValueError(f"{self.name}: {decl.name} must be real, got {t.dtype}")
            if decl.kind == "input" and t.requires_grad:
                raise ValueError(f"{self.name}: {decl.name} is an input (ids, masks: read, never "
                                 "differentiated) but requires grad; declare it `param` to learn "
                                 "it, or pass it detached")
            extras.append(t.to(torch.uint8) if t.dtype == torch.bool else t)
        for load, dim, fn, extent, at_corners in self._checks:
            lo, hi = _index_range(fn, {"B": B, "H": H, "M": M, "N": N}, at_corners)
            size = int(extent(B, H, M, N))
            if min(M, N) > 0 and (lo < 0 or hi >= size):
                raise ValueError(
                    f"{self.name}: index {dim} of {load.tensor} ({load.index[dim]}) ranges over "
                    f"[{lo}, {hi}] for these shapes but the dimension has size {size}; clamp the "
                    "index in the spec (e.g. clamp(x, 0, size - 1))")
        return extras


class ParamGradients:
    """Param gradients from the backward kernels' partial sums: `add` evaluates a load's index
    over the dims its buffer kept (rows from `first_row` for a per-element buffer) and
    scatter-sums the buffer into the param (deterministically, attnc.scatter)."""

    def __init__(self, ir: AttentionKernel, inputs: dict, names: list[str], B, H, M, N):
        self.loads = {ld.name: ld for ld in ir.loads}
        self.inputs, self.sizes = inputs, (B, H, M, N)
        self.grads = {n: torch.zeros(inputs[n].shape, dtype=torch.float64,
                                     device=inputs[n].device) for n in names}

    def add(self, load_name: str, buffer: torch.Tensor, first_row: int) -> None:
        from attnc.backends.reference import Evaluator, gather
        from attnc.scatter import scatter_sum
        ld = self.loads[load_name]
        if ld.tensor not in self.grads:
            return
        B, H, M, N = self.sizes
        dev = buffer.device
        ranks = {"program": (), "row": ("m",), "key": ("n",), "tile": ("m", "n")}[ld.level]
        positions = {"m": torch.arange(first_row, first_row + (
            buffer.shape[1] if ld.level == "tile" else M), device=dev),
            "n": torch.arange(N, device=dev)}
        values = (buffer.view(B, H, -1).sum(-1) if ld.level == "program"
                  else buffer.view(B, H, *(len(positions[r]) for r in ranks)))
        nd = 2 + len(ranks)
        syms = {S.B: B, S.H: H, S.M: M, S.N: N, S.m: 0, S.n: 0,
                S.b: torch.arange(B, device=dev).view([-1] + [1] * (nd - 1)),
                S.h: torch.arange(H, device=dev).view([1, -1] + [1] * (nd - 2))}
        for i, r in enumerate(ranks):
            syms[S.RANKS[r]] = positions[r].view([-1 if j == 2 + i else 1 for j in range(nd)])
        ev = Evaluator(syms, lambda acc: gather(self.inputs[str(acc.base)],
                                                [ev(x) for x in acc.indices]), values)
        self.grads[ld.tensor] += scatter_sum(values, [ev(x) for x in ld.index],
                                             self.grads[ld.tensor].shape)


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
    corners = points
    vals = [math.floor(fn(b, h, m, n, size["B"], size["H"], size["M"], size["N"]))
            for b, h, m, n in corners]
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
            from attnc.backends.triton.launcher import launch, launch_packed
            kernel = _KERNELS[name]
            go = launch_packed if kernel.packs_heads else launch

            def run(config):
                return go(kernel._function(), q, k, v, list(extras), scale, config,
                          list(block_lists[:4]), tuple(block_sizes) if block_sizes else None)
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
            ctx.param_grads = [d.kind == "param" and t.requires_grad
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
            sizes = [] if not block_sizes else None
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


def compile_spec(src: Source, options: dict) -> Kernel:
    """Compile DSL text; `block_sparse=True` makes a kernel that visits a block mask's blocks."""
    launch_overrides = launch_options(options)
    tune = options.pop("autotune", None)
    if tune is not None and not isinstance(tune, bool):
        raise ValueError(f"autotune must be True, False or None, got {tune!r}")
    block_sparse = options.pop("block_sparse", False)
    chunk_size = options.pop("chunk_size", None)
    if not isinstance(block_sparse, bool):
        raise ValueError(f"block_sparse must be True or False, got {block_sparse!r}")
    _, ir = frontend(src, options)
    if isinstance(ir, LinearScan):
        if launch_overrides or block_sparse:
            raise ValueError(f"{sorted(launch_overrides) or ['block_sparse']} do not apply to "
                             "a linear block (its launch option is chunk_size)")
        from attnc.linear_runtime import compile_linear
        return compile_linear(src, options, ir, chunk_size, tune)
    if chunk_size is not None:
        raise ValueError("chunk_size applies to linear blocks only")
    if block_sparse:
        ir = replace(ir, block_sparse=True)
    return compile_ir(ir, src, options, launch_overrides, tune)


def compile_ir(ir, src: Source, options: dict, launch_overrides: dict,
               tune: bool | None = None) -> Kernel:
    """Run the passes on frontend IR (an AttentionSpec or Cascade) and build the kernel."""
    from attnc.backends.triton.codegen import generate

    trail = run_passes(ir)
    kernel_ir = trail[-1][1]
    key = cache.digest(repr(kernel_ir), repr(sorted(cache.versions().items())), "triton")
    text = cache.read_kernel(key)
    hit = text is not None
    if not hit:
        header = (f"Generated by attnc from {src.filename} ({kernel_ir.name}); "
                  f"key {key[:16]}. Regenerate with `attnc compile`.")
        text = generate(kernel_ir, header=header)
        cache.write_kernel(key, text)
    return Kernel(src, options, ir, trail, key, text, hit, launch_overrides, tune)
