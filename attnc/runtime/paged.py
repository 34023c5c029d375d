"""`Kernel.paged`: a softmax-family kernel's forward over a paged KV cache (vLLM's layout).

    out = kernel.paged(q, k_cache, v_cache, page_table, kv_lens, *, q_start=None, k_start=None,
                       q_lens=None, scale=None, return_lse=False, prologues_applied=False,
                       **tensors)

q [B, Hq, M, D]; k_cache [num_pages, page_size, Hkv, D], v_cache [num_pages, page_size, Hkv,
Dv] (None when the spec's value is a key operand, `v = k`); page_table [B, max_pages] int32
(key row r of sequence b at cache[page_table[b, r // page_size], r % page_size]); kv_lens,
k_start, q_start, q_lens [B] int32 (or None: k_start 0, q_lens M, q_start the last q_lens
positions, k_start + kv_lens - q_lens). Key row r has position k_start + r, query row i
q_start + i; the spec sees M = N = k_start + kv_len positions, and keys exist at positions
[max(k_start, 0), N) only. Query rows past q_lens, or at a position outside [0, N), are padding:
out 0, lse -inf. Returns out [B, Hq, M, Dv] (q's dtype) and with return_lse lse [B, Hq, M]
fp32. Declared operands come as keywords: query side [B, Hq, M, Dx], key side as caches
[num_pages, page_size, Hkv or 1, Dx] read through the same table.

Forward only: one launch of the paged module (backends/triton/softmax/paged.py), generated
from the kernel's IR on the first launch and cached under its own key (`PagedKernel`). The
launch packs a GQA group's query heads into one program's rows when the kernel allows it
(paged.packs: nothing it evaluates reads the query head) and the group's rows fit
launch.PACKED_ROWS, and reads one table entry per key tile (ONE_PAGE) when page_size is a
multiple of the key tile and every k_start is too: known without a device sync only for
k_start None (all 0) or a CPU tensor (read on the host); otherwise one entry per key. The
launch is one torch custom op shared by every kernel (`attnc::paged_forward`, the kernel named
by a string key), registered on import, and what the call checks is read from the IR when the
Kernel is built (`prepare`), so torch.compile(fullgraph=True) traces a call, even the first,
without a break. Launch options the kernel was compiled with (block_m, block_n, num_warps,
num_stages) apply; kv_splits and autotuning do not (one program per query tile and head).
Refused with ValueError:
gradients, prologues unless `prologues_applied=True` (the caller applied them to q and to the
keys it cached; the tensors only they read are then not needed), what unsupported() names, spec
tensors whose shape depends on M or N, and any malformed argument (checked on every call; the
range checks on the table and lengths cost one device sync, skipped while torch.compile traces).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import sympy
import torch

from attnc import cache
from attnc.backends.triton.contract import Bind, GeneratedModule
from attnc.backends.triton.softmax import paged as backend
from attnc.backends.triton.softmax.launch import (PACKED_ROWS, Config, _constexprs,
                                                  default_config, pow2)
from attnc.expr import symbols as S
from attnc.ir.around import Side
from attnc.runtime import validate
from attnc.runtime.base import CompiledKernel

_KERNELS: dict[str, object] = {}  # the Kernel each registry key runs (the latest built)
_LOCK = threading.Lock()
LAYOUT = {"q": "[B, Hq, M, D]", "k_cache": "[num_pages, page_size, Hkv, D]",
          "v_cache": "[num_pages, page_size, Hkv, Dv]"}


@dataclass(frozen=True)
class Facts:
    """What a paged call reads from the kernel IR, computed once when the Kernel is built (so
    the call path runs no sympy and torch.compile traces it): why it has no paged forward
    (None: it has one), its registry key, the prologues listed, the declared operands with
    their sides, the dots' (query, key) pairs, the value's operand, the spec tensors the
    kernel reads, those sized by M or N, and the index checks on b and h alone."""

    why: str | None
    key: str
    prologues: str
    operands: tuple[tuple[str, bool], ...]  # (name, query side)
    dots: tuple[tuple[str, str], ...]
    value: str
    loaded: frozenset[str]
    sized: frozenset[str]
    index_checks: tuple
    index_range: Callable  # attnc.runtime.softmax's, which imports this module


def prepare(kernel) -> Facts:
    """The Facts of a softmax Kernel (attnc/runtime/softmax.py builds them with the kernel)."""
    from attnc.runtime.softmax import _index_range
    ir = kernel.kernel_ir
    a = ir.around
    # a BlockGatherKernel runs a block-sparse kernel whose IR no longer shows the gather
    why = "gathered keys" if getattr(kernel, "gather", None) is not None else \
        backend.unsupported(ir)
    overrides = {key: value for key, value in kernel._overrides.items() if key != "kv_splits"}
    key = f"{kernel.name}_{kernel.key[:12]}_{cache.digest(repr(sorted(overrides.items())))[:8]}"
    with _LOCK:
        _KERNELS[key] = kernel
    loaded = frozenset(ld.tensor for ld in ir.loads)
    checks = tuple(c for c in kernel._checks if c[0].tensor in loaded and not (
        sympy.sympify(c[0].index[c[1]]).free_symbols & {S.m, S.n}))
    return Facts(why, key, "; ".join(str(p) for p in a.prologues),
                 tuple((o.name, o.side is Side.QUERY) for o in a.operands),
                 tuple((t.query, t.key) for t in a.dots), a.value, loaded,
                 frozenset(d.name for d in ir.inputs
                           if any(sympy.sympify(x).free_symbols & {S.M, S.N} for x in d.dims)),
                 checks, _index_range)


class PagedKernel(CompiledKernel):
    """The paged forward module of a softmax `Kernel`: same IR, its own generator and cache
    key; built on the first launch."""

    SALT = "paged"

    def __init__(self, kernel):
        super().__init__(kernel.spec, kernel._options, kernel._frontend_ir, kernel._trail,
                         kernel.autotune)
        self.kernel_ir = kernel.kernel_ir
        self.operands = tuple(o.name for o in self.kernel_ir.around.operands)
        self.packs = backend.packs(self.kernel_ir)
        # the launch options the kernel was compiled with (tiles, warps); key splits and
        # tuning do not apply here
        self.overrides = {key.upper() if key.startswith("block") else key: value
                          for key, value in kernel._overrides.items() if key != "kv_splits"}

    def __repr__(self) -> str:
        return f"attnc.PagedKernel({self.name!r})"

    def _codegen(self, final, header: str) -> GeneratedModule:
        return backend.generate(final, header=header)

    def _contracts(self, final, names: dict) -> tuple:
        return backend.contracts(final, names)


def companion(kernel) -> PagedKernel:
    """The kernel's PagedKernel, built on first use."""
    found = kernel.__dict__.get("_paged_kernel")
    if found is None:
        found = PagedKernel(kernel)
        kernel._paged_kernel = found
    return found


def call(kernel, q, k_cache, v_cache, page_table, kv_lens, *, q_start=None, k_start=None,
         q_lens=None, scale=None, return_lse=False, prologues_applied=False, **tensors):
    """kernel.paged (module docstring)."""
    name = kernel.name
    facts: Facts = kernel._paged_facts
    if facts.why is not None:
        raise ValueError(f"{name}: kernel.paged does not support a spec with {facts.why}; "
                         "call the kernel on contiguous K/V instead")
    for flag, value in (("return_lse", return_lse), ("prologues_applied", prologues_applied)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: {flag} must be True or False, got {value!r}")
    if facts.prologues and not prologues_applied:
        raise ValueError(f"{name}: kernel.paged does not run prologues ({facts.prologues}); "
                         "apply them to q at call time and to the keys as they are cached "
                         "(attnc.serving.apply_prologue), then pass prologues_applied=True")
    names = [n for n, _ in facts.operands]
    operands = {n: t for n, t in tensors.items() if n in names}
    spec_tensors = {n: t for n, t in tensors.items() if n not in names}
    value = _value_cache(name, facts.value, k_cache, v_cache, operands)
    validate.operands(name, LAYOUT, q=q, k_cache=k_cache, v_cache=value)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, value)):
        raise ValueError(f"{name}: kernel.paged is forward only, but q or a cache requires "
                         "grad; call the kernel on contiguous K/V for gradients "
                         "(kernel(q, k, v)), or run under torch.no_grad()")
    B, Hq, M, D = q.shape
    P, page_size, Hkv, Dk = k_cache.shape
    _check_caches(name, q, k_cache, value, facts.value != "v")
    extras = _check_tensors(kernel, facts, q, spec_tensors, names)
    _check_operands(name, facts, q, k_cache, operands)
    table, lens = _check_table(name, page_table, kv_lens, B, P, page_size, q.device)
    zero_starts = k_start is None
    k_start = _sequence_vector(name, "k_start", k_start, B, 0, q.device)
    # every k_start is a multiple of k_align (0: all are 0): the launch's choice of page reads
    k_align = 0 if zero_starts else _alignment(k_start)
    q_lens = _sequence_vector(name, "q_lens", q_lens, B, M, q.device)
    q_start = (k_start + lens - q_lens if q_start is None
               else _sequence_vector(name, "q_start", q_start, B, 0, q.device))
    if not torch.compiler.is_compiling():
        lengths = _check_ranges(name, table, lens, k_start, q_lens, B, M, P, page_size)
        for n in sorted(set(lengths)):  # a library variant's call requirements, per sequence
            for requirement in kernel._requirements:
                requirement.check(name, {"B": B, "H": Hq, "M": n, "N": n})
    validate.scale(name, scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = _OP(facts.key, q, k_cache, value, table, lens, k_start, q_start, q_lens, extras,
                   [operands[n] for n in names], scale, k_align)
    return (out, lse) if return_lse else out


def _alignment(k_start: torch.Tensor) -> int:
    """A number every entry of the (validated) k_start is a multiple of, known without a device
    sync: the gcd of a CPU tensor's values (0: all are 0), else 1. The launch reads one table
    entry per key tile when the tile size divides it; k_start is on q's device, so a GPU call's
    is never read here (k_start None is 0: the caller passes 0)."""
    if k_start.device.type == "cpu" and not torch.compiler.is_compiling():
        return math.gcd(*k_start.tolist())
    return 1


def _value_cache(name: str, alias: str, k_cache, v_cache, operands: dict):
    """The cache the weights average: v_cache, or the key cache the value aliases."""
    if alias == "v":
        if v_cache is None:
            raise ValueError(f"{name}: v_cache is required (the spec's value is v)")
        return v_cache
    if v_cache is not None:
        raise ValueError(f"{name}: this spec's value is {alias} (`v = {alias}`), so the call "
                         "takes no v_cache; pass v_cache=None")
    return k_cache if alias == "k" else operands.get(alias, k_cache)


def _check_caches(name: str, q, k_cache, v_cache, aliased: bool) -> None:
    B, Hq, M, D = q.shape
    P, page_size, Hkv, Dk = k_cache.shape
    if P == 0 or page_size == 0:
        raise ValueError(f"{name}: k_cache has shape {tuple(k_cache.shape)}; it needs at least "
                         "one page of at least one slot")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{name}: q heads ({Hq}) must be a multiple of k_cache heads ({Hkv}) "
                         "for GQA/MQA")
    if not aliased and tuple(v_cache.shape[:3]) != (P, page_size, Hkv):
        raise ValueError(f"{name}: v_cache has shape {tuple(v_cache.shape)}; its pages, slots "
                         f"and heads must match k_cache's {(P, page_size, Hkv)}")
    for what, d in (("q head dim D", D), ("k_cache head dim", Dk),
                    ("v_cache head dim Dv", v_cache.shape[3])):
        if not 1 <= d <= 256:
            raise ValueError(f"{name}: {what} is {d}; supported 1..256")


def _check_tensors(kernel, facts: Facts, q, tensors: dict, operands: list[str]) -> list:
    """The spec's params and inputs, in call order: those the kernel reads checked, those only
    prologues read (the caller applied them) replaced by a placeholder."""
    name = kernel.name
    validate.known(name, tensors, kernel.inputs + tuple(operands))
    B, Hq, M, D = q.shape
    extras = []
    for decl, shape_of in zip(kernel.kernel_ir.inputs, kernel._shapes):
        t = tensors.get(decl.name)
        if decl.name not in facts.loaded:
            extras.append(torch.zeros(1, device=q.device))
            continue
        if decl.name in facts.sized:
            raise ValueError(f"{name}: {decl.kind.value} {decl.name} has shape "
                             f"[{', '.join(map(str, decl.dims))}], which depends on M or N; "
                             "kernel.paged runs sequences of different lengths in one call, so "
                             "it takes only tensors indexed by b, h or sized by options")
        if t is None:
            raise ValueError(f"{name}: missing {decl.kind.value} {decl.name!r} "
                             f"(shape [{', '.join(map(str, decl.dims))}])")
        validate.spec_tensor(name, decl, t, tuple(int(d) for d in shape_of(B, Hq, 1, 1, D)),
                             q.device)
        extras.append(t.to(torch.uint8) if t.dtype == torch.bool else t)
    for load, dim, fn, extent, corners in facts.index_checks:  # the kernel checks m and n's
        lo, hi = facts.index_range(fn, {"B": B, "H": Hq, "M": 1, "N": 1}, corners)
        size = int(extent(B, Hq, 1, 1))
        if B * Hq and (lo < 0 or hi >= size):
            raise ValueError(f"{name}: index {dim} of {load.tensor} ({load.index[dim]}) ranges "
                             f"over [{lo}, {hi}] but the dimension has size {size}")
    return [t.detach() for t in extras]


def _check_operands(name: str, facts: Facts, q, k_cache, operands: dict) -> None:
    """Declared operands: query side [B, Hq, M, Dx] like q, key side caches [num_pages,
    page_size, Hkv or 1, Dx] like k_cache; of q's dtype and device; the dots' head dims
    equal."""
    B, Hq, M, D = q.shape
    P, page_size, Hkv, _ = k_cache.shape
    dims = {"q": D, "k": k_cache.shape[3]}
    for op, query in facts.operands:
        t = operands.get(op)
        layout = "[B, Hq, M, Dx]" if query else "[num_pages, page_size, Hkv or 1, Dx]"
        if t is None:
            raise ValueError(f"{name}: missing operand {op!r} {layout}")
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: operand {op} must be a 4-D tensor {layout}")
        ok = (tuple(t.shape[:3]) == (B, Hq, M) if query
              else tuple(t.shape[:2]) == (P, page_size) and t.shape[2] in (1, Hkv))
        if not ok:
            raise ValueError(f"{name}: operand {op} has shape {tuple(t.shape)}, expected "
                             f"{layout} with B={B}, Hq={Hq}, M={M}, num_pages={P}, "
                             f"page_size={page_size}, Hkv={Hkv}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: operand {op} is {t.dtype} on {t.device}; operands "
                             f"share q's dtype and device ({q.dtype}, {q.device})")
        if not 1 <= t.shape[3] <= 256:
            raise ValueError(f"{name}: operand {op} has head dim {t.shape[3]}; supported "
                             "1..256")
        dims[op] = t.shape[3]
    for query_op, key_op in facts.dots:
        if dims[query_op] != dims[key_op]:
            raise ValueError(f"{name}: dot({query_op}, {key_op}): {key_op} has head dim "
                             f"{dims[key_op]}, {query_op} has {dims[query_op]}")


def _int_vector(name: str, what: str, t, B: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: {what} must be an int32 tensor [B], got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name}: {what} must be int32, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name}: {what} must have shape [B] = [{B}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: {what} is on {t.device}, q is on {device}")
    return t.contiguous()


def _sequence_vector(name: str, what: str, t, B: int, default: int, device) -> torch.Tensor:
    """k_start, q_start or q_lens as int32 [B]: None is `default` for every sequence."""
    if t is None:
        return torch.full((B,), default, dtype=torch.int32, device=device)
    return _int_vector(name, what, t, B, device)


def _check_table(name: str, table, lens, B: int, P: int, page_size: int, device):
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{name}: page_table must be an int32 tensor [B, max_pages], got "
                         f"{type(table).__name__}")
    if table.dtype != torch.int32:
        raise ValueError(f"{name}: page_table must be int32, got {table.dtype}")
    if table.dim() != 2:
        raise ValueError(f"{name}: page_table must be 2-D [B, max_pages], got shape "
                         f"{tuple(table.shape)}")
    if table.shape[0] != B:
        raise ValueError(f"{name}: page_table has {table.shape[0]} rows but q has batch size {B}")
    if table.device != device:
        raise ValueError(f"{name}: page_table is on {table.device}, q is on {device}")
    lens = _int_vector(name, "kv_lens", lens, B, device)
    # the kernel steps along a row of the table by 1
    return (table if table.stride(1) == 1 else table.contiguous()), lens


def _check_ranges(name: str, table, lens, k_start, q_lens, B: int, M: int, P: int,
                  page_size: int) -> list[int]:
    """The checks that read the values (one device sync for all of them); returns the sequence
    lengths N_b of the sequences with query rows."""
    if B == 0:
        return []
    max_pages = table.shape[1]
    used = torch.arange(max_pages, device=table.device)[None, :] < (
        (lens.long() + page_size - 1) // page_size)[:, None]
    bad = used & ((table < 0) | (table >= P))
    checks = torch.stack([(lens < 0).any(), (lens.long() > max_pages * page_size).any(),
                          (q_lens < 0).any(), (q_lens > M).any(), bad.any()]).long()
    sizes = torch.where(q_lens > 0, k_start.long() + lens.long(), -1)
    values = torch.cat([checks, sizes]).tolist()
    flags, lengths = values[:5], [n for n in values[5:] if n > 0]
    if flags[0]:
        raise ValueError(f"{name}: kv_lens has negative entries: {lens.tolist()}")
    if flags[1]:
        raise ValueError(f"{name}: kv_lens {lens.tolist()} reach beyond the page table: "
                         f"{max_pages} pages of {page_size} slots hold {max_pages * page_size} "
                         "rows per sequence")
    if flags[2] or flags[3]:
        raise ValueError(f"{name}: q_lens must be in [0, M] = [0, {M}], got {q_lens.tolist()}")
    if flags[4]:
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{name}: page_table[{b}, {j}] = {int(table[b, j])} is out of range: "
                         f"the cache has {P} pages (rows 0..kv_lens[b]-1 use the first "
                         f"ceil(kv_lens[b] / {page_size}) entries of a row)")
    return lengths


def _launch(pk: PagedKernel, q, k, v, table, lens, k_start, q_start, q_lens,
            extras: list[torch.Tensor], operands: list[torch.Tensor], scale: float, k_align: int):
    """One launch of the paged module; `k_align`: a number every k_start is a multiple of
    (`_alignment`)."""
    B, H, M, D = q.shape
    Dv = v.shape[3]
    out = torch.empty(B, H, M, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    if M == 0 or B * H == 0:
        return out, lse
    config = cast(Config, {**default_config(D, Dv, q.dtype, q.device), **pk.overrides})
    common = _constexprs(config, q, D, Dv, None)
    group, page_size = H // k.shape[2], k.shape[1]
    packed = pk.packs and group > 1 and group * M <= PACKED_ROWS
    flags: dict[str, object] = {"ONE_PAGE": (page_size % common["BLOCK_N"] == 0
                                             and k_align % common["BLOCK_N"] == 0)}
    if pk.packs:
        flags["PACKED"] = packed
    if packed:  # the query tile covers the group's rows, as _constexprs sizes it for M rows
        common["BLOCK_M"] = min(config["BLOCK_M"], pow2(group * M))
    values: dict[Bind, object] = {Bind(n): x for n, x in dict(
        Q=q, K=k, V=v, Out=out, Lse=lse, TABLE=table, KV_LENS=lens, K_START=k_start,
        Q_START=q_start, Q_LENS=q_lens, B=B, H=H, QROWS=M, D=D, DV=Dv, GROUP=group,
        page_size=page_size, scale=float(scale), SCALE_POS=bool(scale > 0),
        stride_tb=table.stride(0), **common, **flags).items()}
    for t, name, letters in ((q, "q", "bhmd"), (out, "o", "bhmd"), (k, "k", "pshd"),
                             (v, "v", "pshd")):
        values.update({Bind(f"stride_{name}{r}"): s for r, s in zip(letters, t.stride())})
    if v.shape[2] == 1:  # a value operand with one head shared by every K/V head
        values[Bind("stride_vh")] = 0
    for decl, t in zip(pk.kernel_ir.inputs, extras):
        values[Bind("tensor", decl.name)] = t
        values.update({Bind("stride", decl.name, i): (t.stride(i) if t.dim() > i else 0)
                       for i in range(len(decl.dims))})
    for name, t in zip(pk.operands, operands):
        strides = list(t.stride())
        if pk.kernel_ir.around.side(name) is Side.KEY and t.shape[2] == 1:
            strides[2] = 0  # one head shared by every K/V head (MLA's rope key)
        values[Bind("operand", name)] = t
        values.update({Bind("operand_stride", name, i): s for i, s in enumerate(strides)})
        values[Bind("operand_dim", name)] = t.shape[3]
        values[Bind("operand_block", name)] = pow2(t.shape[3])
    pk.module().launch("paged", values, None, {"num_warps": config["num_warps"],
                                               "num_stages": config["num_stages"]})
    return out, lse


def _forward(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             table: torch.Tensor, lens: torch.Tensor, k_start: torch.Tensor,
             q_start: torch.Tensor, q_lens: torch.Tensor, extras: list[torch.Tensor],
             operands: list[torch.Tensor], scale: float,
             k_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(companion(_KERNELS[key]), q, k, v, table, lens, k_start, q_start, q_lens,
                   list(extras), list(operands), scale, k_align)


# One op for every kernel (`key` names the Kernel), registered on import, so that a first call
# under torch.compile registers nothing and generates no code while it traces.
_OP = torch.library.custom_op("attnc::paged_forward", _forward, mutates_args=())


@_OP.register_fake
def _(key, q, k, v, table, lens, k_start, q_start, q_lens, extras, operands, scale, k_align):
    B, H, M, _ = q.shape
    return q.new_empty(B, H, M, v.shape[-1]), q.new_empty(B, H, M, dtype=torch.float32)
