"""Compiled `linear` blocks as callables.

    kernel = attnc.load("gla")
    o, final = kernel(q, k, v, g=g, initial_state=S0, output_final_state=True, cu_seqlens=cu)

Core layout: q, k [B, H, T, D], v [B, H, T, DV], per-step inputs [B, H, T, ...]; with
`cu_seqlens` (N + 1 offsets) B is 1 and the N sequences are packed along T. States are
[N, H, DK, DV] (matrix), [N, H, DK] / [N, H, DV] (vector) or [N, H] (scalar); a spec with one
state takes and returns a tensor, one with several a dict by state name.

Forward runs a fused Triton kernel: the chunked one when tile_scan planned it, else the
recurrent one; `algorithm=` forces either. Backward, as the plan says (attnc/ir/linear_kernel):
the chunked core kernels between an eager prologue and epilogue, the generated recurrent
backward kernel, or autograd through the eager recurrence (backends/eager/linear.py),
checkpointed. Gradients reach q, k, v, every per-step input and param, and the initial state.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path

import torch

from attnc import autotune, cache
from attnc.backends.eager.linear import (apply_maps, environment, feature_dim, internal_state,
                                         public_state, recurrence, state_shape)
from attnc.backends.triton.linear import backward as chunked_backward
from attnc.backends.triton.linear import core
from attnc.backends.triton.linear.launch import (LinearConfig, chunk_tile, default_config, launch,
                                                 launch_recurrent_backward, tile, value_widths)
from attnc.expr import symbols as S
from attnc.expr.symbols import DK, DV, D, T
from attnc.ir.linear import LinearScan, UpdateClass
from attnc.ir.linear_kernel import Algorithm, ScanBackward, ScanPlan
from attnc.library import call_checks
from attnc.pipeline import IR, FrontendIR, Source
from attnc.runtime import validate
from attnc.runtime.base import CompiledKernel

LAYOUT = {"q": "[B, H, T, D]", "k": "[B, H, T, D]", "v": "[B, H, T, DV]"}
CHUNK_SIZES = (16, 32, 64, 128)


class LinearKernel(CompiledKernel):
    """A compiled state-update spec: `kernel(q, k, v, *, scale=None, initial_state=None,
    output_final_state=False, cu_seqlens=None, algorithm=None, **inputs)`."""

    def __init__(self, src: Source, options: dict, frontend_ir: FrontendIR,
                 trail: list[tuple[str, IR]], tune: bool | None = None):
        super().__init__(src, options, frontend_ir, trail, tune)
        assert isinstance(self.final_ir, ScanPlan)
        self.plan: ScanPlan = self.final_ir
        self.scan: LinearScan = self.plan.scan
        self.why_not_chunked = self.plan.why_not_chunked
        self.algorithm = self.plan.algorithm.value
        self.chunk_size = self.plan.chunk_size
        self.states = tuple(s.name for s in self.scan.states)
        self.inputs = tuple(d.name for d in self.scan.decls)
        # what a library variant requires of the call's sizes (attnc.library.ENTRIES)
        self._requirements = call_checks(src.filename, src.text, self.scan.options,
                                         ("B", "H", "T", "DK", "DV"))

    def __repr__(self) -> str:
        extra = f", inputs={list(self.inputs)}" if self.inputs else ""
        return f"attnc.LinearKernel({self.name!r}, {self.algorithm}{extra})"

    def config(self, algorithm: Algorithm, q, v, run=None) -> LinearConfig:
        """A forward kernel's launch options: BV (value features per program), num_warps and
        num_stages. With `run` and tuning on (compile option `autotune`, else
        $ATTNC_AUTOTUNE) they are tuned once per (kernel, chunk, head dims, dtype, device) and
        cached, like the softmax kernels' (attnc.autotune)."""
        dk, dv = q.shape[-1], v.shape[-1]
        kind = algorithm.value
        if algorithm is Algorithm.CHUNKED:
            kind += f"-bt{chunk_tile(self.plan, dk)}"

        def candidates():
            return autotune.linear_candidates(
                algorithm.value, default_config(self.plan, dk, dv),
                value_widths(self.plan, dk, dv), tile(dk), len(self.scan.states),
                chunk_tile(self.plan, dk), q.dtype, q.device)
        return self.resolve(kind, q, v, {}, lambda: default_config(self.plan, dk, dv),
                            candidates, run, tuple(q.shape) + (dv,))

    def configure_core(self, kind, key, value, default, widths, chunk, run) -> LinearConfig:
        """The chunked backward's `Configure`: its core launches resolved like the forward's,
        keyed by the core kernels' own identity."""
        K, V = key.shape[-1], value.shape[-1]

        def candidates():
            return autotune.linear_candidates("chunked", default, widths, tile(K), 1, chunk,
                                              torch.float32, key.device)
        return self.resolve(kind, key, value, {}, lambda: default, candidates, run,
                            tuple(key.shape) + (V,), key=_core_key())

    def _launch(self, algorithm: Algorithm, q, k, v, tensors: dict, inits, scale, cu):
        """The forward on the kernel's launch configuration: (o, final states)."""
        def run(cfg):
            o, finals = launch(self.module(), self.plan, algorithm, q, k, v, tensors, inits,
                               scale, cu, cfg)
            return (o, *finals)
        config = self.config(algorithm, q, v, run)
        return launch(self.module(), self.plan, algorithm, q, k, v, tensors, inits, scale, cu,
                      config)

    # --- calling ----------------------------------------------------------------------------
    def __call__(self, q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None, algorithm=None, **inputs):
        chosen = self._algorithm(algorithm)
        if not isinstance(output_final_state, bool):
            raise ValueError(f"{self.name}: output_final_state must be True or False, got "
                             f"{output_final_state!r}")
        tensors = self._validate(q, k, v, scale, inputs, cu_seqlens)
        if self.scan.maps:  # feature maps run in fp32; the kernel reads any dtype
            q, k = apply_maps(self.scan, q.float(), k.float(), inputs)
        dk, dv = q.shape[-1], v.shape[-1]
        scale = dk ** -0.5 if scale is None else float(scale)
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        inits = self._initial(initial_state, N, q.shape[1], dk, dv, q.device)
        backward = self.plan.backward
        wants_grad = torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v, *tensors.values(), *inits))
        if (chosen is Algorithm.CHUNKED or (backward is ScanBackward.CORE and wants_grad)) \
                and not _fake(q) and not self.gates_fit(q, k, v, tensors, scale, cu_seqlens):
            # gates the chunked form cannot hold in fp32: the recurrent kernel forward, and
            # autograd through the recurrence backward (no chunked core kernels)
            chosen, backward = Algorithm.RECURRENT, ScanBackward.EAGER
        outs = _apply(self, chosen, backward, scale, cu_seqlens, list(tensors), q, k, v,
                      *tensors.values(), *inits)
        o, finals = outs[0], outs[1:]
        if not output_final_state:
            return o
        public = {s.name: public_state(s, f) for s, f in zip(self.scan.states, finals)}
        return o, (public[self.states[0]] if len(self.states) == 1 else public)

    def gates_fit(self, q, k, v, tensors: dict, scale: float, cu=None) -> bool:
        """Whether the chunked form holds these gates in fp32. A diagonal decay's intra-chunk
        product splits exp(G_t - G_s) as exp(G_t) exp(-G_s), G the log decay summed from the
        chunk's start: exact only while every chunk's summed |log decay| stays within
        LOG_DECAY_LIMIT. A scalar decay forms exp(G_t - G_s) directly, but a -inf (or
        overflowing) sum gives inf - inf. One pass over the log decays and one host sync."""
        sch = self.scan.schedule
        plans = [p for p in (sch.states if sch is not None and sch.chunked else ())
                 if p.log_decay != 0]
        if not plans:
            return True
        Tn = q.shape[2]
        ev = environment(self.scan, q, k, v, tensors, scale,
                         positions=chunked_backward.positions(Tn, cu, q.device))
        bt = chunk_tile(self.plan, q.shape[-1])
        worst, limits = [], []
        for p in plans:
            x = torch.as_tensor(ev(p.log_decay), device=q.device).float()
            worst.append(_chunk_sum_bound(x, Tn, bt, cu is not None))
            limits.append(LOG_DECAY_LIMIT if p.kind is UpdateClass.DIAGONAL_DECAY
                          else math.inf)
        # isfinite also sends NaN gates to the recurrent kernel
        return all(math.isfinite(w) and w <= limit
                   for w, limit in zip(torch.stack(worst).tolist(), limits))

    def _algorithm(self, algorithm) -> Algorithm:
        if algorithm is None:
            return self.plan.algorithm
        if algorithm not in tuple(a.value for a in Algorithm):
            raise ValueError(f"algorithm must be one of {tuple(a.value for a in Algorithm)}, "
                             f"got {algorithm!r}")
        if algorithm == Algorithm.CHUNKED.value and not self.plan.chunked:
            raise ValueError(f"{self.name} has no chunked kernel: {self.why_not_chunked}")
        return Algorithm(algorithm)

    def _validate(self, q, k, v, scale, inputs, cu_seqlens) -> dict[str, torch.Tensor]:
        """The kernels' tensors by name (a feature map's weights are the prologue's)."""
        validate.operands(self.name, LAYOUT, q=q, k=k, v=v)
        if q.shape != k.shape:
            raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
        if v.shape[:3] != q.shape[:3]:
            raise ValueError(f"v must be [B, H, T, DV] with q's B, H, T {tuple(q.shape[:3])}, "
                             f"got {tuple(v.shape)}")
        validate.scale(self.name, scale)
        if cu_seqlens is not None:
            _check_cu_seqlens(cu_seqlens, q)
        validate.known(self.name, inputs, self.inputs)
        B, H, Tn, Dq = q.shape
        sizes = {S.B: B, S.H: H, T: Tn, DV: v.shape[-1], D: Dq}
        options = dict(self.scan.options)
        mapped = {p for mp in self.scan.maps for p in mp.params}
        # a feature map's weights first: they size DK, which sizes the other tensors
        for d in sorted(self.scan.decls, key=lambda d: d.name not in mapped):
            if d.name not in mapped and DK not in sizes:
                sizes[DK] = feature_dim(self.scan, q, inputs)
            if d.name not in inputs:
                raise ValueError(f"{self.name} needs the {d.kind.value} {d.name!r} "
                                 f"[{', '.join(map(str, d.dims))}]")
            x = inputs[d.name]
            want = tuple(int(dim.subs(sizes).subs(options)) for dim in d.dims)
            if not torch.is_tensor(x) or tuple(x.shape) != want:
                raise ValueError(f"{d.kind.value} {d.name} must have shape {want}, got "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            if x.device != q.device or not x.is_floating_point():
                raise ValueError(f"{d.name} must be a floating tensor on {q.device}")
        if self._requirements:
            call = {"B": B, "H": H, "T": Tn, "DK": feature_dim(self.scan, q, inputs),
                    "DV": v.shape[-1]}
            for requirement in self._requirements:
                requirement.check(self.name, call)
        return {d.name: inputs[d.name] for d in self.scan.step_tensors}

    def _initial(self, initial_state, N, H, dk, dv, device) -> list[torch.Tensor]:
        if initial_state is None:
            return []
        given = initial_state
        if torch.is_tensor(initial_state):
            if len(self.states) != 1:
                raise ValueError(f"{self.name} has states {list(self.states)}: pass "
                                 "initial_state as a dict")
            given = {self.states[0]: initial_state}
        if not isinstance(given, dict) or set(given) - set(self.states):
            raise ValueError(f"initial_state must be a tensor or a dict over {list(self.states)}")
        out = []
        for s in self.scan.states:
            shape = public_state(s, torch.empty(state_shape(s, N, H, dk, dv))).shape
            x = given.get(s.name)
            if x is None:
                x = torch.zeros(shape, device=device)
            if not torch.is_tensor(x) or not x.is_floating_point():
                raise ValueError(f"initial_state {s.name} must be a floating tensor "
                                 f"{tuple(shape)}, got "
                                 + (str(x.dtype) if torch.is_tensor(x) else type(x).__name__))
            if tuple(x.shape) != tuple(shape) or x.device != device:
                raise ValueError(f"initial state {s.name} must be {tuple(shape)} on {device}, "
                                 f"got {tuple(x.shape)} on {x.device}")
            out.append(x)
        return out


# The largest summed |log decay| over a chunk the diagonal-decay chunked form takes: exp(80)
# is 5.5e34, below fp32's 3.4e38 with room for the products it multiplies.
LOG_DECAY_LIMIT = 80.0


def _chunk_sum_bound(x: torch.Tensor, Tn: int, bt: int, packed: bool) -> torch.Tensor:
    """An upper bound of |x| summed over any chunk of bt steps, as a 0-d tensor. `x` is an
    element-form value [B|1, H|1, T|1, I|1, J|1] (or a number). Chunks start at multiples of bt;
    with packed sequences (cu_seqlens) they start at each sequence's start instead, so a chunk
    lies within two aligned ones and their sum bounds it."""
    mag = x.abs()
    if mag.numel() == 0:  # no steps
        return mag.new_zeros(())
    if mag.dim() != 5 or mag.shape[2] != Tn:  # the same value every step
        return mag.max() * min(bt, Tn)
    mag = torch.nn.functional.pad(mag, (0, 0, 0, 0, 0, (-Tn) % bt))
    sums = mag.unflatten(2, (-1, bt)).sum(3)
    if packed and sums.shape[2] > 1:
        sums = sums[:, :, 1:] + sums[:, :, :-1]
    return sums.max()


def _fake(x: torch.Tensor) -> bool:
    """A FakeTensor (shape propagation under torch.compile, FakeTensorMode): nothing runs."""
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(x)


@functools.lru_cache(maxsize=1)
def _core_key() -> str:
    """The core kernels' identity for the config cache: their source and the tool versions."""
    return cache.digest(Path(core.__file__).read_text(), repr(sorted(cache.versions().items())))


def _check_cu_seqlens(cu, q) -> None:
    if not torch.is_tensor(cu) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) \
            or cu.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of N + 1 offsets")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch is packed along T: B must be 1, got "
                         f"{q.shape[0]}")
    c = cu.tolist()
    if c[0] != 0 or c[-1] != q.shape[2] or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {q.shape[2]}, got {c}")


# --- autograd ----------------------------------------------------------------------------------
@torch.compiler.disable
def _apply(*args):
    """The kernels and their backward are opaque to torch.compile: a graph break (the backward
    runs autograd over its eager prologue and epilogue, which a custom op could not do)."""
    return _LinearFunction.apply(*args)


class _LinearFunction(torch.autograd.Function):
    """Forward: the fused kernel. Backward: as the plan says (ScanBackward)."""

    @staticmethod
    def forward(ctx, kernel: LinearKernel, algorithm: Algorithm, backward: ScanBackward, scale,
                cu, names: list[str], q, k, v, *rest):
        tensors, inits = dict(zip(names, rest[:len(names)])), list(rest[len(names):])
        if _fake(q):  # shapes only, as the softmax kernels' fake implementation gives them
            o, finals = _empty_outputs(kernel, q, v, cu)
        else:
            o, finals = kernel._launch(algorithm, q, k, v, tensors, inits, scale, cu)
        ctx.kernel, ctx.scale, ctx.cu, ctx.names = kernel, scale, cu, names
        ctx.backward = backward
        ctx.save_for_backward(q, k, v, *rest)
        return (o, *finals)

    @staticmethod
    def backward(ctx, do, *dfinals):
        q, k, v, *rest = ctx.saved_tensors
        kernel: LinearKernel = ctx.kernel
        n = len(ctx.names)
        tensors, inits = dict(zip(ctx.names, rest[:n])), list(rest[n:])
        plan = kernel.plan
        if _fake(do):
            got: list = [torch.empty_like(x) for x in (q, k, v, *rest)]
        elif ctx.backward is ScanBackward.CORE:  # fused chunked core kernels, eager pro/epilogue
            got = chunked_backward.backward(
                plan, q, k, v, tensors, inits, ctx.scale, ctx.cu, do, list(dfinals),
                chunk_tile(plan, q.shape[-1]), kernel.configure_core)
        elif ctx.backward is ScanBackward.RECURRENT:  # the generated fused backward
            got = launch_recurrent_backward(kernel.module(), plan, q, k, v, tensors, inits,
                                            ctx.scale, ctx.cu, do.contiguous(), list(dfinals))
        else:
            got = _through_recurrence(kernel, q, k, v, tensors, inits, ctx.scale, ctx.cu, do,
                                      dfinals)
        return (None, None, None, None, None, None, *got)


def _empty_outputs(kernel: LinearKernel, q, v, cu) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Uninitialized outputs of the launch's shapes and dtypes: o like v's, fp32 states."""
    B, H, Tn, dk = q.shape
    N = B if cu is None else cu.shape[0] - 1
    o = v.new_empty(B, H, Tn, v.shape[-1])
    return o, [q.new_empty(state_shape(s, N, H, dk, v.shape[-1]), dtype=torch.float32)
               for s in kernel.scan.states]


def _through_recurrence(kernel: LinearKernel, q, k, v, tensors, inits, scale, cu, do,
                        dfinals) -> list:
    """Autograd through the forward recomputed in eager torch (fp32, the scan's recurrence,
    checkpointed): the backward of scans sympy cannot differentiate."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, *tensors.values(), *inits)]
    lq, lk, lv, *lrest = leaves
    n = len(tensors)
    o, finals = _recompute(kernel, lq, lk, lv, dict(zip(tensors, lrest[:n])), lrest[n:],
                           scale, cu)
    outs, grads = [o], [do]
    for f, g in zip(finals, dfinals):
        if g is not None:
            outs.append(f)
            grads.append(g.to(f.dtype))
    got = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    return [None if g is None else g.to(x.dtype) for g, x in zip(got, (q, k, v, *tensors.values(),
                                                                     *inits))]


def _recompute(kernel: LinearKernel, q, k, v, tensors: dict, inits, scale, cu):
    """(o, finals as [N, H, I, J]) of the scan's recurrence, per packed sequence. q and k
    reach the kernels already feature-mapped, so the recurrence runs without the maps."""
    scan = replace(kernel.scan, maps=())
    with torch.enable_grad():
        work = torch.float32 if q.dtype != torch.float64 else torch.float64
        inputs = {n: x.to(work) for n, x in tensors.items()}
        qf, kf, vf = (x.to(work) for x in (q, k, v))
        B, H, Tn, dk = qf.shape
        spans = [(0, Tn)] if cu is None else list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
        outs: list[torch.Tensor] = []
        finals: list[list[torch.Tensor]] = [[] for _ in scan.states]
        for n, (a, b) in enumerate(spans):
            init = None
            if inits:
                init = {s.name: (x[n:n + 1] if cu is not None else x).to(work)
                        for s, x in zip(scan.states, inits)}
            sl = (lambda x: x) if cu is None else (lambda x: x[:, :, a:b])
            step_inputs = {d.name: (sl(inputs[d.name]) if T in d.dims else inputs[d.name])
                           for d in scan.step_tensors}
            o, fin = recurrence(scan, sl(qf), sl(kf), sl(vf), step_inputs, scale, init,
                                checkpoint=True)
            outs.append(o)
            for lst, s in zip(finals, scan.states):
                lst.append(internal_state(s, fin[s.name]).expand(
                    state_shape(s, fin[s.name].shape[0], H, dk, vf.shape[-1])))
        return torch.cat(outs, dim=2), [torch.cat(f, dim=0) for f in finals]


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size not in CHUNK_SIZES):
        raise ValueError(f"chunk_size must be 16, 32, 64 or 128, got {chunk_size!r}")
