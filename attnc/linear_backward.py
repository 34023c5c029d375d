"""The backward of a chunked `linear` scan: eager prologue and epilogue around fused chunked
core kernels (backends/triton/linear_core.py).

    prologue   key, value, log decay, beta and readout queries per state, from q, k, v and the
               inputs (elementwise per step, recomputed here with autograd on)
    core       per state and readout: `core_forward` (readouts, and the state entering every
               chunk), then `core_backward` (the adjoints, chunks in reverse)
    epilogue   the output from the readouts (autograd gives d readout and direct gradients)

The gradients of the prologue tensors then flow back to q, k, v, inputs and params through
autograd; the core's dS0 is the initial states' gradient. The core's backward is linear in
(d readout, d final state), so a state read by several readouts runs once per readout and the
results add up. The core kernels' value tile, warps and stages are tuned like the forward's
(attnc.autotune) when the kernel tunes, per (core kernel, decay class, chunk, head dims).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

import attnc.backends.triton as triton_backend
from attnc import autotune, cache
from attnc.backends import linear_torch as LT
from attnc.linear_ir import LinearScan, StatePlan
from attnc.linear_runtime import key_limited_tile, tile

_GATE = {"additive": 0, "delta_rule": 0, "scalar_decay": 1, "gated_delta_rule": 1,
         "diagonal_decay": 2}


def positions(Tn: int, cu, device) -> torch.Tensor | None:
    """Each packed step's position within its own sequence (None: plain 0..T-1)."""
    if cu is None:
        return None
    lengths = (cu[1:] - cu[:-1]).to(device)
    starts = torch.repeat_interleave(cu[:-1].to(device), lengths)
    return torch.arange(Tn, device=device) - starts


def backward(scan: LinearScan, q, k, v, tensors: list, inits: list, scale: float, cu, do,
             dfinals: list, chunk: int, configs: dict | None = None,
             tune: bool = False) -> list:
    """Gradients of (q, k, v, *tensors, *inits), as the autograd Function returns them.
    `configs` memoizes the core kernels' launch configurations (tuned when `tune`)."""
    configs = {} if configs is None else configs
    from attnc.backends.triton.linear_codegen import tensor_args

    names = [d.name for d in tensor_args(scan)]
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, *tensors)]
    with torch.enable_grad():
        lq, lk, lv, *lt = leaves
        inputs = dict(zip(names, lt))
        env = LT.environment(scan, lq, lk, lv, inputs, scale,
                             positions=positions(q.shape[2], cu, q.device))
        B, H, Tn, dk = q.shape
        dv = v.shape[-1]
        N = B if cu is None else cu.numel() - 1
        outs, grads, d_inits, readouts = [], [], [], {}
        plans = []
        for s, plan in zip(scan.states, scan.schedule.states):
            shape = (B, H, Tn) + LT.state_shape(s, B, H, dk, dv)[2:]
            pieces = _prologue(scan, plan, env, shape, lq)
            pieces["ieee"] = v.dtype == torch.float32  # exact fp32 products for fp32 data
            pieces["tuning"] = (configs, tune)
            plans.append((s, plan, pieces))
            init = inits[len(d_inits)] if inits else None
            init = torch.zeros((N, H) + shape[3:], device=q.device) if init is None else \
                LT.internal_state(s, init.float()).expand((N, H) + shape[3:]).contiguous()
            pieces["init"] = init
            d_inits.append(None)
            pieces["h"] = None  # the chunk-start states: the same whatever the readout
            for r, x in zip(pieces["readers"], pieces["queries"]):
                rr, pieces["h"] = _core_forward(plan, x, pieces, init, cu, chunk)
                readouts[r.symbol] = rr.requires_grad_()
            if pieces["h"] is None:
                pieces["h"] = _core_forward(plan, torch.zeros_like(pieces["key"]), pieces, init,
                                            cu, chunk)[1]
        env.update({sym: x[..., None, :] for sym, x in readouts.items()})
        o = LT._tensor(LT.evaluate(scan.schedule.output, env)).expand(B, H, Tn, 1, dv)[..., 0, :]
        epi = torch.autograd.grad(o, list(readouts.values()) + leaves, do.float(),
                                  allow_unused=True, retain_graph=True)
        d_read = dict(zip(readouts, epi[:len(readouts)]))
        direct = epi[len(readouts):]
        for n, (s, plan, pieces) in enumerate(plans):
            d_final = dfinals[n].float() if dfinals[n] is not None else None
            parts = []
            runs = list(zip(pieces["readers"], pieces["queries"])) or [(None, None)]
            for idx, (r, x) in enumerate(runs):
                x = torch.zeros_like(pieces["key"]) if x is None else x
                dr = d_read.get(r.symbol) if r is not None else None
                dr = torch.zeros(pieces["value"].shape, device=q.device) if dr is None else dr
                dfin = d_final if idx == 0 and d_final is not None else \
                    torch.zeros_like(pieces["init"])
                parts.append(_core_backward(plan, x, pieces, dr.contiguous(), dfin, cu, chunk))
            for idx, part in enumerate(parts):
                if pieces["readers"] and pieces["queries"][idx].requires_grad:
                    outs.append(pieces["queries"][idx])
                    grads.append(part["dx"])
                for name in ("key", "value", "logd", "beta"):
                    if name in pieces and pieces[name].requires_grad:
                        outs.append(pieces[name])
                        grads.append(part[f"d{name}"])
            d_inits[n] = sum(p["ds0"] for p in parts)
        through = torch.autograd.grad(outs, leaves, grads, allow_unused=True) if outs else \
            [None] * len(leaves)
    result = []
    for x, a, b in zip((q, k, v, *tensors), direct, through):
        total = None if a is None and b is None else (0 if a is None else a) + \
            (0 if b is None else b)
        result.append(None if total is None else total.to(x.dtype))
    if inits:
        result += [LT.public_state(s, d) for s, d in zip(scan.states, d_inits)]
    return result


def _prologue(scan, plan: StatePlan, env, shape, like) -> dict:
    """The core's inputs for one state (LT.chunk_inputs), contiguous: the log decay as
    [B, H, T, K] for a vector gate, [B, H, T] for a scalar one, absent without decay; beta only
    for delta rules."""
    x = LT.chunk_inputs(scan, plan, env, shape, like)
    pieces = {"readers": x["readers"], "key": x["key"].contiguous(),
              "value": x["value"].contiguous(),
              "queries": [q.contiguous() for q in x["queries"]]}
    gate = _GATE[plan.kind]
    if gate:
        pieces["logd"] = (x["logd"] if gate == 2 else x["logd"][..., 0]).contiguous()
    if x["beta"] is not None:
        pieces["beta"] = x["beta"].contiguous()
    return pieces


def _geometry(pieces, cu, chunk, BV: int):
    key, value = pieces["key"], pieces["value"]
    B, H, Tn, K = key.shape
    V = value.shape[-1]
    if cu is None:
        N, lengths = B, [Tn] * B
    else:
        N, lengths = cu.numel() - 1, (cu[1:] - cu[:-1]).tolist()
    counts = [math.ceil(n / chunk) for n in lengths]
    offsets = torch.tensor([0] + counts, device=key.device).cumsum(0).to(torch.int32)
    cu_arg = cu.to(torch.int32).to(key.device) if cu is not None else \
        torch.zeros(1, dtype=torch.int32, device=key.device)
    return dict(B=B, H=H, T=Tn, K=K, V=V, N=N, total=int(offsets[-1]), offsets=offsets,
                BK=tile(K), BV=BV, NV=math.ceil(V / BV), cu=cu_arg)


def _flags(plan, geo, cu, chunk, ieee: bool, config: dict):
    return dict(GATE=_GATE[plan.kind], DELTA=plan.kind in ("delta_rule", "gated_delta_rule"),
                VARLEN=cu is not None, BT=chunk, BK=geo["BK"], BV=geo["BV"], IEEE=ieee,
                UPCAST=triton_backend.interpreting(), num_warps=config["num_warps"],
                num_stages=config["num_stages"])


@functools.lru_cache(maxsize=1)
def _core_key() -> str:
    """The core kernels' identity for the config cache: their source and the tool versions."""
    from attnc.backends.triton import linear_core
    return cache.digest(Path(linear_core.__file__).read_text(),
                        repr(sorted(cache.versions().items())))


def _config(name: str, plan, pieces, cu, chunk, run) -> dict:
    """BV, num_warps, num_stages of one core kernel (`name`), tuned on run(config) when the
    kernel tunes; the default is the untuned launch's."""
    configs, tune = pieces["tuning"]
    key, value = pieces["key"], pieces["value"]
    K, V = key.shape[-1], value.shape[-1]

    def default():
        return {"BV": key_limited_tile(K, V), **autotune.LINEAR_DEFAULT}

    def candidates():
        widths = tuple(w for w in (16, 32, 64) if w <= key_limited_tile(K, V))
        return autotune.linear_candidates("chunked", default(), widths, tile(K), 1, chunk,
                                          torch.float32, key.device)
    kind = f"{name}-{plan.kind}-bt{chunk}{'-ieee' if pieces['ieee'] else ''}"
    return autotune.resolve(configs, _core_key(), kind, key, value, {}, default, candidates,
                            run, tune, tuple(key.shape) + (V,))


def _dummy(x):
    return torch.zeros(1, device=x.device)


def _core_forward(plan, x, pieces, init, cu, chunk, config=None):
    from attnc.backends.triton.linear_core import core_forward

    if config is None:
        config = _config("core_forward", plan, pieces, cu, chunk,
                         lambda cfg: _core_forward(plan, x, pieces, init, cu, chunk, cfg))
    geo = _geometry(pieces, cu, chunk, config["BV"])
    key = pieces["key"]
    r = torch.empty(pieces["value"].shape, device=key.device)
    h = torch.empty(geo["total"], geo["H"], geo["K"], geo["V"], device=key.device)
    final = torch.empty_like(init)
    if geo["N"] and geo["H"]:
        with torch.no_grad():
            core_forward[(geo["N"], geo["H"], geo["NV"])](
                x.detach(), key.detach(), pieces["value"].detach(),
                pieces["logd"].detach() if "logd" in pieces else _dummy(key),
                pieces["beta"].detach() if "beta" in pieces else _dummy(key), init, r, h, final,
                geo["cu"], geo["offsets"], geo["T"], geo["H"], geo["K"], geo["V"],
                HAS_S0=True, **_flags(plan, geo, cu, chunk, pieces["ieee"], config))
    return r, h


def _core_backward(plan, x, pieces, dr, d_final, cu, chunk, config=None) -> dict:
    from attnc.backends.triton.linear_core import core_backward

    if config is None:
        def run(cfg):
            got = _core_backward(plan, x, pieces, dr, d_final, cu, chunk, cfg)
            return tuple(got[name] for name in sorted(got))
        config = _config("core_backward", plan, pieces, cu, chunk, run)
    geo = _geometry(pieces, cu, chunk, config["BV"])
    key = pieces["key"]
    NV, B, H, Tn, K, V = geo["NV"], geo["B"], geo["H"], geo["T"], geo["K"], geo["V"]
    dx = torch.zeros(NV, B, H, Tn, K, device=key.device)
    dkey = torch.zeros_like(dx)
    dvalue = torch.zeros(B, H, Tn, V, device=key.device)
    dlogd = torch.zeros((NV,) + tuple(pieces["logd"].shape) if "logd" in pieces else
                        (NV, B, H, Tn), device=key.device)
    dbeta = torch.zeros(NV, B, H, Tn, device=key.device)
    ds0 = torch.zeros_like(pieces["init"])
    if geo["N"] and geo["H"]:
        core_backward[(geo["N"], H, NV)](
            x.detach(), key.detach(), pieces["value"].detach(),
            pieces["logd"].detach() if "logd" in pieces else _dummy(key),
            pieces["beta"].detach() if "beta" in pieces else _dummy(key), pieces["h"], dr,
            d_final.contiguous(), dx, dkey, dvalue, dlogd, dbeta, ds0, geo["cu"], geo["offsets"],
            Tn, H, K, V, B * H * Tn, **_flags(plan, geo, cu, chunk, pieces["ieee"], config))
    return {"dx": dx.sum(0), "dkey": dkey.sum(0), "dvalue": dvalue, "dlogd": dlogd.sum(0),
            "dbeta": dbeta.sum(0), "ds0": ds0}


# --- the recurrent kernels' backward ---------------------------------------------------------
SEGMENT = 64  # steps between stored states; a segment's steps are replayed into scratch


def recurrent_backward(kernel, q, k, v, tensors: list, inits: list, scale: float, cu, do,
                       dfinals: list) -> list:
    """Gradients of (q, k, v, *tensors, *inits) from the generated `*_recurrent_bwd` kernel: one
    program per (sequence, head) holding all of DK x DV."""
    from attnc.backends.triton.linear_codegen import tensor_args
    from attnc.linear_ir import DK, DV, T

    scan = kernel.scan
    B, H, Tn, dk = q.shape
    dv = v.shape[-1]
    N = B if cu is None else cu.numel() - 1
    longest = Tn if cu is None else int((cu[1:] - cu[:-1]).max()) if N else 0
    BK, BV = tile(dk), tile(dv)
    nseg = max(1, math.ceil(longest / SEGMENT))
    dev = q.device
    decls = tensor_args(scan)
    xs = [x.contiguous() for x in tensors]

    def padded(s, x):  # a state [N, H, I, J] in fp32, padded to the tile [BK|1, BV|1]
        rows, cols = (BK if "i" in s.axes else 1), (BV if "j" in s.axes else 1)
        out = torch.zeros(N, H, rows, cols, device=dev)
        if x is not None:
            inner = LT.internal_state(s, x.float())
            out[:, :, :inner.shape[2], :inner.shape[3]] = inner
        return out

    init = [padded(s, inits[n] if inits else None) for n, s in enumerate(scan.states)]
    dfin = [padded(s, None if d is None else LT.public_state(s, d))
            for s, d in zip(scan.states, dfinals)]
    ck = [torch.zeros(N * H * nseg * x[0, 0].numel(), device=dev) for x in init]
    sc = [torch.zeros(N * H * SEGMENT * x[0, 0].numel(), device=dev) for x in init]
    dq, dk_ = (torch.zeros(B, H, Tn, dk, device=dev) for _ in range(2))
    dv_ = torch.zeros(B, H, Tn, dv, device=dev)
    dxs = [torch.zeros(x.shape, device=dev) if T in d.dims else
           torch.zeros(N * H, BK, BV, device=dev) for d, x in zip(decls, xs)]
    dinit = [torch.zeros_like(x) for x in init]
    if N and H:
        strides = [s for x in (q, k, v, do) for s in x.stride()[:3]]
        strides += [s for x in xs for s in x.stride()]
        cu_arg = cu.to(torch.int32).to(dev) if cu is not None else \
            torch.zeros(1, dtype=torch.int32, device=dev)
        kernel._function("recurrent_bwd")[(N, H, 1)](
            q, k, v, *xs, *init, cu_arg, do, *dfin, *ck, *sc, dq, dk_, dv_, *dxs, *dinit,
            *strides, Tn, H, dk, dv, scale, nseg, HAS_INIT=bool(inits), VARLEN=cu is not None,
            BK=BK, BV=BV, SEG=SEGMENT, IEEE=v.dtype == torch.float32,
            UPCAST=triton_backend.interpreting())
    grads = [dq.to(q.dtype), dk_.to(k.dtype), dv_.to(v.dtype)]
    for d, x, g in zip(decls, tensors, dxs):
        if T not in d.dims:  # a param: per-program sums over its axes, then over programs
            axes = [a for a in d.dims if a in (DK, DV)]
            g = g.view(N, H, BK, BV)
            g = g[..., :dk, :dv] if axes == [DK, DV] else g[..., :dk, 0] if axes == [DK] \
                else g[..., 0, :dv] if axes == [DV] else g[..., 0, 0]
            g = g.sum(0) if len(x.shape) == len(g.shape) - 1 else g.sum(0, keepdim=True) \
                if x.shape[0] != N else g
        grads.append(g.reshape(x.shape).to(x.dtype))
    if inits:
        grads += [LT.public_state(s, g[:, :, :(dk if "i" in s.axes else 1),
                                       :(dv if "j" in s.axes else 1)])
                  for s, g in zip(scan.states, dinit)]
    return grads
