"""A paged key/value cache: fixed-size pages, per-sequence page lists, copy-on-write forks.

    cache = attnc.PagedKVCache(num_pages, page_size, fields={"k": (Hkv, D), "v": (Hkv, Dv)},
                               num_layers=1, dtype=torch.bfloat16, device="cpu")
    seq = cache.new_sequence()
    cache.append(seq, layer, k=k_new, v=v_new)    # each [T, *field shape]
    cache.append_batch([seq, ...], layer, k=..., v=...)  # each [B, T, *field shape]
    out = cache.attend(kernel, q, [seq, ...], layer)  # kernel.paged over the sequences' pages
    child = cache.fork(seq); cache.free(seq)

Storage is vLLM's layout: per layer and field one tensor [num_pages, page_size, *field shape]
(`pages(layer, field)`). A page id names the same page in every layer and field, so a sequence
has one page list for all of them and `table` builds the page table every layer reads: row r of
a sequence lives at slot r % page_size of page `page_ids(seq)[r // page_size]`.

Steps. Every layer appends the same T tokens per step; a sequence's `length` advances by T when
the last layer has appended them. Until then `length(seq, layer)` counts the rows that layer
holds (so a model can attend at layer l right after appending there, before layer l + 1 runs).
The first append of a step reserves the pages the T tokens need, so a step either gets all its
pages or fails (RuntimeError saying how many pages it needs and how many are free) before
anything is written.

Forks share pages by reference count. Appends only ever write at the tail, so a full shared
page is never written and stays shared; a partially filled tail page still shared when a
sequence writes into it is copied first (its filled slots, in every layer and field), so the last
sequence holding it writes in place. `free` drops a sequence's references; a page nobody
references goes back to the free list (reused last-in, first-out). `append_batch` does a
decoding step's appends of several sequences with one indexed copy per field.

Bookkeeping is plain Python (lists and ints): no device synchronization, nothing but the page
copies and the token writes touches tensors. Not thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Sequence:
    pages: list[int]
    length: int
    rows: list[int]                    # rows each layer holds: length, or length + step
    step: int | None = None            # T of the step in progress
    done: set[int] = field(default_factory=set)


class PagedKVCache:
    """Pages of fixed size for `fields` (name -> per-token shape) in `num_layers` layers, with
    sequences that append, fork (copy on write) and free. See the module docstring."""

    def __init__(self, num_pages: int, page_size: int, fields: dict[str, tuple[int, ...]],
                 num_layers: int = 1, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu"):
        for name, value in (("num_pages", num_pages), ("page_size", page_size),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(fields, dict) or not fields:
            raise ValueError(f"fields must be a non-empty dict of name -> per-token shape, got "
                             f"{fields!r}")
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in fields.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"fields: a field name must be an identifier, got {name!r}")
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
                raise ValueError(f"fields: {name}'s shape must be positive ints, got {shape}")
            shapes[name] = shape
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.fields = shapes
        self.dtype = dtype
        self.device = torch.device(device)
        self._store = [{name: torch.zeros(num_pages, page_size, *shape, dtype=dtype,
                                          device=self.device) for name, shape in shapes.items()}
                       for _ in range(num_layers)]
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, 2, ... first
        self._refs = [0] * num_pages
        self._seqs: dict[int, _Sequence] = {}
        self._next_id = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}: {s}" for n, s in self.fields.items())
        return (f"PagedKVCache({self.num_pages} pages x {self.page_size}, {{{fields}}}, "
                f"{self.num_layers} layers, {self.dtype}, {len(self._seqs)} sequences, "
                f"{len(self._free)} pages free)")

    # --- sequences ---------------------------------------------------------------------------
    def new_sequence(self) -> int:
        """A new empty sequence's id (ids are never reused)."""
        seq = self._next_id
        self._next_id += 1
        self._seqs[seq] = _Sequence([], 0, [0] * self.num_layers)
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence with `seq`'s tokens, sharing its pages (copy on write)."""
        s = self._get(seq)
        if s.step is not None:
            raise ValueError(f"seq {seq} is in the middle of a step (layers {sorted(s.done)} "
                             f"appended {s.step} tokens); fork it before or after the step")
        child = self.new_sequence()
        for p in s.pages:
            self._refs[p] += 1
        self._seqs[child] = _Sequence(list(s.pages), s.length, list(s.rows))
        return child

    def free(self, seq: int) -> None:
        """Forget `seq`; its pages nobody else references return to the pool."""
        s = self._get(seq)
        for p in s.pages:
            self._release(p)
        del self._seqs[seq]

    def length(self, seq: int, layer: int | None = None) -> int:
        """Tokens of `seq` every layer holds, or (with `layer`) the rows that layer holds."""
        s = self._get(seq)
        return s.length if layer is None else s.rows[self._layer(layer)]

    def page_ids(self, seq: int) -> list[int]:
        """`seq`'s pages in order (row r is in page_ids[r // page_size])."""
        return list(self._get(seq).pages)

    def refcount(self, page: int) -> int:
        """How many sequences hold `page`."""
        if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < self.num_pages:
            raise ValueError(f"page must be an int in [0, {self.num_pages}), got {page!r}")
        return self._refs[page]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list[int]:
        """Ids of the live sequences."""
        return list(self._seqs)

    # --- data --------------------------------------------------------------------------------
    def pages(self, layer: int, name: str) -> torch.Tensor:
        """The page pool of one layer and field, [num_pages, page_size, *field shape]."""
        return self._store[self._layer(layer)][self._field(name)]

    def append(self, seq: int, layer: int, **tensors: torch.Tensor) -> None:
        """Write T new tokens of `seq` into `layer`: one [T, *field shape] tensor per field,
        by field name, of the cache's dtype and device."""
        s = self._get(seq)
        layer = self._layer(layer)
        T = self._check_tokens(tensors, None)
        self._begin([(seq, s)], layer, T)
        start = row = s.length
        while row < start + T:  # one slice copy per page the tokens touch
            index, slot = divmod(row, self.page_size)
            stop = min(start + T, (index + 1) * self.page_size)
            for name, x in tensors.items():
                self._store[layer][name][s.pages[index], slot:slot + stop - row] = \
                    x[row - start:stop - start]
            row = stop
        self._end(s, layer, T)

    def append_batch(self, seq_ids, layer: int, **tensors: torch.Tensor) -> None:
        """`append` for several distinct sequences at once, T tokens each: one
        [len(seq_ids), T, *field shape] tensor per field, written with one indexed copy per
        field (a decoding step's appends, without a Python loop of copies)."""
        seqs = [(seq, self._get(seq)) for seq in self._ids(seq_ids)]
        if len({seq for seq, _ in seqs}) != len(seqs):
            raise ValueError(f"seq_ids must be distinct, got {list(seq_ids)}")
        layer = self._layer(layer)
        T = self._check_tokens(tensors, len(seqs))
        self._begin(seqs, layer, T)
        pages, slots = [], []
        for _, s in seqs:
            for row in range(s.length, s.length + T):
                index, slot = divmod(row, self.page_size)
                pages.append(s.pages[index])
                slots.append(slot)
        where = (torch.tensor(pages, dtype=torch.long, device=self.device),
                 torch.tensor(slots, dtype=torch.long, device=self.device))
        for name, x in tensors.items():
            self._store[layer][name].index_put_(where, x.flatten(0, 1))
        for _, s in seqs:
            self._end(s, layer, T)

    def gather(self, seq: int, layer: int, name: str) -> torch.Tensor:
        """`seq`'s rows of one field in `layer`, contiguous: [length(seq, layer), *shape]."""
        s = self._get(seq)
        pool = self.pages(layer, name)
        rows = s.rows[self._layer(layer)]
        ids = torch.tensor(s.pages, dtype=torch.long, device=self.device)
        return pool[ids].flatten(0, 1)[:rows]

    def table(self, seq_ids, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(page_table [B, max_pages] int32, kv_lens [B] int32) on the cache's device for the
        sequences `seq_ids`; kv_lens are `length(seq, layer)`; short rows are padded with page
        0 (a valid id the kernel never reads past kv_lens)."""
        seqs = [self._get(i) for i in self._ids(seq_ids)]
        if layer is not None:
            layer = self._layer(layer)
        width = max([len(s.pages) for s in seqs] + [1])
        rows = [s.pages + [0] * (width - len(s.pages)) for s in seqs]
        lens = [s.length if layer is None else s.rows[layer] for s in seqs]
        return (torch.tensor(rows, dtype=torch.int32, device=self.device).view(len(seqs), width),
                torch.tensor(lens, dtype=torch.int32, device=self.device))

    def attend(self, kernel, q: torch.Tensor, seq_ids, layer: int, *, k_field: str = "k",
               v_field: str | None = "v", **kw):
        """`kernel.paged(q, k pages, v pages, page_table, kv_lens, **kw)` over `seq_ids` in
        `layer`. `k_field` names the keys' field, `v_field` the values' (None, or a field the
        cache lacks: v_cache=None, for a spec whose value is a key operand); every other field
        goes as a keyword cache of its own name (e.g. MLA's `kr`)."""
        paged = getattr(kernel, "paged", None)
        if not callable(paged):
            raise ValueError(f"kernel {kernel!r} has no paged forward (kernel.paged); paged "
                             "attention needs a softmax-family attnc.Kernel")
        layer = self._layer(layer)
        self._field(k_field, "k_field")
        if v_field is not None and v_field not in self.fields:
            if v_field != "v":
                self._field(v_field, "v_field")
            v_field = None
        store = self._store[layer]
        caches = {n: t for n, t in store.items() if n not in (k_field, v_field)}
        clash = sorted(set(caches) & set(kw))
        if clash:
            raise ValueError(f"{clash[0]} is a field of the cache (passed as its paged cache); "
                             "do not pass it as a keyword too")
        table, lens = self.table(seq_ids, layer)
        v = None if v_field is None else store[v_field]
        return paged(q, store[k_field], v, table, lens, **caches, **kw)

    # --- internals ---------------------------------------------------------------------------
    def _get(self, seq) -> _Sequence:
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError(f"seq must be a sequence id (an int), got {seq!r}")
        s = self._seqs.get(seq)
        if s is None:
            state = "was freed" if 0 <= seq < self._next_id else "is unknown"
            raise ValueError(f"seq {seq} {state}; live sequences: {sorted(self._seqs)}")
        return s

    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or \
                not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _field(self, name, argument: str = "name") -> str:
        if name not in self.fields:
            raise ValueError(f"{argument}: no field {name!r}; the cache has "
                             f"{', '.join(self.fields)}")
        return name

    def _ids(self, seq_ids) -> list:
        if isinstance(seq_ids, (int, str, torch.Tensor)) or not hasattr(seq_ids, "__iter__"):
            raise ValueError(f"seq_ids must be a list of sequence ids, got {seq_ids!r}")
        return list(seq_ids)

    def _check_tokens(self, tensors: dict, batch: int | None) -> int:
        """Every field given once as a [T, *shape] tensor ([batch, T, *shape] with `batch`)
        of the cache's dtype and device; T."""
        unknown = sorted(set(tensors) - set(self.fields))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a field of this cache (fields: "
                             f"{', '.join(self.fields)})")
        missing = [n for n in self.fields if n not in tensors]
        if missing:
            raise ValueError(f"{missing[0]}: missing; append takes every field "
                             f"({', '.join(self.fields)})")
        lead = "T" if batch is None else f"B = {batch}, T"
        T = None
        for name, x in tensors.items():
            shape = self.fields[name]
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            rows = x.shape[:1] if batch is None else x.shape[:2]
            if x.dim() != len(rows) + len(shape) or tuple(x.shape[len(rows):]) != shape or \
                    (batch is not None and rows[0] != batch):
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [{lead}, "
                                 f"{', '.join(map(str, shape))}]")
            if x.dtype != self.dtype:
                raise ValueError(f"{name} has dtype {x.dtype}, the cache holds {self.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device}, the cache is on {self.device}")
            if T is not None and rows[-1] != T:
                raise ValueError(f"{name} has {rows[-1]} tokens, "
                                 f"{next(iter(tensors))} has {T}")
            T = rows[-1]
        assert T is not None
        return T

    def _begin(self, seqs: list[tuple[int, _Sequence]], layer: int, T: int) -> None:
        """Check that `layer` may append T tokens to each sequence now, and reserve the pages
        of the sequences this append starts a step of (all or nothing)."""
        for seq, s in seqs:
            if layer in s.done:
                waiting = sorted(set(range(self.num_layers)) - s.done)
                raise ValueError(f"layer {layer} already appended this step's {s.step} tokens "
                                 f"to seq {seq}; layers {waiting} append theirs first")
            if s.step is not None and T != s.step:
                raise ValueError(f"this step appends {s.step} tokens per layer to seq {seq} "
                                 f"(layers {sorted(s.done)} did); layer {layer} got {T}")
        starting = [(seq, s) for seq, s in seqs if s.step is None]
        self._reserve(starting, T)
        for _, s in starting:
            s.step = T

    def _end(self, s: _Sequence, layer: int, T: int) -> None:
        """`layer` holds the step's T tokens; the last layer commits the step."""
        s.rows[layer] = s.length + T
        s.done.add(layer)
        if len(s.done) == self.num_layers:
            s.length += T
            s.step = None
            s.done = set()

    def _reserve(self, seqs: list[tuple[int, _Sequence]], T: int) -> None:
        """Pages for rows length..length+T-1 of each sequence: a private copy of a shared,
        partly filled tail page the step writes into, then new pages; for all or none."""
        copies: dict[int, int] = {}  # copies already planned of a shared tail page
        plans = []
        for _, s in seqs:
            tail = s.length % self.page_size
            page = s.pages[-1] if tail else -1
            # (the last of the sharers to write keeps the page: it is no longer shared then)
            cow = T > 0 and tail != 0 and self._refs[page] - copies.get(page, 0) > 1
            if cow:
                copies[page] = copies.get(page, 0) + 1
            plans.append((cow, max(0, -(-(s.length + T) // self.page_size) - len(s.pages))))
        need = sum(cow + fresh for cow, fresh in plans)
        if need > len(self._free):
            who = f"seq {seqs[0][0]} needs" if len(seqs) == 1 else \
                f"seqs {[seq for seq, _ in seqs]} need"
            raise RuntimeError(
                f"out of pages: {who} {need} more page(s) of {self.page_size} slots for {T} "
                f"token(s) each, {len(self._free)} of {self.num_pages} are free; free sequences "
                "or build a larger cache")
        for (_, s), (cow, fresh) in zip(seqs, plans):
            if cow:
                tail = s.length % self.page_size
                old, new = s.pages[-1], self._take()
                for layer in self._store:
                    for pool in layer.values():
                        pool[new, :tail] = pool[old, :tail]
                self._release(old)
                s.pages[-1] = new
            s.pages.extend(self._take() for _ in range(fresh))

    def _take(self) -> int:
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)
