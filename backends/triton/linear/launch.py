"""Launch a linear block's generated kernels: the forward (chunked or recurrent) and the
generated recurrent backward, with the tile rules of the plan (BK, BV, BT) and the launch
configuration given (attnc.autotune resolves it). Values are bound to the kernels' parameters
by name (backends/triton/contract.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypedDict

import torch

from attnc.backends.eager.linear import internal_state, public_state, state_shape
from attnc.backends.triton import interpreting
from attnc.backends.triton.contract import Bind
from attnc.backends.triton.module import KernelModule
from attnc.expr.symbols import DK, DV, T
from attnc.ir.linear_kernel import CHUNK, SHORT_CHUNK, VALUE_TILE, WIDE_KEYS, Algorithm, ScanPlan


class LinearConfig(TypedDict):
    """A linear kernel's launch configuration."""

    BV: int  # value features per program
    num_warps: int
    num_stages: int


# A linear kernel's warps and stages when untuned: Triton's own defaults, as launched before
# tuning existed (the backward's core kernels start from these)
LINEAR_DEFAULT = {"num_warps": 4, "num_stages": 3}
# The forward kernels' untuned launch: 8 warps. Each program keeps a [BK, BV] fp32 state (64
# registers a thread at BK = 128, BV = 64 over 4 warps) beside its chunk tiles; over 4 warps
# every library kernel needs 255 registers and spills (16 to 1200 B at sm_90, D = 128), over 8
# none or almost none does (see `attnc inspect`).
FORWARD_DEFAULT = {"num_warps": 8, "num_stages": 3}


def tile(x: int) -> int:
    """A tile covering x features: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << max(0, (x - 1).bit_length()))


def chunk_tile(plan: ScanPlan, dk: int = 0) -> int:
    """BT: steps per chunk (see attnc.ir.linear_kernel)."""
    if plan.chunk_size is not None:
        return plan.chunk_size
    return SHORT_CHUNK if plan.diagonal or tile(dk) > WIDE_KEYS else CHUNK


def key_limited_tile(dk: int, dv: int) -> int:
    """BV for kernels that may split the value features: up to 64, 16 for wide keys."""
    return min(16 if tile(dk) > WIDE_KEYS else VALUE_TILE, tile(dv))


def value_tile(plan: ScanPlan, dv: int, dk: int = 0) -> int:
    """BV: value features per program; all of them when an expression sums over j."""
    return tile(dv) if plan.whole_values else key_limited_tile(dk, dv)


def value_widths(plan: ScanPlan, dk: int, dv: int) -> tuple[int, ...]:
    """The value tiles a forward kernel may be tuned over."""
    if plan.whole_values:
        return (tile(dv),)
    return tuple(w for w in (16, 32, 64) if w <= key_limited_tile(dk, dv))


def default_config(plan: ScanPlan, dk: int, dv: int) -> LinearConfig:
    """A forward kernel's untuned launch (recurrent and chunked alike)."""
    return {"BV": value_tile(plan, dv, dk), **FORWARD_DEFAULT}  # type: ignore[typeddict-item]


def _cu(cu, device) -> torch.Tensor:
    """cu_seqlens as int32, or a stand-in the kernels never read (VARLEN is off)."""
    return cu.to(torch.int32).to(device) if cu is not None else \
        torch.zeros(1, dtype=torch.int32, device=device)


def _tensors(plan: ScanPlan, tensors: Mapping[str, torch.Tensor]) -> dict[Bind, object]:
    out: dict[Bind, object] = {}
    for d in plan.scan.step_tensors:
        x = tensors[d.name]
        out[Bind("tensor", d.name)] = x
        out.update({Bind("stride", d.name, i): s for i, s in enumerate(x.stride())})
    return out


def _strides(names: str, *xs: torch.Tensor) -> dict[Bind, object]:
    """s<x>_b, s<x>_h, s<x>_t of each tensor."""
    return {Bind(f"s{n}_{a}"): s for n, x in zip(names.split(), xs)
            for a, s in zip("bht", x.stride()[:3])}


def _states(plan: ScanPlan, role: str, xs) -> dict[Bind, object]:
    return {Bind(role, s.name): x for s, x in zip(plan.scan.states, xs)}


def _roles(**values) -> dict[Bind, object]:
    return {Bind(name): v for name, v in values.items()}


def launch(mod: KernelModule, plan: ScanPlan, algorithm: Algorithm, q, k, v,
           tensors: Mapping[str, torch.Tensor], inits: list, scale: float, cu,
           config: LinearConfig):
    """Run a forward kernel: (o, final states as fp32 [N, H, I, J])."""
    scan = plan.scan
    B, H, Tn, dk = q.shape
    dv = v.shape[-1]
    N = B if cu is None else cu.numel() - 1
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    o = torch.empty(B, H, Tn, dv, dtype=v.dtype, device=v.device)
    shapes = [state_shape(s, N, H, dk, dv) for s in scan.states]
    finals = [torch.empty(sh, dtype=torch.float32, device=q.device) for sh in shapes]
    has_init = bool(inits)
    init_bufs = [internal_state(s, x.to(torch.float32)).expand(sh).contiguous()
                 for s, x, sh in zip(scan.states, inits, shapes)] if has_init else finals
    if N == 0 or H == 0:
        return o, finals
    constexprs = dict(HAS_INIT=has_init, STORE_FINAL=True, VARLEN=cu is not None, BK=tile(dk),
                      BV=config["BV"], IEEE=v.dtype == torch.float32, UPCAST=interpreting())
    if algorithm is Algorithm.CHUNKED:
        constexprs["BT"] = chunk_tile(plan, dk)
    values = {**_roles(q=q, k=k, v=v, o=o, cu_seqlens=_cu(cu, q.device), T=Tn, H=H, DK=dk,
                       DV=dv, scale=scale, **constexprs),
              **_strides("q k v o", q, k, v, o), **_tensors(plan, tensors),
              **_states(plan, "init", init_bufs), **_states(plan, "final", finals)}
    mod.launch(algorithm.value, values, {"sequences": N},
               {"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    return o, finals


# The generated recurrent backward holds the state, its adjoint and their step values for all of
# DK x DV in one program: at Triton's default 4 warps that spills kilobytes per thread (8.7 KB
# for flowformer at 128 x 128), at 8 warps about a seventh of it
RECURRENT_BACKWARD = {"num_warps": 8, "num_stages": 1}
SEGMENT = 64  # steps between the states the recurrent backward stores; it replays segments


def launch_recurrent_backward(mod: KernelModule, plan: ScanPlan, q, k, v,
                              tensors: Mapping[str, torch.Tensor], inits: list, scale: float,
                              cu, do, dfinals: list) -> list:
    """Gradients of (q, k, v, *tensors, *inits) from the generated `*_recurrent_bwd` kernel: one
    program per (sequence, head) holding all of DK x DV."""
    scan = plan.scan
    B, H, Tn, dk = q.shape
    dv = v.shape[-1]
    N = B if cu is None else cu.numel() - 1
    longest = Tn if cu is None else int((cu[1:] - cu[:-1]).max()) if N else 0
    BK, BV = tile(dk), tile(dv)
    nseg = max(1, math.ceil(longest / SEGMENT))
    dev = q.device
    decls = scan.step_tensors
    xs = {name: x.contiguous() for name, x in tensors.items()}

    def padded(s, x):  # a state [N, H, I, J] in fp32, padded to the tile [BK|1, BV|1]
        rows, cols = (BK if "i" in s.axes else 1), (BV if "j" in s.axes else 1)
        out = torch.zeros(N, H, rows, cols, device=dev)
        if x is not None:
            inner = internal_state(s, x.float())
            out[:, :, :inner.shape[2], :inner.shape[3]] = inner
        return out

    init = [padded(s, inits[n] if inits else None) for n, s in enumerate(scan.states)]
    dfin = [padded(s, None if d is None else public_state(s, d))
            for s, d in zip(scan.states, dfinals)]
    ck = [torch.zeros(N * H * nseg * x[0, 0].numel(), device=dev) for x in init]
    sc = [torch.zeros(N * H * SEGMENT * x[0, 0].numel(), device=dev) for x in init]
    dq, dk_ = (torch.zeros(B, H, Tn, dk, device=dev) for _ in range(2))
    dv_ = torch.zeros(B, H, Tn, dv, device=dev)
    dxs = {d.name: torch.zeros(xs[d.name].shape, device=dev) if T in d.dims else
           torch.zeros(N * H, BK, BV, device=dev) for d in decls}
    dinit = [torch.zeros_like(x) for x in init]
    if N and H:
        values = {**_roles(q=q, k=k, v=v, cu_seqlens=_cu(cu, dev), do=do, dq=dq, dk=dk_, dv=dv_,
                           T=Tn, H=H, DK=dk, DV=dv, scale=scale, NSEG=nseg,
                           HAS_INIT=bool(inits), VARLEN=cu is not None, BK=BK, BV=BV,
                           SEG=SEGMENT, IEEE=v.dtype == torch.float32, UPCAST=interpreting()),
                  **_strides("q k v do", q, k, v, do), **_tensors(plan, xs),
                  **_states(plan, "init", init), **_states(plan, "dfinal", dfin),
                  **_states(plan, "checkpoints", ck), **_states(plan, "scratch", sc),
                  **_states(plan, "dinit", dinit),
                  **{Bind("grad", name): g for name, g in dxs.items()}}
        mod.launch("recurrent_bwd", values, {"sequences": N}, RECURRENT_BACKWARD)
    grads = [dq.to(q.dtype), dk_.to(k.dtype), dv_.to(v.dtype)]
    for d in decls:
        x, g = tensors[d.name], dxs[d.name]
        if T not in d.dims:  # a param: per-program sums over its axes, then over programs
            axes = [a for a in d.dims if a in (DK, DV)]
            g = g.view(N, H, BK, BV)
            g = g[..., :dk, :dv] if axes == [DK, DV] else g[..., :dk, 0] if axes == [DK] \
                else g[..., 0, :dv] if axes == [DV] else g[..., 0, 0]
            g = g.sum(0) if len(x.shape) == len(g.shape) - 1 else g.sum(0, keepdim=True) \
                if x.shape[0] != N else g
        grads.append(g.reshape(x.shape).to(x.dtype))
    if inits:
        grads += [public_state(s, g[:, :, :(dk if "i" in s.axes else 1),
                                    :(dv if "j" in s.axes else 1)])
                  for s, g in zip(scan.states, dinit)]
    return grads
