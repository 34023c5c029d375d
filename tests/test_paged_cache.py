"""attnc.PagedKVCache: page bookkeeping (allocation, reuse, forks with copy on write, refcounts,
layers, errors), `attend`'s plumbing into `kernel.paged`, and decoding through the cache with a
compiled kernel equal to the regular kernel on the contiguous sequence at every step."""

from __future__ import annotations

import math

import pytest
import torch

import attnc

FIELDS = {"k": (2, 3), "v": (2, 5)}


def tokens(g, T, fields=FIELDS, dtype=torch.float32):
    return {n: torch.randn(T, *shape, generator=g).to(dtype) for n, shape in fields.items()}


def appended(cache, seq, g, T, log):
    """Append T random tokens to every layer of seq, recording them in log[seq]."""
    for layer in range(cache.num_layers):
        new = tokens(g, T, cache.fields)
        cache.append(seq, layer, **new)
        for n, x in new.items():
            log.setdefault((seq, layer, n), []).append(x)


def expect_contents(cache, log):
    for (seq, layer, n), parts in log.items():
        torch.testing.assert_close(cache.gather(seq, layer, n), torch.cat(parts), rtol=0, atol=0)


def rows_via_table(cache, seq, layer, name):
    """The rows the page table names, read directly from the pool (not through gather)."""
    table, lens = cache.table([seq], layer)
    pool = cache.pages(layer, name)
    return torch.stack([pool[table[0, r // cache.page_size], r % cache.page_size]
                        for r in range(int(lens[0]))])


def test_append_gather_table_free_round_trip():
    g = torch.Generator().manual_seed(0)
    cache = attnc.PagedKVCache(8, 4, FIELDS, dtype=torch.float32)
    seq = cache.new_sequence()
    log: dict = {}
    for T in (6, 1, 3):
        appended(cache, seq, g, T, log)
    assert cache.length(seq) == 10 and cache.page_ids(seq) == [0, 1, 2]
    assert cache.free_pages == 5 and [cache.refcount(p) for p in range(3)] == [1, 1, 1]
    expect_contents(cache, log)
    torch.testing.assert_close(rows_via_table(cache, seq, 0, "v"), torch.cat(log[seq, 0, "v"]))
    other = cache.new_sequence()
    appended(cache, other, g, 2, log)
    table, lens = cache.table([other, seq])
    assert table.dtype == torch.int32 and lens.dtype == torch.int32
    assert table.tolist() == [[3, 0, 0], [0, 1, 2]] and lens.tolist() == [2, 10]
    cache.free(seq)
    cache.free(other)
    assert cache.free_pages == 8 and cache.sequences == []
    assert all(cache.refcount(p) == 0 for p in range(8))


def test_pages_are_reused_after_free():
    g = torch.Generator().manual_seed(1)
    cache = attnc.PagedKVCache(3, 4, FIELDS, dtype=torch.float32)
    first = cache.new_sequence()
    log: dict = {}
    appended(cache, first, g, 8, log)
    cache.free(first)
    second = cache.new_sequence()
    log = {}
    appended(cache, second, g, 11, log)  # needs all 3 pages: the freed two are handed out again
    assert sorted(cache.page_ids(second)) == [0, 1, 2] and cache.free_pages == 0
    expect_contents(cache, log)


@pytest.mark.parametrize("prefix", [6, 8])  # mid-page (copy on write of the tail) / full pages
def test_forks_never_corrupt_each_other(prefix):
    g = torch.Generator().manual_seed(2)
    cache = attnc.PagedKVCache(16, 4, FIELDS, num_layers=2, dtype=torch.float32)
    parent = cache.new_sequence()
    log: dict = {}
    appended(cache, parent, g, prefix, log)
    child = cache.fork(parent)
    for layer in range(2):
        for n in FIELDS:
            log[child, layer, n] = list(log[parent, layer, n])
    shared = cache.page_ids(parent)
    assert cache.page_ids(child) == shared and all(cache.refcount(p) == 2 for p in shared)
    free_before = cache.free_pages
    appended(cache, parent, g, 3, log)
    appended(cache, child, g, 1, log)
    appended(cache, child, g, 5, log)
    grandchild = cache.fork(child)
    for layer in range(2):
        for n in FIELDS:
            log[grandchild, layer, n] = list(log[child, layer, n])
    appended(cache, grandchild, g, 2, log)
    appended(cache, parent, g, 1, log)
    expect_contents(cache, log)
    full = prefix // 4
    assert cache.page_ids(parent)[:full] == cache.page_ids(child)[:full] == shared[:full]
    assert all(cache.refcount(p) == 3 for p in shared[:full])  # full pages stay shared
    if prefix % 4:  # the first writer (parent) copied the shared tail, the child kept it
        assert cache.page_ids(parent)[full] != shared[-1] == cache.page_ids(child)[full]
    used = {p for s in (parent, child, grandchild) for p in cache.page_ids(s)}
    assert free_before - cache.free_pages == len(used) - len(shared)
    for seq in (child, parent, grandchild):
        cache.free(seq)
        with pytest.raises(ValueError, match=f"seq {seq} was freed"):
            cache.length(seq)
    assert cache.free_pages == 16


def test_append_batch_equals_appends_one_by_one():
    """A shared mid-page tail written by both sharers in one batch (one copy, exactly the one
    free page), then a batch across a page boundary."""
    g = torch.Generator().manual_seed(8)
    cache = attnc.PagedKVCache(7, 4, FIELDS, dtype=torch.float32)
    parent = cache.new_sequence()
    log: dict = {}
    appended(cache, parent, g, 6, log)
    child = cache.fork(parent)
    for n in FIELDS:
        log[child, 0, n] = list(log[parent, 0, n])
    other = cache.new_sequence()
    appended(cache, other, g, 1, log)
    for T, free in ((1, 3), (3, 0)):  # one copy of the shared tail; then a new page each
        batch = [child, parent, other]
        new = tokens(g, T, {n: (3, *shape) for n, shape in FIELDS.items()})
        new = {n: x.transpose(0, 1) for n, x in new.items()}  # [B, T, *shape]
        cache.append_batch(batch, 0, **new)
        for b, seq in enumerate(batch):
            for n, x in new.items():
                log[seq, 0, n].append(x[b])
        expect_contents(cache, log)
        assert cache.free_pages == free
    assert cache.page_ids(child)[0] == cache.page_ids(parent)[0]
    with pytest.raises(RuntimeError, match=r"seqs \[0, 1\] need 2 more page\(s\)"):
        cache.append_batch([parent, child], 0, **{n: x[:2] for n, x in new.items()})
    with pytest.raises(ValueError, match="distinct"):
        cache.append_batch([parent, parent], 0, **{n: x[:2] for n, x in new.items()})
    with pytest.raises(ValueError, match=r"expected \[B = 2, T, 2, 3\]"):
        cache.append_batch([parent, child], 0, **new)
    assert [cache.length(s) for s in (parent, child, other)] == [10, 10, 5]


def test_layers_commit_a_step_together():
    g = torch.Generator().manual_seed(3)
    cache = attnc.PagedKVCache(4, 4, FIELDS, num_layers=3, dtype=torch.float32)
    seq = cache.new_sequence()
    cache.append(seq, 1, **tokens(g, 5))
    assert cache.length(seq) == 0 and cache.length(seq, 1) == 5 and cache.length(seq, 0) == 0
    assert cache.table([seq], 1)[1].tolist() == [5] and cache.table([seq])[1].tolist() == [0]
    with pytest.raises(ValueError, match="layer 1 already appended"):
        cache.append(seq, 1, **tokens(g, 5))
    with pytest.raises(ValueError, match="layer 0 got 2"):
        cache.append(seq, 0, **tokens(g, 2))
    with pytest.raises(ValueError, match="middle of a step"):
        cache.fork(seq)
    cache.append(seq, 0, **tokens(g, 5))
    cache.append(seq, 2, **tokens(g, 5))
    assert cache.length(seq) == 5 and cache.page_ids(seq) == [0, 1]


def test_out_of_pages_is_a_clear_error_and_changes_nothing():
    g = torch.Generator().manual_seed(4)
    cache = attnc.PagedKVCache(3, 4, FIELDS, dtype=torch.float32)
    a, b = cache.new_sequence(), cache.new_sequence()
    log: dict = {}
    appended(cache, a, g, 6, log)
    with pytest.raises(RuntimeError, match=r"needs 2 more page\(s\).*1 of 3 are free"):
        cache.append(b, 0, **tokens(g, 5))
    child = cache.fork(a)
    with pytest.raises(RuntimeError, match=r"needs 2 more page\(s\)"):  # a copy + a new page
        cache.append(child, 0, **tokens(g, 3))
    assert cache.length(child) == 6 and cache.page_ids(child) == cache.page_ids(a)
    assert cache.free_pages == 1
    appended(cache, b, g, 4, log)
    expect_contents(cache, log)


def test_bad_arguments_raise_value_errors():
    g = torch.Generator().manual_seed(5)
    cache = attnc.PagedKVCache(4, 4, FIELDS, num_layers=2, dtype=torch.float32)
    seq = cache.new_sequence()
    good = tokens(g, 2)
    cases = [
        (lambda: cache.append(7, 0, **good), "seq 7 is unknown"),
        (lambda: cache.append(True, 0, **good), "seq must be"),
        (lambda: cache.append(seq, 2, **good), "layer must be an int in"),
        (lambda: cache.append(seq, 0, k=good["k"]), "v: missing"),
        (lambda: cache.append(seq, 0, **good, w=good["v"]), "w: not a field"),
        (lambda: cache.append(seq, 0, k=good["k"], v=good["v"][:, :, :4]), r"v has shape"),
        (lambda: cache.append(seq, 0, k=good["k"], v=good["v"][:1]), "v has 1 tokens"),
        (lambda: cache.append(seq, 0, k=good["k"].double(), v=good["v"]), "k has dtype"),
        (lambda: cache.table(seq), "seq_ids must be a list"),
        (lambda: cache.pages(0, "q"), "no field 'q'"),
        (lambda: cache.refcount(4), "page must be"),
        (lambda: attnc.PagedKVCache(0, 4, FIELDS), "num_pages must be"),
        (lambda: attnc.PagedKVCache(4, 4, {}), "fields must be"),
        (lambda: attnc.PagedKVCache(4, 4, {"k": (2, 0)}), "k's shape"),
        (lambda: cache.attend(object(), None, [seq], 0), "no paged forward"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert cache.length(seq, 0) == 0 and cache.free_pages == 4


def reference_paged(q, k_cache, v_cache, table, lens, visible, scale=None):
    """Softmax attention from the math, reading keys through the page table: query row i of
    sequence b is the last rows' i-th (position N_b - M + i), keys 0..N_b-1 by `visible(m, n)`,
    query head h reads K/V head h // (Hq / Hkv)."""
    B, Hq, M, D = q.shape
    page = k_cache.shape[1]
    Hkv = k_cache.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, M, v_cache.shape[-1], dtype=torch.float64)
    for b in range(B):
        N = int(lens[b])
        where = [(int(table[b, r // page]), r % page) for r in range(N)]
        k = torch.stack([k_cache[p, s] for p, s in where]).double()  # [N, Hkv, D]
        v = torch.stack([v_cache[p, s] for p, s in where]).double()
        m = torch.arange(N - M, N)[:, None]
        mask = visible(m, torch.arange(N)[None, :])
        for h in range(Hq):
            j = h // (Hq // Hkv)
            s = (q[b, h].double() @ k[:, j].T) * scale
            out[b, h] = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v[:, j]
    return out.to(q.dtype)


class TablePaged:
    """A stand-in kernel whose `paged` is reference_paged (causal); it records its calls."""

    def __init__(self):
        self.calls = []

    def paged(self, q, k_cache, v_cache, table, lens, **kw):
        self.calls.append((k_cache, v_cache, table, lens, kw))
        return reference_paged(q, k_cache, v_cache, table, lens, lambda m, n: n <= m,
                               kw.get("scale"))


class Echo:
    """A stand-in kernel whose `paged` returns its arguments."""

    def paged(self, *args, **kw):
        return args, kw


def test_attend_passes_pages_table_and_lengths():
    g = torch.Generator().manual_seed(6)
    cache = attnc.PagedKVCache(12, 4, {"k": (2, 8), "v": (2, 8)}, num_layers=2,
                               dtype=torch.float32)
    seqs, kv = [cache.new_sequence(), cache.new_sequence()], {}
    for seq, T in zip(seqs, (5, 9)):
        for layer in range(2):
            new = tokens(g, T, cache.fields)
            cache.append(seq, layer, **new)
            kv[seq, layer] = new
    kernel = TablePaged()
    q = torch.randn(2, 4, 1, 8, generator=g)
    out = cache.attend(kernel, q, seqs, 1, scale=0.5)
    k_cache, v_cache, table, lens, kw = kernel.calls[-1]
    assert k_cache is cache.pages(1, "k") and v_cache is cache.pages(1, "v")
    assert lens.tolist() == [5, 9] and kw == {"scale": 0.5}
    for b, seq in enumerate(seqs):  # the last row of each sequence against its own keys
        k, v = kv[seq, 1]["k"].transpose(0, 1), kv[seq, 1]["v"].transpose(0, 1)
        k, v = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
        w = torch.softmax(q[b] @ k.transpose(-1, -2) * 0.5, -1)
        torch.testing.assert_close(out[b], w @ v)
    latent = attnc.PagedKVCache(4, 4, {"c": (1, 8), "kr": (1, 4)}, dtype=torch.float32)
    seq = latent.new_sequence()
    latent.append(seq, 0, c=torch.randn(3, 1, 8, generator=g), kr=torch.randn(3, 1, 4,
                                                                              generator=g))
    (_, k_cache, v_cache, _, lens), kw = latent.attend(Echo(), q[:1], [seq], 0, k_field="c",
                                                       prologues_applied=True)
    assert k_cache is latent.pages(0, "c") and v_cache is None and lens.tolist() == [3]
    assert kw["kr"] is latent.pages(0, "kr") and kw["prologues_applied"] is True
    with pytest.raises(ValueError, match="kr is a field of the cache"):
        latent.attend(Echo(), q[:1], [seq], 0, k_field="c", kr=None)


SPECS = {"causal": ({}, lambda m, n: n <= m),
         "sliding_window": ({"window": 5}, lambda m, n: (n <= m) & (m - n < 5))}


@pytest.mark.parametrize("name,page_size", [("causal", 4), ("causal", 16),
                                            ("sliding_window", 4), ("sliding_window", 16)])
def test_decoding_through_the_cache_equals_the_contiguous_kernel(name, page_size):
    """Two sequences of ragged prefill lengths (5 and 9), GQA 4/2, a fork of the first after
    its prefill (mid-page for page size 4); prefill then decode steps, every sequence's rows
    against the regular kernel over its whole contiguous sequence."""
    options, _ = SPECS[name]
    kernel = attnc.load(name, block_m=16, block_n=16, **options)
    g = torch.Generator().manual_seed(7)
    Hq, Hkv, D = 4, 2, 16
    cache = attnc.PagedKVCache(12, page_size, {"k": (Hkv, D), "v": (Hkv, D)},
                               dtype=torch.float32)
    seqs = [cache.new_sequence(), cache.new_sequence()]
    history: dict[int, dict[str, list]] = {s: {"q": [], "k": [], "v": []} for s in seqs}

    def step(batch, T):
        M = max(T.values())
        q = torch.zeros(len(batch), Hq, M, D)
        news = [{"q": torch.randn(Hq, T[seq], D, generator=g),
                 "k": torch.randn(T[seq], Hkv, D, generator=g),
                 "v": torch.randn(T[seq], Hkv, D, generator=g)} for seq in batch]
        if len(set(T.values())) == 1:  # decode steps: one batched append
            cache.append_batch(batch, 0, **{n: torch.stack([new[n] for new in news])
                                            for n in "kv"})
        for b, (seq, new) in enumerate(zip(batch, news)):
            if len(set(T.values())) > 1:
                cache.append(seq, 0, k=new["k"], v=new["v"])
            q[b, :, :T[seq]] = new["q"]
            for n, x in new.items():
                history[seq][n].append(x)
        lens = torch.tensor([T[s] for s in batch], dtype=torch.int32)
        out = cache.attend(kernel, q, batch, 0, q_lens=lens)
        for b, seq in enumerate(batch):
            h = history[seq]
            qf = torch.cat(h["q"], 1)[None]
            kf, vf = (torch.cat(h[n])[None].transpose(1, 2) for n in "kv")
            ref = kernel(qf, kf, vf)[:, :, -T[seq]:]
            torch.testing.assert_close(out[b:b + 1, :, :T[seq]], ref, rtol=1e-5, atol=1e-5)
            assert not out[b, :, T[seq]:].any()  # padding rows are zero

    step(seqs, {seqs[0]: 5, seqs[1]: 9})
    child = cache.fork(seqs[0])
    history[child] = {n: list(x) for n, x in history[seqs[0]].items()}
    batch = seqs + [child]
    for _ in range(2):
        step(batch, {s: 1 for s in batch})
    full = 5 // page_size  # the pages full at the fork are still shared
    assert cache.page_ids(child)[:full] == cache.page_ids(seqs[0])[:full]
    assert cache.page_ids(child)[full:] != cache.page_ids(seqs[0])[full:]
