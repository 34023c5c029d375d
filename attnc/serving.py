"""Serving helpers around the paged kernels: a spec's prologues applied outside the kernel, and
decoding the absorbed MLA spec from a paged latent cache.

`kernel.paged` does not run prologues (rope, l2norm, row scales): a key's prologue is applied
once, when the key is appended to the cache (its position is known then), and a query's at each
call; the kernel is then called with `prologues_applied=True`.

    x = apply_prologue(kernel, "kr", kr_new, start=length, pos_k=positions)

`apply_prologue` uses the spec's own prologue and attnc's eager math for it
(attnc.backends.eager.around), the definitions the kernels are tested against. The rows of `x`
are the spec's rows start..start+L-1 (`m` for a query-side operand, `n` for a key-side one) and
the keyword tensors are the spec's params and inputs as a whole-sequence call would take them,
so `pos_k[b, n]` is read at the absolute row n.

`MLADecoder` serves the library's `mla` spec (absorbed MLA: q absorbed into the latent, the
latent `c` shared by every head as key and value (`v = k`), a decoupled rotary part
`dot(qr, kr)`), with rows at their own positions (pos_q[b, m] = m, pos_k[b, n] = n). Its
PagedKVCache holds per layer the latent c (1, Dc) and the rotated kr (1, Dr) of every token; the
per-head up-projections stay outside (absorbed into q before, applied to the latent output
after), so the cache is Dc + Dr numbers per token and layer whatever the number of heads.
"""

from __future__ import annotations

import functools

import sympy
import torch

from attnc.backends.eager.around import Context, prologue
from attnc.expr import symbols as S
from attnc.ir.around import Around, Prologue, Side
from attnc.paged_cache import PagedKVCache
from attnc.runtime import validate

_START = "__start"  # the keyword the rows' first position travels under, read as __start[b]


def _around(kernel):
    ir = getattr(kernel, "kernel_ir", None)
    around = getattr(ir, "around", None)
    if around is None:
        raise ValueError(f"kernel must be a softmax-family attnc.Kernel, got {kernel!r}")
    return around


def apply_prologue(kernel, operand: str, x: torch.Tensor, *, start=0,
                   **tensors: torch.Tensor) -> torch.Tensor:
    """`operand`'s prologue in `kernel`'s spec applied to x: [B, Hq, L, Dx] for a query-side
    operand, [B, Hkv, L, Dx] for a key-side one, whose rows are the spec's rows start + i
    (`start` an int or a [B] integer tensor). `tensors`: the spec's params and inputs the
    prologue reads, as the regular call takes them. Returns x itself when the operand has no
    prologue; otherwise a new tensor of x's dtype (the math runs in fp32 or wider)."""
    around = _around(kernel)
    names = {"q", "k", "v"} | {o.name for o in around.operands}
    if operand not in names:
        raise ValueError(f"operand: {kernel.name} has no operand {operand!r} (it has "
                         f"{', '.join(sorted(names))})")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a 4-D floating tensor [B, H, L, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    validate.known(kernel.name, tensors, tuple(kernel.inputs))
    if not around.prologue(operand):
        return x
    ops, side, loose, reads = _shifted_prologue(around, operand)
    if loose:
        raise ValueError(f"{kernel.name}: the prologue of {operand} reads {', '.join(loose)}, "
                         "which apply_prologue cannot know from one operand's rows")
    missing = sorted(set(reads) - set(tensors))
    if missing:
        raise ValueError(f"{missing[0]}: missing; the prologue of {operand} reads it")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    ctx = Context(work, work, {**tensors, _START: _starts(start, x)})
    try:
        out = prologue(ops, work, side, ctx)
    except IndexError as e:
        raise ValueError(f"{kernel.name}: a tensor the prologue of {operand} reads does not "
                         f"cover rows start..start+{x.shape[2] - 1} ({e})") from None
    return out.to(x.dtype)


@functools.lru_cache(maxsize=256)
def _shifted_prologue(around: Around, operand: str):
    """(ops, side, symbols it cannot know, tensors it reads) of `operand`'s prologue with its
    row index (m or n) shifted by the first row's position, read as __start[b]. Cached: sympy
    work stays out of the per-token path."""
    side = around.side(operand)
    row = S.m if side is Side.QUERY else S.n
    ops = Around(prologues=(Prologue(operand, around.prologue(operand)),)).map_exprs(
        lambda e: e.xreplace({row: row + sympy.Indexed(_START, S.b)})).prologue(operand)
    # unknowable from one operand's rows: the whole sequence's sizes (M, N), the number of
    # query heads beside a key-side operand, q's head dim beside another operand
    known = {S.b, S.h, row, S.d, S.B} | ({S.H} if side is Side.QUERY else set()) | \
        ({S.D} if operand == "q" else set())
    loose: set[str] = set()
    reads: set[str] = set()
    for ex in Around(prologues=(Prologue(operand, ops),)).exprs():
        accesses = ex.atoms(sympy.Indexed)
        bases = {a.base.label for a in accesses}
        loose |= {str(s) for s in ex.free_symbols
                  if isinstance(s, sympy.Symbol) and s not in known and s not in bases}
        reads |= {str(a.base) for a in accesses} - {_START}
    return ops, side, tuple(sorted(loose)), tuple(sorted(reads))


def _starts(start, x: torch.Tensor) -> torch.Tensor:
    """`start` as a [B] int64 tensor on x's device."""
    B = x.shape[0]
    if isinstance(start, bool) or not isinstance(start, (int, torch.Tensor)):
        raise ValueError(f"start must be an int or a [B] integer tensor, got {start!r}")
    if isinstance(start, int):
        if start < 0:
            raise ValueError(f"start must be nonnegative (the first row's position), got "
                             f"{start}")
        return torch.full((B,), start, dtype=torch.long, device=x.device)
    if start.dim() != 1 or start.shape[0] != B or start.is_floating_point() or \
            start.dtype == torch.bool:
        raise ValueError(f"start must be a [B] = [{B}] integer tensor, got "
                         f"{start.dtype} of shape {tuple(start.shape)}")
    return start.to(device=x.device, dtype=torch.long)  # (not checked >= 0: no device sync)


class MLADecoder:
    """Decoding the absorbed MLA spec from a paged latent cache (module docstring).

        dec = MLADecoder(num_pages, page_size, latent_dim=Dc, rope_dim=Dr, num_layers=1,
                         dtype=torch.float32, device="cpu")    # kernel: attnc.load("mla")
        seq = dec.new_sequence()
        dec.append(seq, layer, c, kr)    # c [T, Dc] latent, kr [T, Dr] rotary key (unrotated)
        out = dec.attend(layer, seqs, q, qr, scale=s)   # [B, H, M, Dc] latent output
        out = dec.decode(layer, seqs, q, qr, c, kr, scale=s)  # append each's T rows, attend them

    q [B, H, M, Dc] is the absorbed query (the nope part times each head's key up-projection),
    qr [B, H, M, Dr] the unrotated rotary query; query row i of sequence b is its row
    length - q_lens[b] + i (the new rows are the last ones). Keys are rotated once as they are
    appended, queries at each call. `scale` defaults to the kernel's 1/sqrt(Dc); DeepSeek's is
    1/sqrt(nope dim + Dr). Every layer appends the same T rows per step (PagedKVCache)."""

    def __init__(self, num_pages: int, page_size: int, latent_dim: int, rope_dim: int,
                 num_layers: int = 1, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", kernel=None):
        if kernel is None:
            import attnc
            kernel = attnc.load("mla")
        around = _around(kernel)
        sides = {o.name: o.side for o in around.operands}
        if sides != {"qr": Side.QUERY, "kr": Side.KEY} or around.value != "k" or \
                not set(kernel.inputs) <= {"pos_q", "pos_k"}:
            raise ValueError(f"kernel: MLADecoder serves the absorbed MLA form (operands qr[m], "
                             f"kr[n], v = k, position inputs pos_q, pos_k: the library's mla); "
                             f"{kernel.name} does not have it; use PagedKVCache and "
                             "apply_prologue directly")
        self.kernel = kernel
        self.cache = PagedKVCache(num_pages, page_size, {"c": (1, latent_dim),
                                                         "kr": (1, rope_dim)},
                                  num_layers=num_layers, dtype=dtype, device=device)

    def new_sequence(self) -> int:
        return self.cache.new_sequence()

    def fork(self, seq: int) -> int:
        return self.cache.fork(seq)

    def free(self, seq: int) -> None:
        self.cache.free(seq)

    def length(self, seq: int, layer: int | None = None) -> int:
        return self.cache.length(seq, layer)

    def _positions(self, width: int, batch: int) -> dict[str, torch.Tensor]:
        """The spec's position inputs when every row sits at its own index."""
        pos = torch.arange(width, device=self.cache.device).expand(batch, width)
        return {name: pos for name in self.kernel.inputs}

    def append(self, seq: int, layer: int, c: torch.Tensor, kr: torch.Tensor) -> None:
        """Append T tokens: latent c [T, Dc] and rotary key kr [T, Dr], rotated here."""
        Dc, Dr = self.cache.fields["c"][1], self.cache.fields["kr"][1]
        for name, x, width in (("c", c, Dc), ("kr", kr, Dr)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != width:
                raise ValueError(f"{name} must be [T, {width}], got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
        start = self.cache.length(seq, layer)
        tensors = self._positions(start + kr.shape[0], 1)
        rows = {"k": c, "kr": kr}
        out = {n: apply_prologue(self.kernel, n, x[None, None], start=start, **tensors)[0, 0]
               for n, x in rows.items()}
        self.cache.append(seq, layer, c=out["k"][:, None], kr=out["kr"][:, None])

    def attend(self, layer: int, seq_ids, q: torch.Tensor, qr: torch.Tensor, *,
               q_lens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """The latent output [B, H, M, Dc] of query rows q, qr over the sequences' caches."""
        for name, x in (("q", q), ("qr", qr)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, H, M, D], got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
        lens = [self.cache.length(s, layer) for s in seq_ids]
        M = q.shape[2]
        N = torch.tensor(lens, dtype=torch.long, device=q.device)
        start = N - (M if q_lens is None else q_lens.to(device=q.device, dtype=torch.long))
        tensors = self._positions(max(lens, default=0) + M, q.shape[0])
        q, qr = (apply_prologue(self.kernel, n, x, start=start, **tensors)
                 for n, x in (("q", q), ("qr", qr)))
        return self.cache.attend(self.kernel, q, seq_ids, layer, k_field="c", qr=qr,
                                 q_lens=q_lens, scale=scale, prologues_applied=True)

    def decode(self, layer: int, seq_ids, q: torch.Tensor, qr: torch.Tensor, c: torch.Tensor,
               kr: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """Append c [B, T, Dc], kr [B, T, Dr] (entry b to sequence seq_ids[b]), then attend
        the T new rows q [B, H, T, Dc], qr [B, H, T, Dr]: the latent output [B, H, T, Dc]."""
        Dc, Dr = self.cache.fields["c"][1], self.cache.fields["kr"][1]
        for name, x, width in (("c", c, Dc), ("kr", kr, Dr)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != len(seq_ids) \
                    or x.shape[2] != width:
                raise ValueError(f"{name} must be [B, T, {width}] with B = len(seq_ids) = "
                                 f"{len(seq_ids)}, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
        lens = [self.cache.length(s, layer) for s in seq_ids]
        start = torch.tensor(lens, dtype=torch.long, device=self.cache.device)
        tensors = self._positions(max(lens, default=0) + kr.shape[1], len(seq_ids))
        keys = {n: apply_prologue(self.kernel, n, x[:, None], start=start, **tensors)[:, 0]
                for n, x in (("k", c), ("kr", kr))}
        self.cache.append_batch(seq_ids, layer, c=keys["k"][:, :, None],
                                kr=keys["kr"][:, :, None])
        return self.attend(layer, seq_ids, q, qr, scale=scale)
