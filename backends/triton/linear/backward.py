"""The backward of a chunked `linear` scan: eager prologue and epilogue around fused chunked
core kernels (backends/triton/linear/core.py).

    prologue   key, value, log decay, beta and readout queries per state, from q, k, v and the
               inputs (elementwise per step, recomputed here with autograd on)
    core       per state and readout: `core_forward` (readouts, and the state entering every
               chunk), then `core_backward` (the adjoints, chunks in reverse)
    epilogue   the output from the readouts (autograd gives d readout and direct gradients)

The gradients of the prologue tensors then flow back to q, k, v, inputs and params through
autograd; the core's dS0 is the initial states' gradient. The core's backward is linear in
(d readout, d final state), so a state read by several readouts runs once per readout and the
results add up. Each core launch's value tile, warps and stages come from the caller's
`configure` (attnc.autotune tunes them when the kernel tunes, per core kernel, decay class,
chunk and head dims).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton

from attnc.backends.eager.linear import (chunk_inputs, environment, internal_state, public_state,
                                         state_shape)
from attnc.backends.triton import interpreting
from attnc.backends.triton.contract import Bind, GridRule, KernelContract, ParamType, arg
from attnc.backends.triton.linear import core
from attnc.backends.triton.linear.launch import LinearConfig, key_limited_tile, tile
from attnc.backends.triton.module import KernelModule
from attnc.ir.linear import Gate, Readout, StatePlan
from attnc.ir.linear_kernel import ScanPlan


def _value_tiles_grid(v) -> tuple[int, int, int]:
    """One program per (sequence, head, value tile)."""
    return v["sequences"], v["H"], triton.cdiv(v["V"], v["BV"])


def _contract(fn, role: str, doc: str) -> KernelContract:
    """A static kernel's contract, from its own signature: the sizes (T, H, K, V, NV_STRIDE)
    are integers, cu_seqlens and chunk_offsets int32 pointers, the dots' operands x, k, v in
    the data's dtype, every other tensor fp32."""
    constexprs = {name for name, ann in fn.fn.__annotations__.items() if "constexpr" in str(ann)}

    def kind(name: str) -> ParamType:
        if name in constexprs:
            return ParamType.CONSTEXPR
        if name in ("T", "H", "K", "V", "NV_STRIDE"):
            return ParamType.INT
        if name in ("x", "k", "v"):
            return ParamType.DATA
        return ParamType.I32_PTR if name in ("cu_seqlens", "chunk_offsets") else \
            ParamType.FP32_PTR
    return KernelContract(role, fn.__name__, tuple(arg(a, kind(a)) for a in fn.arg_names),
                          GridRule(_value_tiles_grid.__doc__ or "", _value_tiles_grid), doc)


CONTRACTS = (_contract(core.core_forward, "core_forward",
                       "the readouts and the state entering each chunk"),
             _contract(core.core_backward, "core_backward",
                       "the chunks in reverse: dx, dk, dv, d log decay, dbeta, dS0"))


CORE = KernelModule(CONTRACTS, core)

# configure(kind, key, value, default, widths, chunk, run) -> the launch configuration of one
# core launch: `kind` names it (core kernel, decay class, chunk), `widths` are the value tiles
# it may use, `run(config)` runs it (to tune).
Configure = Callable[[str, torch.Tensor, torch.Tensor, LinearConfig, tuple[int, ...], int,
                      Callable[[LinearConfig], tuple]], LinearConfig]


def untuned(kind, key, value, default, widths, chunk, run) -> LinearConfig:
    """A `Configure` that always takes the default."""
    return default


def positions(Tn: int, cu, device) -> torch.Tensor | None:
    """Each packed step's position within its own sequence (None: plain 0..T-1)."""
    if cu is None:
        return None
    lengths = (cu[1:] - cu[:-1]).to(device)
    starts = torch.repeat_interleave(cu[:-1].to(device), lengths)
    return torch.arange(Tn, device=device) - starts


@dataclass(frozen=True)
class CoreInputs:
    """One state's inputs to the core kernels, contiguous: the queries of its readouts
    (`readers`) and key [B, H, T, K], value [B, H, T, V], the log decay as [B, H, T, K] for a
    vector gate, [B, H, T] for a scalar one (absent without decay), beta [B, H, T] for delta
    rules; the initial state [N, H, K, V]; `h`, the state entering each segment of
    core.segment(chunk) steps (from the first core_forward)."""

    plan: StatePlan
    readers: tuple[Readout, ...]
    queries: tuple[torch.Tensor, ...]
    key: torch.Tensor
    value: torch.Tensor
    logd: torch.Tensor | None
    beta: torch.Tensor | None
    init: torch.Tensor
    ieee: bool  # exact fp32 products (fp32 data)
    h: torch.Tensor | None = None
    # what the kernels read: key, value and each query, detached, in the data's dtype (the
    # dots run on its tensor cores); the fields above stay fp32 for the prologue's autograd
    operands: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class Geometry:
    """Sizes of one core launch: chunks per sequence are counted from each one's length."""

    B: int
    H: int
    T: int
    K: int
    V: int
    N: int
    total: int  # stored states over all sequences (one per segment(chunk) steps)
    offsets: torch.Tensor  # each sequence's first stored state
    cu: torch.Tensor


def _geometry(x: CoreInputs, cu, chunk: int) -> Geometry:
    B, H, Tn, K = x.key.shape
    V = x.value.shape[-1]
    if cu is None:
        N, lengths = B, [Tn] * B
    else:
        N, lengths = cu.numel() - 1, (cu[1:] - cu[:-1]).tolist()
    counts = [math.ceil(n / core.segment(chunk)) for n in lengths]
    offsets = torch.tensor([0] + counts, device=x.key.device).cumsum(0).to(torch.int32)
    cu_arg = cu.to(torch.int32).to(x.key.device) if cu is not None else \
        torch.zeros(1, dtype=torch.int32, device=x.key.device)
    return Geometry(B, H, Tn, K, V, N, int(offsets[-1]), offsets, cu_arg)


def _common(x: CoreInputs, geo: Geometry, cu, chunk: int, config: LinearConfig) -> dict:
    """The values both core kernels take besides their tensors."""
    gate = x.plan.kind.gate
    dummy = torch.zeros(1, device=x.key.device)
    return {Bind("k"): x.operands[0], Bind("v"): x.operands[1],
            Bind("g"): x.logd.detach() if x.logd is not None else dummy,
            Bind("beta"): x.beta.detach() if x.beta is not None else dummy,
            Bind("cu_seqlens"): geo.cu, Bind("chunk_offsets"): geo.offsets,
            Bind("T"): geo.T, Bind("H"): geo.H, Bind("K"): geo.K, Bind("V"): geo.V,
            Bind("GATE"): int(gate), Bind("DELTA"): x.plan.kind.delta,
            Bind("VARLEN"): cu is not None, Bind("BT"): chunk, Bind("BK"): tile(geo.K),
            Bind("BV"): config["BV"], Bind("IEEE"): x.ieee, Bind("UPCAST"): interpreting()}


def _options(config: LinearConfig) -> dict[str, int]:
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


# The core kernels' untuned launch. Each program holds a [BK, BV] fp32 state (and, in the
# backward, its adjoint) beside [BT, BK] tiles: compiled for sm_90 at DK = DV = 128 in bf16,
# value tiles of 32 on 8 warps and 2 stages spill least in every decay class (GLA's kernels
# and the additive and scalar-decay forwards not at all), where 64 x 4 warps x 3 stages
# spilled 0.8-2.9 KB per thread in the backward.
CORE_VALUE_TILE = 32
CORE_WARPS, CORE_STAGES = 8, 2


def _config(name: str, x: CoreInputs, chunk: int, configure: Configure,
            run: Callable[[LinearConfig], tuple]) -> LinearConfig:
    K, V = x.key.shape[-1], x.value.shape[-1]
    default = LinearConfig(BV=min(CORE_VALUE_TILE, key_limited_tile(K, V)),
                           num_warps=CORE_WARPS, num_stages=CORE_STAGES)
    widths = tuple(w for w in (16, 32, 64) if w <= key_limited_tile(K, V))
    kind = f"{name}-{x.plan.kind.value}-bt{chunk}{'-ieee' if x.ieee else ''}"
    return configure(kind, x.key, x.value, default, widths, chunk, run)


def _core_forward(x: CoreInputs, query, cu, chunk: int, configure: Configure,
                  config: LinearConfig | None = None):
    """(readout [B, H, T, V], the state entering each chunk [chunks, H, K, V])."""
    if config is None:
        config = _config("core_forward", x, chunk, configure,
                         lambda cfg: _core_forward(x, query, cu, chunk, configure, cfg))
    geo = _geometry(x, cu, chunk)
    r = torch.empty(x.value.shape, device=x.key.device)
    h = torch.empty(geo.total, geo.H, geo.K, geo.V, device=x.key.device)
    final = torch.empty_like(x.init)
    if geo.N and geo.H:
        with torch.no_grad():
            values = {**_common(x, geo, cu, chunk, config), Bind("x"): query,
                      Bind("s0"): x.init, Bind("r"): r, Bind("h"): h, Bind("s_final"): final,
                      Bind("HAS_S0"): True}
            CORE.launch("core_forward", values, {"sequences": geo.N}, _options(config))
    return r, h


def _core_backward(x: CoreInputs, query, dr, d_final, cu, chunk: int, configure: Configure,
                   config: LinearConfig | None = None) -> dict[str, torch.Tensor]:
    if config is None:
        def run(cfg):
            got = _core_backward(x, query, dr, d_final, cu, chunk, configure, cfg)
            return tuple(got[name] for name in sorted(got))
        config = _config("core_backward", x, chunk, configure, run)
    geo = _geometry(x, cu, chunk)
    NV = math.ceil(geo.V / config["BV"])
    B, H, Tn, K, V = geo.B, geo.H, geo.T, geo.K, geo.V
    dev = x.key.device
    # every program writes its whole slice of each buffer (cu_seqlens covers all T steps), so
    # none needs zero-filling; d log decay and d beta exist only for the classes that have them
    dx = torch.empty(NV, B, H, Tn, K, device=dev)
    dkey = torch.empty_like(dx)
    dvalue = torch.empty(B, H, Tn, V, device=dev)
    unused = torch.empty(1, device=dev)
    dlogd = torch.empty((NV,) + tuple(x.logd.shape), device=dev) if x.logd is not None else unused
    dbeta = torch.empty(NV, B, H, Tn, device=dev) if x.beta is not None else unused
    ds0 = torch.empty_like(x.init)
    # the states entering each chunk of the segment being walked, replayed from its stored one
    subs = core.segment(chunk) // chunk
    scratch = torch.empty(geo.N, H, subs, K, V, device=dev) if subs > 1 else unused
    if not (geo.N and geo.H):  # no program runs: the gradients are empty or zero
        for t in (dx, dkey, dvalue, dlogd, dbeta, ds0):
            t.zero_()
    else:
        values = {**_common(x, geo, cu, chunk, config), Bind("x"): query,
                  Bind("h"): x.h, Bind("scratch"): scratch, Bind("dr"): dr,
                  Bind("ds_final"): d_final.contiguous(),
                  Bind("dx"): dx, Bind("dk"): dkey, Bind("dv"): dvalue, Bind("dg"): dlogd,
                  Bind("dbeta"): dbeta, Bind("ds0"): ds0, Bind("NV_STRIDE"): B * H * Tn}
        CORE.launch("core_backward", values, {"sequences": geo.N}, _options(config))
    got = {"dx": dx.sum(0), "dkey": dkey.sum(0), "dvalue": dvalue, "ds0": ds0}
    if x.logd is not None:
        got["dlogd"] = dlogd.sum(0)
    if x.beta is not None:
        got["dbeta"] = dbeta.sum(0)
    return got


def _core_inputs(scan, plan: StatePlan, ev, shape, like, init, dtype: torch.dtype,
                 originals: dict) -> CoreInputs:
    """The state's CoreInputs, from a whole-sequence environment (chunk_inputs), contiguous
    (these copies are what autograd differentiates the prologue at), and the kernels'
    operands in `dtype`, the data's: where the prologue hands a leaf through unchanged (a key
    that is k), the caller's own tensor from `originals` (leaf -> input), else a copy (none
    for fp32 data)."""
    x = chunk_inputs(scan, plan, ev, shape, like)
    gate = plan.kind.gate
    logd = None if gate is Gate.NONE else (x.logd if gate is Gate.VECTOR else x.logd[..., 0])
    key, value = x.key.contiguous(), x.value.contiguous()
    queries = tuple(q.contiguous() for q in x.queries)
    def operand(t: torch.Tensor) -> torch.Tensor:
        leaf, given = originals.get(t.data_ptr(), (None, None))
        if leaf is not None and (leaf.shape, leaf.stride()) == (t.shape, t.stride()) \
                and given.dtype == dtype:
            return given
        return t.detach().to(dtype).contiguous()
    operands = tuple(operand(t) for t in (key, value, *queries))
    return CoreInputs(plan, x.readers, queries, key, value,
                      None if logd is None else logd.contiguous(),
                      None if x.beta is None else x.beta.contiguous(), init,
                      dtype == torch.float32, operands=operands)


def backward(plan_: ScanPlan, q, k, v, tensors: dict, inits: list, scale: float, cu, do,
             dfinals: list, chunk: int, configure: Configure = untuned) -> list:
    """Gradients of (q, k, v, *tensors (in plan order), *inits), as the autograd Function
    returns them."""
    scan = plan_.scan
    names = [d.name for d in scan.step_tensors]
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, *tensors.values())]
    originals = {leaf.data_ptr(): (leaf, x.detach()) for leaf, x in zip(leaves[:3], (q, k, v))
                 if leaf.is_contiguous()}
    assert scan.schedule is not None and scan.schedule.output is not None
    with torch.enable_grad():
        lq, lk, lv, *lt = leaves
        ev = environment(scan, lq, lk, lv, dict(zip(names, lt)), scale,
                         positions=positions(q.shape[2], cu, q.device))
        B, H, Tn, dk = q.shape
        dv = v.shape[-1]
        N = B if cu is None else cu.numel() - 1
        readouts: dict = {}
        states = []
        for n, (s, plan) in enumerate(zip(scan.states, scan.schedule.states)):
            shape = (B, H, Tn) + state_shape(s, B, H, dk, dv)[2:]
            init = torch.zeros((N, H) + shape[3:], device=q.device) if not inits else \
                internal_state(s, inits[n].float()).expand((N, H) + shape[3:]).contiguous()
            x = _core_inputs(scan, plan, ev, shape, lq, init, v.dtype, originals)
            for reader, query in zip(x.readers, x.operands[2:]):
                rr, h = _core_forward(x, query, cu, chunk, configure)
                x = replace(x, h=h)  # the segments' states: the same whatever the readout
                readouts[reader.symbol] = rr.requires_grad_()
            if x.h is None:
                x = replace(x, h=_core_forward(x, torch.zeros_like(x.operands[0]), cu, chunk,
                                               configure)[1])
            states.append((s, x))
        ev.values.update({sym: r[..., None, :] for sym, r in readouts.items()})
        o = ev.floating(ev(scan.schedule.output)).expand(B, H, Tn, 1, dv)[..., 0, :]
        epi = torch.autograd.grad(o, list(readouts.values()) + leaves, do.float(),
                                  allow_unused=True, retain_graph=True)
        d_read = dict(zip(readouts, epi[:len(readouts)]))
        direct = epi[len(readouts):]
        outs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        d_inits: list[torch.Tensor] = []
        for n, (s, x) in enumerate(states):
            d_final = dfinals[n].float() if dfinals[n] is not None else None
            # a state no readout reads still gets the initial state's gradient (from d final)
            runs: list[tuple[Readout | None, torch.Tensor, torch.Tensor]] = (
                list(zip(x.readers, x.queries, x.operands[2:]))
                or [(None, x.key, torch.zeros_like(x.operands[0]))])
            ds0 = torch.zeros_like(x.init)
            for idx, (r, query, operand) in enumerate(runs):
                dr = d_read.get(r.symbol) if r is not None else None
                dr = torch.zeros(x.value.shape, device=q.device) if dr is None else dr
                dfin = d_final if idx == 0 and d_final is not None else \
                    torch.zeros_like(x.init)
                part = _core_backward(x, operand, dr.contiguous(), dfin, cu, chunk, configure)
                if r is not None and query.requires_grad:
                    outs.append(query)
                    grads.append(part["dx"])
                for name, t in (("key", x.key), ("value", x.value), ("logd", x.logd),
                                ("beta", x.beta)):
                    if t is not None and t.requires_grad:
                        outs.append(t)
                        grads.append(part[f"d{name}"])
                ds0 = ds0 + part["ds0"]
            d_inits.append(ds0)
        through = torch.autograd.grad(outs, leaves, grads, allow_unused=True) if outs else \
            [None] * len(leaves)
    result = []
    for x_, a, b in zip((q, k, v, *tensors.values()), direct, through):
        total = None if a is None and b is None else (0 if a is None else a) + \
            (0 if b is None else b)
        result.append(None if total is None else total.to(x_.dtype))
    if inits:
        result += [public_state(s, d) for s, d in zip(scan.states, d_inits)]
    return result

