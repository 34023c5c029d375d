"""Launch a generated attention kernel: the heuristic launch configuration (attnc.autotune
tunes from it), key splits for short queries and their merge, GQA head packing, the forward
and backward calls themselves. Every launch gathers its values by role and binds them to the
kernel's parameters by name (backends/triton/contract.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import sympy
import torch
import triton

from attnc.backends.triton import interpreting
from attnc.backends.triton.contract import Bind
from attnc.backends.triton.module import KernelModule
from attnc.backends.triton.softmax.backward import Q_LISTS, param_loads
from attnc.backends.triton.softmax.backward_around import GRADS, key_operands, query_operands
from attnc.backends.triton.softmax.forward import BLOCK_LISTS
from attnc.backends.triton.softmax.prologue_vjp import has_adjoint
from attnc.expr import symbols as S
from attnc.ir.around import RowKind, Side, row_values
from attnc.ir.kernel import AttentionKernel, LoadLevel


class Config(TypedDict, total=False):
    """A softmax kernel's launch configuration. The forward's: its tiles, warps and stages
    (and kv_splits). The backward's is one flat record for its two kernels: the dk/dv kernel's
    BLOCK_M (query tile), BLOCK_N (key tile), num_warps and num_stages, and the dq kernel's own
    DQ_BLOCK_M, DQ_BLOCK_N, dq_num_warps and dq_num_stages (`role_configs` splits it)."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    kv_splits: int  # the forward's key splits, when fixed by the compile option
    DQ_BLOCK_M: int
    DQ_BLOCK_N: int
    dq_num_warps: int
    dq_num_stages: int


# The dq kernel's keys in a backward config, by the name its own (dk/dv) counterpart has.
DQ_KEYS = {"BLOCK_M": "DQ_BLOCK_M", "BLOCK_N": "DQ_BLOCK_N", "num_warps": "dq_num_warps",
           "num_stages": "dq_num_stages"}


def pow2(x: int) -> int:
    """A tile covering x: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(x))


def default_config(D: int, Dv: int, dtype: torch.dtype, device: torch.device) -> Config:
    """Heuristic tile sizes, the default when tuning is off (and the tuner's first candidate):
    smaller tiles for wide heads and fp32, and the warps the query tile keeps busy."""
    bd, bdv = pow2(D), pow2(Dv)
    if device.type != "cuda":  # the interpreter: fewer, larger tiles are faster
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    wide = max(bd, bdv) > 128
    if dtype == torch.float32:
        bm, bn = (32, 32) if wide else (64, 32)
    else:
        bm, bn = (64, 32) if wide else (128, 64)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": _warps_for(bm),
            "num_stages": 2 if wide else 3}


def _constexprs(config: Config, q, D: int, Dv: int, block_sizes: tuple[int, int] | None
                ) -> dict[str, Any]:
    """Tile sizes and the dtype path shared by the forward and backward kernels; a block mask's
    sizes bound the tiles (a tile never straddles a block of the mask), and so do short queries
    (a decoding step's one row needs no 128-row tile)."""
    bm, bn = min(config["BLOCK_M"], pow2(q.shape[2])), config["BLOCK_N"]
    sparse = {}
    if block_sizes is not None:
        bm, bn = min(bm, block_sizes[0]), min(bn, block_sizes[1])
        sparse = {"SPARSE_Q": block_sizes[0], "SPARSE_KV": block_sizes[1]}
    ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pow2(D), BLOCK_DV=pow2(Dv), IEEE=ieee,
                UPCAST=interpreting(), **sparse)


def _options(config: Config) -> dict[str, int]:
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def _roles(values: Mapping[str, object]) -> dict[Bind, object]:
    return {Bind(name): v for name, v in values.items()}


def _strides(letters: str, names: str, *tensors: torch.Tensor) -> dict[Bind, object]:
    """stride_<name><letter> of each tensor, e.g. stride_qb .. stride_qd of q."""
    return {Bind(f"stride_{name}{r}"): s for name, t in zip(names.split(), tensors)
            for r, s in zip(letters, t.stride()[-4:])}


def _operand_strides(q, k, v) -> dict[Bind, object]:
    return {**_strides("bhmd", "q", q), **_strides("bhnd", "k v", k, v)}


def _extras(extras: Mapping[str, torch.Tensor]) -> dict[Bind, object]:
    """The spec's params and inputs and their strides."""
    out: dict[Bind, object] = {}
    for name, t in extras.items():
        out[Bind("tensor", name)] = t
        out.update({Bind("stride", name, i): s for i, s in enumerate(t.stride())})
    return out


def _lists(spec, tensors) -> dict[Bind, object]:
    """A block mask's lists (`spec`: BLOCK_LISTS or Q_LISTS) and their strides."""
    out: dict[Bind, object] = {}
    for (name, short, dims), t in zip(spec, tensors):
        out[Bind(name)] = t
        out.update({Bind(f"{short}_s{r}"): s for r, s in zip(dims, t.stride())})
    return out


# A split must hold this many keys at least: below it the partial results cost more to merge
# than the extra programs gain.
MIN_SPLIT_KEYS = 512
MAX_SPLITS = 64


def kv_splits(programs: int, N: int, sms: int | None, fixed: int | None = None) -> int:
    """How many key splits the forward runs (flash-decoding): when (query tiles x B x H) leaves
    a GPU's `sms` idle -- a decoding step, a short prefill -- each program's keys are divided
    so about two programs run per SM. `fixed` (the `kv_splits` launch option) overrides; the
    interpreter (sms None) runs one split."""
    if fixed is not None:
        return max(1, fixed)
    if sms is None or programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), N // MIN_SPLIT_KEYS, MAX_SPLITS))


@dataclass(frozen=True)
class AroundArgs:
    """What a kernel with an Around (attnc.ir.around) takes besides q, k, v and the spec's
    tensors: the declared operands by spec name, the row values by key (fp32, any strides:
    prologue.py), the kv-head map [B, Hq] (int32) when the spec has one, and for a gated kernel
    whether to keep the ungated output (`save`, for the backward) and whether tiles whose gates
    are all 0 may skip their keys (`skip`: no gradient due and no lse returned)."""

    operands: Mapping[str, torch.Tensor]
    rows: Mapping[str, torch.Tensor]
    kv_map: torch.Tensor | None = None
    save: bool = False
    skip: bool = False


def _around_values(a: AroundArgs) -> dict[Bind, object]:
    out: dict[Bind, object] = {}
    for name, t in a.operands.items():
        out[Bind("operand", name)] = t
        out.update({Bind("operand_stride", name, i): s for i, s in enumerate(t.stride())})
        out[Bind("operand_dim", name)] = t.shape[3]
        out[Bind("operand_block", name)] = pow2(t.shape[3])
    for key, t in a.rows.items():
        out[Bind("row", key)] = t
        out.update({Bind("row_stride", key, i): s for i, s in enumerate(t.stride())})
    if a.kv_map is not None:
        out.update({Bind("KV_MAP"): a.kv_map, Bind("kvm_sb"): a.kv_map.stride(0),
                    Bind("kvm_sh"): a.kv_map.stride(1)})
    return out


def launch(mod: KernelModule, q, k, v, extras: Mapping[str, torch.Tensor], scale: float,
           config: Config, block_lists=(), block_sizes: tuple[int, int] | None = None,
           around: AroundArgs | None = None):
    """Run the forward; a block-sparse kernel also gets its block mask's four lists (already
    broadcast to [B, H, ...]) and the mask's (query, key) block sizes. With several key splits
    (kv_splits) each split writes fp32 partial results that are merged by their lse. A kernel
    with an Around gets `around` (v is then the value tensor, an operand when aliased); a gated
    one returns (out, lse, ungated out) -- the last None unless `around.save`."""
    out, lse, ungated = _launch(mod, q, k, v, extras, scale, config, block_lists, block_sizes,
                                around)
    return (out, lse) if around is None or "gate" not in around.rows else (out, lse, ungated)


def _launch(mod: KernelModule, q, k, v, extras, scale, config, block_lists, block_sizes, around):
    B, H, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, M, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    gate = around.rows.get("gate") if around is not None else None
    save = gate is not None and around is not None and around.save
    ungated = torch.empty_like(out) if save else None
    if M == 0 or B * H == 0:
        return out, lse, ungated
    common = _constexprs(config, q, D, Dv, block_sizes)
    tiles = triton.cdiv(M, common["BLOCK_M"])
    sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
           if q.device.type == "cuda" else None)
    splits = kv_splits(tiles * B * H, N, sms, config.get("kv_splits"))
    align = max(common["BLOCK_N"], common.get("SPARSE_KV", 0))
    per_split = triton.cdiv(triton.cdiv(max(N, 1), splits), align) * align
    splits = triton.cdiv(max(N, 1), per_split)
    o, l = out, lse
    if splits > 1:
        o = torch.empty(splits, B, H, M, Dv, dtype=torch.float32, device=q.device)
        l = torch.empty(splits, B, H, M, dtype=torch.float32, device=q.device)
    values = {**_roles(dict(Q=q, K=k, V=v, Out=o, Lse=l, B=B, H=H, M=M, N=N, D=D, DV=Dv,
                            GROUP=H // Hkv, scale=float(scale), SCALE_POS=bool(scale > 0),
                            KV_SPLIT=per_split,
                            stride_os=o.stride(0) if splits > 1 else 0, **common)),
              **_operand_strides(q, k, v), **_strides("bhmd", "o", o), **_extras(extras),
              **_lists(BLOCK_LISTS, block_lists)}
    if around is not None:
        values.update(_around_values(around))
        if gate is not None:
            # a split writes partial outputs: the gate is applied after their merge
            one = splits == 1
            values.update(_roles(dict(OutU=ungated if save and one else o, GATED=one,
                                      SAVE=save and one, SKIP=around.skip and one)))
    mod.launch("forward", values, {"splits": splits}, _options(config))
    if splits > 1:
        torch.logsumexp(l, 0, out=lse)
        # splits that saw no key have lse -inf and out 0; a row no split saw stays 0 / -inf
        weight = torch.exp(l - torch.where(torch.isfinite(lse), lse, 0.0))
        out.copy_((weight.unsqueeze(-1) * o).sum(0))
        if gate is not None:
            if ungated is not None:
                ungated.copy_(out)
            out.copy_(out * gate.unsqueeze(-1))
    return out, lse, ungated


# Query rows per program up to which a GQA group's heads are packed into one program's rows
PACKED_ROWS = 128


def packs_heads(ir: AttentionKernel) -> bool:
    """Whether the query heads of a GQA group may share programs, their rows stacked as one
    query tile: true when nothing the kernel evaluates depends on the query position, the
    query head or the query shape (m, h, M, H) -- attention over a cache (`full`, a window on
    the newest keys), not causal or per-head ALiBi -- and no block mask lists per head, and
    nothing around the score (operands and row values are laid out per head)."""
    if ir.block_sparse or not ir.around.plain:
        return False
    exprs = [ir.score, *([ir.mask] if ir.mask is not None else []),
             *(x for ld in ir.loads for x in ld.index),
             *(x for seg in ir.segments for x in (seg.lo, seg.hi, seg.full_lo, seg.full_hi))]
    banned = {S.m, S.h, S.M, S.H, S.m_lo, S.m_hi}
    return not any(sympy.sympify(x).free_symbols & banned for x in exprs)


def launch_packed(mod: KernelModule, q, k, v, *args, **kw):
    """`launch` with each GQA group's query heads stacked along the rows, so every key and
    value tile is loaded once per group rather than once per query head (decoding: one row per
    head). Only for kernels where `packs_heads` holds; same results as `launch`."""
    B, H, M, D = q.shape
    group = H // k.shape[1]
    if group == 1 or M * group > PACKED_ROWS:
        return launch(mod, q, k, v, *args, **kw)
    out, lse = launch(mod, q.reshape(B, k.shape[1], group * M, D), k, v, *args, **kw)
    return out.reshape(B, H, M, -1), lse.reshape(B, H, M)


def rows_per_warp_ok(rows: int, warps: int) -> bool:
    """Whether `warps` warps split a tile of `rows` rows without two of them computing the
    same rows: a kernel whose dots chain (the backward's s -> p -> ds -> dq) gets its warps laid
    along the rows (warpsPerCTA [warps, 1]), 16 rows each (a Hopper warpgroup: 4 warps, 64
    rows); with fewer rows the extra warps repeat the same tile."""
    return rows >= 16 * warps


def _warps_for(rows: int) -> int:
    """As many warps as a tile of `rows` rows keeps busy (rows_per_warp_ok), at most 8."""
    warps = 8
    while warps > 1 and not rows_per_warp_ok(rows, warps):
        warps //= 2
    return warps


# The backward's narrow tile: the dk/dv kernel's query step and the dq kernel's key step.
BACKWARD_STEP = 32


def backward_config(config: Config, dtype: torch.dtype, device: torch.device) -> Config:
    """Tiles for the backward kernels from the forward's `config`. Each kernel keeps one tall
    tile resident with its fp32 accumulators (the dk/dv kernel: BLOCK_N keys of k, v, dk, dv;
    the dq kernel: DQ_BLOCK_M rows of q, dO, dq), as tall as the forward's query tile (up to
    128; 32 in fp32), and streams the other operand BACKWARD_STEP rows at a time, so the
    recomputed [tall, step] score tiles stay small enough for no spills. Each gets the warps
    its tall tile keeps busy (no warpgroup repeating another's rows) and up to three stages
    (two in fp32)."""
    if device.type != "cuda":
        return _config(backward_overrides(_ints(config, DQ_KEYS)))
    fp32 = dtype == torch.float32
    tall = min(config["BLOCK_M"], 32 if fp32 else 128)
    step = min(BACKWARD_STEP, tall)
    stages = min(config["num_stages"], 2 if fp32 else 3)
    return {"BLOCK_M": step, "BLOCK_N": tall, "num_warps": _warps_for(tall),
            "num_stages": stages, "DQ_BLOCK_M": tall, "DQ_BLOCK_N": step,
            "dq_num_warps": _warps_for(tall), "dq_num_stages": stages}


def role_configs(config: Config) -> dict[str, Config]:
    """The launch configuration of each backward kernel ("dq", "dkdv") in a backward config:
    BLOCK_M, BLOCK_N, num_warps, num_stages each. A record without the dq keys (a forward
    config) gives both kernels the same."""
    flat = _ints(config, [*DQ_KEYS, *DQ_KEYS.values()])
    return {"dkdv": _config({key: flat[key] for key in DQ_KEYS}),
            "dq": _config({key: flat.get(dq_key, flat[key]) for key, dq_key in DQ_KEYS.items()})}


def _ints(config: Config, keys) -> dict[str, int]:
    """`config`'s values under `keys` (those it has), as a plain dict."""
    return {key: value for key, value in config.items() if key in keys and isinstance(value, int)}


def _config(values: Mapping[str, int]) -> Config:
    return cast(Config, dict(values))


def backward_overrides(fixed: Mapping[str, int]) -> dict[str, int]:
    """Launch options the user fixed (BLOCK_M, num_warps, ...) as a backward config's keys:
    each applies to both backward kernels."""
    return {**fixed, **{DQ_KEYS[key]: v for key, v in fixed.items() if key in DQ_KEYS}}


# Per-element param-gradient scratch (a param indexed by both m and n) is bounded to this many
# floats: beyond it the dq kernel runs on slabs of query tiles, each reduced before the next.
TILE_BUFFER_ELEMENTS = 1 << 26


def _param_scratch(ir: AttentionKernel, dparams: bool, BH: int, M: int, N: int, bm: int, device):
    """The param partial sums' buffers: `scratch(*shape)` (empty without `dparams`), the whole
    buffers by load name (per (b, h) and query tile, per row, per key), the loads summed per
    element, and the rows of the dq kernel's slabs (bounding the per-element buffers)."""
    def scratch(*shape):
        return torch.zeros(shape if dparams else (0,), dtype=torch.float32, device=device)

    shapes = {LoadLevel.PROGRAM: (BH, triton.cdiv(M, bm)), LoadLevel.ROW: (BH, M),
              LoadLevel.KEY: (BH, N)}
    whole = {ld.name: scratch(*shapes[ld.level]) for kernel in ("dq", "dkdv")
             for ld, _ in param_loads(ir, kernel) if ld.level is not LoadLevel.TILE}
    per_element = [ld.name for ld, _ in param_loads(ir, "dq") if ld.level is LoadLevel.TILE]
    slab = M
    if dparams and per_element:
        slab = min(M, max(bm, TILE_BUFFER_ELEMENTS // (BH * N * len(per_element)) // bm * bm))
    return scratch, whole, per_element, slab


def launch_backward(mod: KernelModule, ir: AttentionKernel, q, k, v,
                    extras: Mapping[str, torch.Tensor], out, lse, dout, dlse, scale: float,
                    config: Config, block_lists=(), q_lists=(),
                    block_sizes: tuple[int, int] | None = None,
                    on_partial: Callable[[str, torch.Tensor, int], None] | None = None):
    """Run the preprocess, dq and dk/dv kernels, each with its own tiles, warps and stages
    (`role_configs` of the backward `config`); returns dq, dk, dv. With `on_partial`, the
    param loads' partial sums are computed too and handed over as on_partial(load name, buffer,
    first row): per-element buffers once per slab of query rows, the others once at the end,
    always in the same order."""
    B, H, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if B * H == 0 or M == 0 or N == 0:
        return dq, dk, dv
    dparams = on_partial is not None
    roles = role_configs(config)
    tiles_of = {role: dict(_constexprs(cfg, q, D, Dv, block_sizes), DPARAMS=dparams)
                for role, cfg in roles.items()}
    bm = tiles_of["dq"]["BLOCK_M"]
    dout = dout.contiguous()
    delta = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    rows = B * H * M
    mod.launch("preprocess", _roles(dict(
        Out=out.contiguous(), DO=dout, DLse=dlse.contiguous() if dlse is not None else delta,
        Delta=delta, R=rows, DV=Dv, HAS_DLSE=dlse is not None, BLOCK_R=32, BLOCK_DV=pow2(Dv))))
    scratch, whole, per_element, slab = _param_scratch(ir, dparams, B * H, M, N, bm, q.device)
    shared = {**_roles(dict(Q=q, K=k, V=v, DO=dout, Lse=lse, Delta=delta, B=B, H=H, M=M, N=N,
                            D=D, DV=Dv, GROUP=H // Hkv, scale=float(scale))),
              **_operand_strides(q, k, v), **_strides("bhmd", "do", dout), **_extras(extras)}
    for first in range(0, M, slab):
        count = min(slab, M - first)
        tiles = {name: scratch(B * H, count, N) for name in per_element}
        buffers = {Bind("buffer", ld.name): tiles.get(ld.name, whole.get(ld.name))
                   for ld, _ in param_loads(ir, "dq")}
        mod.launch("dq", {**shared, **_roles(tiles_of["dq"]), **buffers,
                          **_roles(dict(DQ=dq, TILE_START=first // bm, SLAB=count)),
                          **_strides("bhmd", "dq", dq), **_lists(BLOCK_LISTS, block_lists)},
                   options=_options(roles["dq"]))
        if on_partial is not None:
            for name in tiles:
                on_partial(name, tiles[name], first)
    buffers = {Bind("buffer", ld.name): whole[ld.name] for ld, _ in param_loads(ir, "dkdv")}
    mod.launch("dkdv", {**shared, **_roles(tiles_of["dkdv"]), **buffers,
                        **_roles(dict(DK=dk, DVo=dv)), **_strides("bhnd", "dk dv", dk, dv),
                        **_lists(Q_LISTS, q_lists)},
               options=_options(roles["dkdv"]))
    if on_partial is not None:
        for name in whole:
            on_partial(name, whole[name], 0)
    return dq, dk, dv


def _head_lists(kv_map, B: int, H: int, Hkv: int, device) -> dict[str, torch.Tensor]:
    """The inverse of the kv-head map (None: h // (H / Hkv)) for the dk/dv kernel, int32:
    HEADS [B, H] the query heads sorted by the kv head they read (then by head), HSTART and
    HCOUNT [B, Hkv] where each kv head's run starts and how long it is."""
    heads = torch.arange(H, device=device)
    kv = (heads // (H // Hkv) if kv_map is None else kv_map.to(device=device, dtype=torch.int64)
          ).expand(B, H)
    order = torch.argsort(kv * H + heads, dim=1)
    counts = torch.zeros(B, Hkv, dtype=torch.int64, device=device).scatter_add_(
        1, kv, torch.ones_like(kv))
    return {"HEADS": order.to(torch.int32).contiguous(),
            "HSTART": (counts.cumsum(1) - counts).to(torch.int32).contiguous(),
            "HCOUNT": counts.to(torch.int32).contiguous()}


def _around_binds(a, tensors: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor]
                  ) -> dict[Bind, object]:
    """The declared operands (pointer, strides, head dim, tile width) and the row values
    (pointer, strides) as prologue.py's parameters bind them."""
    out: dict[Bind, object] = {}
    for o in a.operands:
        t = tensors[o.name]
        out.update({Bind("operand", o.name): t, Bind("operand_dim", o.name): t.shape[3],
                    Bind("operand_block", o.name): pow2(t.shape[3])})
        out.update({Bind("operand_stride", o.name, i): s for i, s in enumerate(t.stride())})
    for rv in row_values(a):
        t = rows[rv.key]
        out[Bind("row", rv.key)] = t
        out.update({Bind("row_stride", rv.key, i): s for i, s in enumerate(t.stride())})
    return out


def _grad_binds(names, grads: Mapping[str, torch.Tensor]) -> dict[Bind, object]:
    """The gradient outputs of operands `names` and their strides."""
    out: dict[Bind, object] = {}
    for x in names:
        g = grads[x]
        if x in GRADS:
            ptr, prefix, dims = GRADS[x]
            out[Bind(ptr)] = g
            out.update({Bind(f"{prefix}{r}"): s for r, s in zip(dims, g.stride())})
        else:
            out[Bind("operand_grad", x)] = g
            out.update({Bind("operand_grad_stride", x, i): s for i, s in enumerate(g.stride())})
    return out


def launch_backward_around(mod: KernelModule, ir: AttentionKernel,
                           tensors: Mapping[str, torch.Tensor],
                           extras: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor],
                           kv_map: torch.Tensor | None, out, lse, dout, dlse, scale: float,
                           config: Config,
                           on_partial: Callable[[str, torch.Tensor, int], None] | None = None,
                           block_lists=(), q_lists=(),
                           block_sizes: tuple[int, int] | None = None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The backward of a kernel with something around its score (backward_around.py); the
    interface is prologue_vjp.py's docstring: returns the gradients of `tensors` by name and
    the adjoints of the row values (factors, gains, the gate) by key."""
    a = ir.around
    q, k, value = tensors["q"], tensors["k"], tensors[a.value]
    B, H, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], value.shape[3]
    dev = q.device
    grads = {x: torch.zeros(t.shape, dtype=t.dtype, device=dev) for x, t in tensors.items()}
    adjoints = [rv for rv in row_values(a) if has_adjoint(rv)]
    row_grads = {rv.key: torch.zeros(rows[rv.key].shape, dtype=torch.float32, device=dev)
                 for rv in adjoints}
    if B * H == 0 or M == 0 or N == 0:
        return grads, row_grads
    dparams = on_partial is not None
    roles = role_configs(config)
    tiles_of = {role: dict(_constexprs(cfg, q, D, Dv, block_sizes), DPARAMS=dparams)
                for role, cfg in roles.items()}
    bm, bn = tiles_of["dq"]["BLOCK_M"], tiles_of["dkdv"]["BLOCK_N"]
    dout = dout.contiguous()
    gated = a.gate is not None
    # rowsum(dO * out) (with a gate, out is ungated: that sum is d gate, and delta is the gate
    # times it, less dlse)
    delta = torch.empty(B, H, M, dtype=torch.float32, device=dev)
    subtract = dlse is not None and not gated
    mod.launch("preprocess", _roles(dict(
        Out=out.contiguous(), DO=dout, DLse=dlse.contiguous() if subtract else delta,
        Delta=delta, R=B * H * M, DV=Dv, HAS_DLSE=subtract, BLOCK_R=32, BLOCK_DV=pow2(Dv))))
    if gated:
        row_grads["gate"] = delta
        delta = rows["gate"].to(torch.float32) * delta
        if dlse is not None:
            delta = delta - dlse
        delta = delta.contiguous()
    # row values' adjoint buffers: a factor's per row, a gain's per program (reduced below)
    slots = {Side.QUERY: (H, triton.cdiv(M, bm)), Side.KEY: (Hkv, triton.cdiv(N, bn))}
    buffers = {rv.key: (row_grads[rv.key] if rv.kind is RowKind.FACTOR else torch.zeros(
        B, *slots[rv.side], rows[rv.key].shape[-1], dtype=torch.float32, device=dev))
        for rv in adjoints if rv.kind is not RowKind.GATE}

    def adjoint_binds(side: Side) -> dict[Bind, object]:
        return {Bind("row_adjoint", rv.key): buffers[rv.key] for rv in adjoints
                if rv.side is side and rv.kind is not RowKind.GATE}

    scratch, whole, per_element, slab = _param_scratch(ir, dparams, B * H, M, N, bm, dev)
    shared = {**_roles(dict(Q=q, K=k, V=value, DO=dout, Lse=lse, Delta=delta, B=B, H=H, HKV=Hkv,
                            M=M, N=N, D=D, DV=Dv, scale=float(scale))),
              **_operand_strides(q, k, value), **_strides("bhmd", "do", dout), **_extras(extras),
              **_around_binds(a, tensors, rows)}
    kv = {}
    if kv_map is not None:
        m32 = kv_map.to(device=dev, dtype=torch.int32).expand(B, H)
        kv = _roles(dict(KV_MAP=m32, kvm_sb=m32.stride(0), kvm_sh=m32.stride(1)))
    for first in range(0, M, slab):
        count = min(slab, M - first)
        tiles = {name: scratch(B * H, count, N) for name in per_element}
        partial = {Bind("buffer", ld.name): tiles.get(ld.name, whole.get(ld.name))
                   for ld, _ in param_loads(ir, "dq")}
        mod.launch("dq", {**shared, **_roles(tiles_of["dq"]), **partial, **kv,
                          **_roles(dict(GROUP=H // Hkv, TILE_START=first // bm, SLAB=count)),
                          **_grad_binds(query_operands(a), grads), **adjoint_binds(Side.QUERY),
                          **_lists(BLOCK_LISTS, block_lists)},
                   options=_options(roles["dq"]))
        if on_partial is not None:
            for name in tiles:
                on_partial(name, tiles[name], first)
    partial = {Bind("buffer", ld.name): whole[ld.name] for ld, _ in param_loads(ir, "dkdv")}
    mod.launch("dkdv", {**shared, **_roles(tiles_of["dkdv"]), **partial,
                        **_roles(_head_lists(kv_map, B, H, Hkv, dev)),
                        **_grad_binds(key_operands(a), grads), **adjoint_binds(Side.KEY),
                        **_lists(Q_LISTS, q_lists)},
               options=_options(roles["dkdv"]))
    if on_partial is not None:
        for name in whole:
            on_partial(name, whole[name], 0)
    for rv in adjoints:
        if rv.kind is RowKind.GAIN:  # per-program partial sums, summed in a fixed order
            row_grads[rv.key] = buffers[rv.key].sum(2)
    return grads, row_grads
