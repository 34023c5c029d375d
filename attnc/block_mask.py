"""Block masks: which key blocks each query block visits, FlexAttention's way.

A `BlockMask` holds, per (b, h, query block), the key blocks that are partly visible (the kernel
evaluates the mask there) and those that are wholly visible (no mask), as counts and index lists
with exactly the layout and ordering of `torch.nn.attention.flex_attention.BlockMask`; it converts
to and from torch's. It also offers the transpose, again as torch lays it out: per (b, h, key
block), the query blocks that see it partly or wholly, derived from the key lists on first use.
Block sizes are those of the mask; a kernel tiles within them.

`create_block_mask` traces the mask_mod into IR (`attnc.frontends.flex`) instead of evaluating it
on every (q, kv) pair:
  * when mask_bounds can bound it exactly (causal, windows, prefixes, chunks, sinks and their
    and/or combinations) the blocks follow from each row's visible key intervals: O(rows x
    segments + blocks) work and no evaluation of the mask at all;
  * otherwise (document ids, captured tensors) the traced mask is evaluated on the device, one
    slab of query blocks at a time, and only over the key range the analysis leaves open.
Either way the result equals torch's create_block_mask for the same mask_mod (tested).
"""

from __future__ import annotations

import functools
import math

import sympy
import torch

from attnc.backends.eager.evaluate import Evaluator, gather
from attnc.expr import symbols as S
from attnc.frontends.flex import Captures, trace_mask_mod
from attnc.ir.cascade import KeyBounds
from attnc.passes.mask_bounds import analyze

# Elements evaluated at once for a data-dependent mask: bounds memory, and small slabs let the
# static part of the mask (a causal bound, say) narrow each slab's key range.
_SLAB_ELEMENTS = 1 << 22


def _pair(block_size) -> tuple[int, int]:
    bs = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(bs) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                               for x in bs):
        raise ValueError(f"BLOCK_SIZE must be a positive int or a pair of them, got {block_size!r}")
    return bs


def noop_mask(b, h, q_idx, kv_idx):
    """Every key is visible."""
    return b.new_ones((), dtype=torch.bool)


def _fold(name: str, mask_mods, conjunction: bool):
    """and/or of mask_mods; plain Python, so it runs on tensors (torch) and traces (attnc)."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError(f"{name} takes mask_mod functions")

    def combined(b, h, q_idx, kv_idx):
        result = (b.new_ones if conjunction else b.new_zeros)((), dtype=torch.bool)
        for mod in mask_mods:
            value = mod(b, h, q_idx, kv_idx)
            result = (result & value) if conjunction else (result | value)
        return result

    combined.__name__ = combined.__qualname__ = name[:-1]
    return combined


def and_masks(*mask_mods):
    """A mask_mod visible where every one of `mask_mods` is."""
    return _fold("and_masks", mask_mods, True)


def or_masks(*mask_mods):
    """A mask_mod visible where any one of `mask_mods` is."""
    return _fold("or_masks", mask_mods, False)


def dense_to_ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., KB] 0/1 block map -> (counts [...], indices [..., KB]): selected blocks first in
    ascending order, then the rest ascending (torch's order, so the tensors compare equal)."""
    dense = dense.to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return (dense.sum(-1).to(torch.int32, memory_format=torch.contiguous_format),
            order.to(torch.int32, memory_format=torch.contiguous_format))


def ordered_to_dense(num: torch.Tensor, indices: torch.Tensor, blocks: int) -> torch.Tensor:
    """The inverse of dense_to_ordered: a [..., blocks] 0/1 int32 map."""
    used = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
    dense = torch.zeros(*indices.shape[:-1], blocks + 1, dtype=torch.int32, device=indices.device)
    dense.scatter_(-1, torch.where(used, indices.long(), blocks), 1)
    return dense[..., :blocks]


def transpose_ordered(num: torch.Tensor,
                      indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row lists of columns -> per-column lists of rows, ordered as dense_to_ordered orders
    them (torch's _transpose_ordered)."""
    return dense_to_ordered(ordered_to_dense(num, indices, indices.shape[-1]).transpose(-2, -1))


class BlockMask:
    """Per (b, h, query block): the partially visible key blocks (`kv_num_blocks`, `kv_indices`)
    and the fully visible ones (`full_kv_num_blocks`, `full_kv_indices`); B and H may be 1 and
    broadcast. `mask_mod` is applied on partial blocks. `derived` says the lists were computed
    from mask_mod by create_block_mask, so a kernel may use mask_mod's static bounds instead.

    Per (b, h, key block), the transposed lists give the query blocks that see it partially
    (`q_num_blocks` [B, H, KB], `q_indices` [B, H, KB, QB]) and fully (`full_q_num_blocks`,
    `full_q_indices`), int32, ordered as torch orders them; they are computed from the key lists
    on first use and cached."""

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 BLOCK_SIZE, mask_mod, seq_lengths, derived: bool = False) -> None:
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.BLOCK_SIZE = _pair(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask
        self.seq_lengths = tuple(seq_lengths)
        self.derived = derived

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None,
                       full_kv_indices=None, BLOCK_SIZE=128, mask_mod=None, seq_lengths=None):
        """A block mask from explicit lists, e.g. blocks chosen from the data (top-k, MoBA)."""
        bs = _pair(BLOCK_SIZE)
        if kv_indices.dim() != 4 or kv_num_blocks.shape != kv_indices.shape[:-1]:
            raise ValueError("kv_indices must be [B, H, query blocks, key blocks] and "
                             "kv_num_blocks [B, H, query blocks]; got "
                             f"{tuple(kv_indices.shape)} and {tuple(kv_num_blocks.shape)}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("give both full_kv_num_blocks and full_kv_indices, or neither")
        if full_kv_indices is None:
            full_kv_num_blocks = torch.zeros_like(kv_num_blocks)
            full_kv_indices = torch.zeros_like(kv_indices)
        if (full_kv_indices.shape != kv_indices.shape
                or full_kv_num_blocks.shape != kv_num_blocks.shape):
            raise ValueError("full block lists must have the shapes of the partial ones")
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * bs[0], kv_indices.shape[-1] * bs[1])
        return cls(kv_num_blocks.to(torch.int32), kv_indices.to(torch.int32),
                   full_kv_num_blocks.to(torch.int32), full_kv_indices.to(torch.int32), bs,
                   mask_mod, seq_lengths)

    @classmethod
    def from_torch(cls, bm) -> "BlockMask":
        """Wrap a torch.nn.attention.flex_attention.BlockMask: its kv lists are used as they
        are, the q lists recomputed from them."""
        return cls.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                  bm.full_kv_indices, bm.BLOCK_SIZE, bm.mask_mod,
                                  bm.seq_lengths)

    def to_torch(self):
        """The same block mask as a torch BlockMask (for torch's flex_attention)."""
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
        return TorchBlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod, seq_lengths=self.seq_lengths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, H = self.kv_num_blocks.shape[:2]
        return (B, H) + self.seq_lengths

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device) -> "BlockMask":
        return BlockMask(self.kv_num_blocks.to(device), self.kv_indices.to(device),
                         self.full_kv_num_blocks.to(device), self.full_kv_indices.to(device),
                         self.BLOCK_SIZE, self.mask_mod, self.seq_lengths, self.derived)

    def check_call(self, who: str, B: int, H: int, M: int, N: int,
                   device: torch.device) -> None:
        """Raise ValueError naming `block_mask` unless this mask fits a call with B batches, H
        query heads, M queries and N keys on `device`. The lengths must be the mask's own
        (as torch's flex_attention requires: a mask built for other lengths would mask the
        wrong positions); B and H may be 1 (the mask broadcasts) or the call's."""
        mb, mh = self.kv_num_blocks.shape[:2]
        if tuple(self.seq_lengths) != (M, N):
            raise ValueError(
                f"{who}: block_mask was built for (Q_LEN, KV_LEN) = {tuple(self.seq_lengths)} "
                f"(shape {self.shape}), the call has (M, N) = ({M}, {N}); build it for these "
                "lengths")
        if mb not in (1, B) or mh not in (1, H):
            raise ValueError(
                f"{who}: block_mask has B = {mb}, H = {mh} (shape {self.shape}); expected 1 "
                f"(broadcast) or the call's B = {B}, H = {H} (query heads)")
        bq, bkv = self.BLOCK_SIZE
        qblocks, kblocks = self.kv_indices.shape[-2:]
        if qblocks < -(-M // bq) or kblocks < -(-N // bkv):
            raise ValueError(f"{who}: block_mask has {qblocks} x {kblocks} blocks, too few for "
                             f"lengths ({M}, {N}) with blocks {(bq, bkv)}")
        if self.device != device:
            raise ValueError(f"{who}: block_mask is on {self.device}, the query on {device}; "
                             "use block_mask.to(device)")

    # The backward pass runs over key blocks (each accumulates its dK, dV over the query blocks
    # that see it), so it walks these transposed lists rather than the kv ones.
    @functools.cached_property
    def _q_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*transpose_ordered(self.kv_num_blocks, self.kv_indices),
                *transpose_ordered(self.full_kv_num_blocks, self.full_kv_indices))

    @property
    def q_num_blocks(self) -> torch.Tensor:
        """[B, H, key blocks] int32: how many query blocks see each key block partially."""
        return self._q_lists[0]

    @property
    def q_indices(self) -> torch.Tensor:
        """[B, H, key blocks, query blocks] int32: those query blocks ascending, then the rest."""
        return self._q_lists[1]

    @property
    def full_q_num_blocks(self) -> torch.Tensor:
        """[B, H, key blocks] int32: how many query blocks see each key block fully."""
        return self._q_lists[2]

    @property
    def full_q_indices(self) -> torch.Tensor:
        """[B, H, key blocks, query blocks] int32: those query blocks ascending, then the rest."""
        return self._q_lists[3]

    def to_dense(self) -> torch.Tensor:
        """[B, H, query blocks, key blocks]: 0 skipped, 1 partial, 2 full."""
        blocks = self.kv_indices.shape[-1]
        return (ordered_to_dense(self.kv_num_blocks, self.kv_indices, blocks)
                + 2 * ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, blocks))

    def sparsity(self) -> float:
        """Percentage of (query block, key block) pairs that are skipped."""
        total = self.kv_indices.numel()
        used = int(self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum())
        return 100.0 * (1 - used / total) if total else 0.0

    def __repr__(self) -> str:
        return (f"attnc.BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
                f"partial={int(self.kv_num_blocks.sum())}, "
                f"full={int(self.full_kv_num_blocks.sum())}, "
                f"sparsity={self.sparsity():.2f}%, derived={self.derived})")


def create_block_mask(mask_mod, B, H, Q_LEN: int, KV_LEN: int, device=None,
                      BLOCK_SIZE=128) -> BlockMask:
    """FlexAttention's create_block_mask: partial and full key blocks for each query block.

    B or H of None means 1 (the mask broadcasts over it). `device` defaults to CUDA when there is
    one. Statically analyzable masks cost no mask evaluation; others are evaluated blockwise on
    `device`.
    """
    B, H = (1 if B is None else B), (1 if H is None else H)
    for name, val in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"create_block_mask: {name} must be a positive int, got {val!r}")
    bq, bkv = _pair(BLOCK_SIZE)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    captures = Captures()
    mask = trace_mask_mod(mask_mod, captures)
    mask = None if mask is sympy.true else mask
    bounds = analyze(mask)
    grid = _Grid(B, H, Q_LEN, KV_LEN, bq, bkv, device)
    if bounds.exact:
        partial, full = grid.from_bounds(bounds)
    else:
        partial, full = grid.evaluate(mask, bounds, captures.tensors())
    partial = partial.expand(B, H, *partial.shape[2:])
    full = full.expand(B, H, *full.shape[2:])
    kv_num, kv_idx = dense_to_ordered(partial)
    full_num, full_idx = dense_to_ordered(full)
    return BlockMask(kv_num, kv_idx, full_num, full_idx, (bq, bkv), mask_mod, (Q_LEN, KV_LEN),
                     derived=True)


class _Grid:
    """The block grid of one create_block_mask call."""

    def __init__(self, B, H, Q, N, bq, bkv, device):
        self.B, self.H, self.Q, self.N = B, H, Q, N
        self.bq, self.bkv = bq, bkv
        self.QB, self.KB = math.ceil(Q / bq), math.ceil(N / bkv)
        self.device = device

    def _symbols(self, extra: dict) -> dict:
        dev = self.device
        return {S.b: torch.arange(self.B, device=dev).view(-1, 1, 1, 1),
                S.h: torch.arange(self.H, device=dev).view(1, -1, 1, 1),
                S.B: self.B, S.H: self.H, S.M: self.Q, S.N: self.N, **extra}

    def _bound(self, ev: Evaluator, ex: sympy.Expr) -> torch.Tensor:
        val = torch.as_tensor(ev(ex), device=self.device)
        if val.is_floating_point():
            val = torch.floor(val)
        return val.long().clamp(0, self.N)

    # --- exact masks: each row's visible keys are a few intervals -------------------------------
    def from_bounds(self, bounds: KeyBounds) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(self.Q, device=self.device).view(1, 1, -1, 1)
        ev = Evaluator(self._symbols({S.m_lo: rows, S.m_hi: rows}), rows)
        intervals = [(self._bound(ev, s.lo), self._bound(ev, s.hi)) for s in bounds.segments]
        shape = torch.broadcast_shapes(rows.shape, *(t.shape for iv in intervals for t in iv))
        bx, hx = shape[0], shape[1]
        any_diff = torch.zeros(bx * hx * self.QB * (self.KB + 1), dtype=torch.int32,
                               device=self.device)
        full_diff = torch.zeros_like(any_diff)
        block_row = (rows // self.bq).expand(shape)
        base = ((torch.arange(bx, device=self.device).view(-1, 1, 1, 1) * hx
                 + torch.arange(hx, device=self.device).view(1, -1, 1, 1)) * self.QB
                + block_row) * (self.KB + 1)
        for lo, hi in _merge(intervals, shape):
            live = hi > lo
            # blocks the interval touches, and blocks it covers entirely
            for diff, first, stop in ((any_diff, lo // self.bkv, (hi - 1) // self.bkv + 1),
                                      (full_diff, (lo + self.bkv - 1) // self.bkv,
                                       hi // self.bkv)):
                ok = live & (stop > first)
                for at, step in ((first, 1), (stop, -1)):
                    diff.index_put_(((base + at)[ok],),
                                    torch.full_like(at[ok], step, dtype=torch.int32),
                                    accumulate=True)
        counts = [d.view(bx, hx, self.QB, self.KB + 1).cumsum(-1)[..., :self.KB]
                  for d in (any_diff, full_diff)]
        full = counts[1] == self.bq  # every row of the query block covers the key block
        return (counts[0] > 0) & ~full, full

    # --- data-dependent masks: evaluate, one slab of query blocks at a time --------------------
    def evaluate(self, mask, bounds: KeyBounds, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = {n: t.to(self.device) for n, t in tensors.items()}
        partial = torch.zeros(self.B, self.H, self.QB, self.KB, dtype=torch.bool,
                              device=self.device)
        full = torch.zeros_like(partial)
        per_block = self.B * self.H * self.bq * self.N
        step = max(1, _SLAB_ELEMENTS // max(per_block, 1))
        for i0 in range(0, self.QB, step):
            i1 = min(i0 + step, self.QB)
            r0, r1 = i0 * self.bq, min(i1 * self.bq, self.Q)
            j0, j1 = self._key_blocks(bounds, r0, r1 - 1)
            if j1 <= j0:
                continue
            c0, c1 = j0 * self.bkv, min(j1 * self.bkv, self.N)
            rows = torch.arange(r0, r1, device=self.device).view(1, 1, -1, 1)
            keys = torch.arange(c0, c1, device=self.device).view(1, 1, 1, -1)
            ev = Evaluator(self._symbols({S.m: rows, S.n: keys}), rows,
                           access=lambda acc: gather(tensors[str(acc.base)],
                                                     [ev(i) for i in acc.indices]))
            vis = torch.as_tensor(ev(mask), device=self.device).expand(
                self.B, self.H, r1 - r0, c1 - c0)
            padded = torch.zeros(self.B, self.H, (i1 - i0) * self.bq, (j1 - j0) * self.bkv,
                                 dtype=torch.int32, device=self.device)
            padded[:, :, :r1 - r0, :c1 - c0] = vis.to(torch.int32)
            sums = padded.view(self.B, self.H, i1 - i0, self.bq, j1 - j0, self.bkv).sum((3, 5))
            whole = sums == self.bq * self.bkv
            partial[:, :, i0:i1, j0:j1] = (sums > 0) & ~whole
            full[:, :, i0:i1, j0:j1] = whole
        return partial, full

    def _key_blocks(self, bounds: KeyBounds, m_lo: int, m_hi: int) -> tuple[int, int]:
        """Key blocks [j0, j1) that can hold a visible key of rows [m_lo, m_hi]."""
        ev = Evaluator(self._symbols({S.m_lo: m_lo, S.m_hi: m_hi}),
                       torch.zeros((), device=self.device))
        lo = min(int(self._bound(ev, s.lo).min()) for s in bounds.segments)
        hi = max(int(self._bound(ev, s.hi).max()) for s in bounds.segments)
        return lo // self.bkv, -(-hi // self.bkv)


def _merge(intervals, shape):
    """Per row, merge intervals sorted by their start (mask_bounds proves the order) into
    disjoint, non-touching ones: a key block is covered only if one merged interval covers it."""
    out = []
    lo, hi = (t.expand(shape) for t in intervals[0])
    for nlo, nhi in intervals[1:]:
        nlo, nhi = nlo.expand(shape), nhi.expand(shape)
        empty, nempty = hi <= lo, nhi <= nlo
        join = empty | nempty | (nlo <= hi)
        out.append((torch.where(join, 0, lo), torch.where(join, 0, hi)))
        lo, hi = (torch.where(nempty, lo, torch.where(empty | ~join, nlo, lo)),
                  torch.where(nempty, hi, torch.where(empty | ~join, nhi, torch.maximum(hi, nhi))))
    out.append((lo, hi))
    return out
