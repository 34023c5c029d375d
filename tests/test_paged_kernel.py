"""kernel.paged: the forward over a paged KV cache (attnc/runtime/paged.py).

Two oracles: the contract's "contiguous" reference (each sequence's rows gathered into
contiguous K/V and run through the regular kernel with M = N = N_b, the given query rows at
their positions) and, where that cannot express the call (a cache that dropped its oldest keys,
k_start > 0), a float64 torch reference written from each spec's math. The launch's paths
(GQA heads packed or not, one table read per key tile or per key) are each checked against
them, with the path taken read from the launch's values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import attnc
from attnc.backends.triton.contract import Bind
from attnc.backends.triton.module import KernelModule

D = 16
# spec -> (options, a function of (qk * scale, m, n, h [H, 1, 1], tensors) that gives the
# score, a function of (m, n, N) that gives the mask)
SPECS: dict[str, tuple[dict, Callable, Callable]] = {
    "causal": ({}, lambda s, m, n, h, t: s, lambda m, n, N: n <= m),
    "full": ({}, lambda s, m, n, h, t: s, lambda m, n, N: torch.ones_like(n <= m)),
    "sliding_window": ({"window": 5}, lambda s, m, n, h, t: s,
                       lambda m, n, N: (n <= m) & (m - n < 5)),
    "alibi": ({}, lambda s, m, n, h, t: s + t["slopes"][h] * (n - m), lambda m, n, N: n <= m),
    "softcap": ({"cap": 2.0}, lambda s, m, n, h, t: 2.0 * torch.tanh(s / 2.0),
                lambda m, n, N: n <= m),
    "streaming": ({"sinks": 2, "window": 4}, lambda s, m, n, h, t: s,
                  lambda m, n, N: (n <= m) & ((n < 2) | (m - n < 4))),
    "prefix_lm": ({"prefix": 6}, lambda s, m, n, h, t: s, lambda m, n, N: (n <= m) | (n < 6)),
    "neighborhood_1d": ({"kernel_size": 3}, lambda s, m, n, h, t: s,
                        lambda m, n, N: (n >= (m - 1).clamp(0, N - 3))
                        & (n < (m - 1).clamp(0, N - 3) + 3)),
    "rel_bias": ({"max_distance": 3},
                 lambda s, m, n, h, t: s + t["bias"][h, (n - m).clamp(-3, 3) + 3],
                 lambda m, n, N: torch.ones_like(n <= m)),
}


def _tensors(name: str, Hq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    if name == "alibi":
        return {"slopes": torch.rand(Hq, generator=g) * 0.5}
    if name == "rel_bias":
        return {"bias": torch.randn(Hq, 7, generator=g)}
    return {}


def _kernel(name: str):
    return attnc.load(name, **SPECS[name][0])


class Paged:
    """A tiny paged cache for the tests: each sequence owns pages drawn from a shuffled pool,
    so tables are non-contiguous and sequences interleave."""

    def __init__(self, B: int, Hkv: int, page_size: int, capacity: int, dtype, Dv: int = D,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        per = -(-capacity // page_size)
        self.num_pages = B * per + 3  # spare pages nobody uses
        self.page_size = page_size
        # unused slots hold NaN: a kernel that reads or weights them shows it
        self.k = torch.full((self.num_pages, page_size, Hkv, D), float("nan"), dtype=dtype)
        self.v = torch.full((self.num_pages, page_size, Hkv, Dv), float("nan"), dtype=dtype)
        order = torch.randperm(self.num_pages, generator=g)[:B * per]
        self.table = order.view(B, per).to(torch.int32)
        self.lens = torch.zeros(B, dtype=torch.int32)

    def append(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k [Hkv, T, D], v [Hkv, T, Dv] as the next rows of sequence b."""
        for t in range(k.shape[1]):
            r = int(self.lens[b])
            page = int(self.table[b, r // self.page_size])
            self.k[page, r % self.page_size] = k[:, t]
            self.v[page, r % self.page_size] = v[:, t]
            self.lens[b] += 1

    def rows(self, cache: torch.Tensor, b: int) -> torch.Tensor:
        """Sequence b's rows as [Hkv, kv_len, Dx]."""
        r = torch.arange(int(self.lens[b]))
        return cache[self.table[b, r // self.page_size].long(), r % self.page_size].transpose(0, 1)


def contiguous(kernel, q, pc: Paged, k_start, q_start, q_lens, tensors, **kw):
    """The contract's reference for k_start <= 0: per sequence, its keys at positions
    0..N_b-1 (the left padding rows dropped) through the regular kernel with M = N = N_b."""
    B, Hq, M, _ = q.shape
    out = torch.zeros(B, Hq, M, pc.v.shape[-1], dtype=q.dtype)
    lse = torch.full((B, Hq, M), float("-inf"))
    for b in range(B):
        pad = -int(k_start[b])
        assert pad >= 0
        ks, vs = pc.rows(pc.k, b)[:, pad:], pc.rows(pc.v, b)[:, pad:]
        N = ks.shape[1]
        rows = [i for i in range(int(q_lens[b])) if 0 <= int(q_start[b]) + i < N]
        if not rows or N == 0:
            continue
        qf = torch.zeros(1, Hq, N, q.shape[-1], dtype=q.dtype)
        pos = torch.tensor([int(q_start[b]) + i for i in rows])
        qf[0, :, pos] = q[b, :, rows]
        o, s = kernel(qf, ks[None], vs[None], return_lse=True, **tensors, **kw)
        out[b, :, rows] = o[0, :, pos]
        lse[b, :, rows] = s[0, :, pos]
    return out, lse


def from_math(name: str, q, pc: Paged, k_start, q_start, q_lens, tensors, scale=None):
    """float64 reference from the spec's math: key row r at position k_start + r, visible when
    the mask allows and the position is >= 0; query row i at q_start + i."""
    _, score, mask = SPECS[name]
    B, Hq, M, _ = q.shape
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    t64 = {n: x.double() for n, x in tensors.items()}
    out = torch.zeros(B, Hq, M, pc.v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, M), float("-inf"), dtype=torch.float64)
    for b in range(B):
        ks, vs = pc.rows(pc.k, b).double(), pc.rows(pc.v, b).double()
        group = Hq // ks.shape[0]
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        N = int(k_start[b]) + ks.shape[1]
        n = (int(k_start[b]) + torch.arange(ks.shape[1]))[None, :]
        for i in range(int(q_lens[b])):
            m = int(q_start[b]) + i
            if not 0 <= m < N or ks.shape[1] == 0:
                continue
            mm = torch.tensor([[m]])
            h = torch.arange(Hq)[:, None, None]
            s = (q[b, :, i:i + 1].double() @ ks.transpose(1, 2)) * scale
            s = score(s, mm, n, h, t64)
            ok = mask(mm, n, N) & (n >= 0)
            s = torch.where(ok, s, float("-inf"))[:, 0]
            if not bool(ok.any()):
                continue
            lse[b, :, i] = torch.logsumexp(s, -1)
            w = torch.softmax(s, -1)
            out[b, :, i] = torch.einsum("hn,hnd->hd", w, vs)
    return out, lse


def _close(got, want, dtype):
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    out, lse = got
    ref_out, ref_lse = want
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse.float()))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin].double()).abs().max().item() <= tol * 10 if \
        fin.any() else True
    err = (out.double() - ref_out.double()).abs().max().item()
    assert err <= tol * max(1.0, ref_out.double().abs().max().item()), err


def _random_kv(g, Hkv: int, T: int, dtype):
    return (torch.randn(Hkv, T, D, generator=g).to(dtype),
            torch.randn(Hkv, T, D, generator=g).to(dtype))


DECODE = [("causal", 4, 1, 4), ("sliding_window", 4, 2, 5), ("alibi", 2, 2, 16),
          ("softcap", 4, 2, 3), ("streaming", 4, 1, 4), ("prefix_lm", 2, 1, 16),
          ("rel_bias", 2, 2, 4), ("neighborhood_1d", 2, 1, 4)]


@pytest.mark.parametrize("name,Hq,Hkv,page_size", DECODE)
def test_paged_matches_contiguous_at_every_decode_step(name, Hq, Hkv, page_size):
    """Prefill with a cached prefix (ragged q_lens and kv_lens), then decode steps: every step
    equals the contiguous reference and the math reference."""
    kernel = _kernel(name)
    tensors = _tensors(name, Hq)
    g = torch.Generator().manual_seed(1)
    B = 2
    pc = Paged(B, Hkv, page_size, capacity=20, dtype=torch.float32, seed=len(name))
    for b, cached in enumerate((0, 6)):  # sequence 1 has a cached prefix of 6 rows
        pc.append(b, *_random_kv(g, Hkv, cached, torch.float32))
    new = torch.tensor([5, 3], dtype=torch.int32)
    for b in range(B):
        pc.append(b, *_random_kv(g, Hkv, int(new[b]), torch.float32))
    q = torch.randn(B, Hq, 5, D, generator=g)
    steps = [(q, new)] + [(torch.randn(B, Hq, 1, D, generator=g), None) for _ in range(4)]
    for i, (q, q_lens) in enumerate(steps):
        if i:
            for b in range(B):
                pc.append(b, *_random_kv(g, Hkv, 1, torch.float32))
        got = kernel.paged(q, pc.k, pc.v, pc.table, pc.lens, q_lens=q_lens, return_lse=True,
                           **tensors)
        zeros = torch.zeros(B, dtype=torch.int32)
        lens = torch.full((B,), q.shape[2], dtype=torch.int32) if q_lens is None else q_lens
        q_start = pc.lens - lens
        _close(got, contiguous(kernel, q, pc, zeros, q_start, lens, tensors), torch.float32)
        _close(got, from_math(name, q, pc, zeros, q_start, lens, tensors), torch.float32)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "prefix_lm"])
def test_dropped_oldest_keys_are_never_visible(name):
    """k_start > 0 (a cache that dropped its oldest keys): positions below k_start do not
    exist, whatever the mask says; not multiples of the page or tile size."""
    kernel = _kernel(name)
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv = 2, 4, 2
    pc = Paged(B, Hkv, 4, capacity=40, dtype=torch.float32)
    for b, n in enumerate((9, 38)):
        pc.append(b, *_random_kv(g, Hkv, n, torch.float32))
    k_start = torch.tensor([3, 37], dtype=torch.int32)  # N_b = 12 and 75: tiles straddle k_start
    q_lens = torch.tensor([3, 2], dtype=torch.int32)
    q = torch.randn(B, Hq, 3, D, generator=g)
    q_start = k_start + pc.lens - q_lens
    got = kernel.paged(q, pc.k, pc.v, pc.table, pc.lens, k_start=k_start, q_lens=q_lens,
                       return_lse=True)
    _close(got, from_math(name, q, pc, k_start, q_start, q_lens, {}), torch.float32)
    if name == "sliding_window":  # the window hides the dropped keys: the full history agrees
        full = Paged(B, Hkv, 4, capacity=80, dtype=torch.float32)
        for b in range(B):
            history = torch.randn(Hkv, int(k_start[b]), D, generator=g)
            full.append(b, torch.cat([history, pc.rows(pc.k, b)], 1),
                        torch.cat([history, pc.rows(pc.v, b)], 1))
        zeros = torch.zeros(B, dtype=torch.int32)
        _close(got, contiguous(kernel, q, full, zeros, q_start, q_lens, {}), torch.float32)


def test_full_tiles_and_several_query_tiles():
    """Sequences long enough for unmasked key tiles (read without checks), one of them past a
    dropped prefix, and a prefill of more rows than one query tile."""
    kernel = _kernel("causal")
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv = 2, 2, 1
    pc = Paged(B, Hkv, 16, capacity=70, dtype=torch.float32)
    for b, n in enumerate((70, 60)):
        pc.append(b, *_random_kv(g, Hkv, n, torch.float32))
    k_start = torch.tensor([0, 40], dtype=torch.int32)
    q_lens = torch.tensor([40, 3], dtype=torch.int32)
    q = torch.randn(B, Hq, 40, D, generator=g)
    got = kernel.paged(q, pc.k, pc.v, pc.table, pc.lens, k_start=k_start, q_lens=q_lens,
                       return_lse=True)
    q_start = k_start + pc.lens - q_lens
    _close(got, from_math("causal", q, pc, k_start, q_start, q_lens, {}), torch.float32)


def test_left_padding_and_padding_rows():
    """k_start < 0: the first -k_start rows are padding keys (never visible); padding query
    rows (past q_lens, or at a position < 0 or >= N_b) give out 0 and lse -inf; a sequence
    with no keys gives all padding."""
    kernel = _kernel("causal")
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv = 3, 2, 1
    pc = Paged(B, Hkv, 5, capacity=12, dtype=torch.float32)
    for b, n in enumerate((7, 12, 0)):
        pc.append(b, *_random_kv(g, Hkv, n, torch.float32))
    k_start = torch.tensor([-3, 0, 0], dtype=torch.int32)
    q_lens = torch.tensor([4, 2, 0], dtype=torch.int32)
    q_start = torch.tensor([-1, 10, 0], dtype=torch.int32)  # row 0 of sequence 0 is at -1
    q = torch.randn(B, Hq, 4, D, generator=g)
    out, lse = kernel.paged(q, pc.k, pc.v, pc.table, pc.lens, k_start=k_start, q_start=q_start,
                            q_lens=q_lens, return_lse=True)
    _close((out, lse), contiguous(kernel, q, pc, k_start, q_start, q_lens, {}), torch.float32)
    _close((out, lse), from_math("causal", q, pc, k_start, q_start, q_lens, {}), torch.float32)
    for b, i in ((0, 0), (1, 2), (1, 3), (2, 0), (2, 3)):
        assert torch.all(out[b, :, i] == 0) and torch.all(lse[b, :, i] == float("-inf"))
    assert torch.isfinite(out).all()


def test_bf16_and_contiguous_cache_view():
    """bf16 within its tolerance; a contiguous [B, Hkv, N, D] cache passed as its permuted
    view with page_table = arange(B)[:, None]."""
    kernel = _kernel("sliding_window")
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, N = 2, 4, 2, 13
    k = torch.randn(B, Hkv, N, D, generator=g).bfloat16()
    v = torch.randn(B, Hkv, N, D, generator=g).bfloat16()
    q = torch.randn(B, Hq, 2, D, generator=g).bfloat16()
    table = torch.arange(B, dtype=torch.int32)[:, None]
    lens = torch.tensor([13, 9], dtype=torch.int32)
    out = kernel.paged(q, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), table, lens)
    assert out.dtype == torch.bfloat16
    for b in range(B):
        n = int(lens[b])
        qf = torch.zeros(1, Hq, n, D, dtype=torch.bfloat16)
        qf[0, :, n - 2:] = q[b]
        ref = kernel(qf, k[b:b + 1, :, :n], v[b:b + 1, :, :n])[0, :, n - 2:]
        err = (out[b].float() - ref.float()).abs().max().item()
        assert err <= 2e-2 * max(1.0, ref.float().abs().max().item()), err


MLA_PLAIN = """attention mla_plain {
  operand qr[m], kr[n]
  v = k
  score = (dot(q, k) + dot(qr, kr)) * scale
  mask = n <= m
}"""


def test_mla_operands_value_alias_and_applied_prologues():
    """A latent cache as k (v = k), a rope key cache kr with one head read through the same
    table, the query-side qr; the library's mla spec (rope prologues) with
    prologues_applied=True runs the same kernel and ignores the positions it no longer needs."""
    plain = attnc.compile(MLA_PLAIN)
    g = torch.Generator().manual_seed(5)
    B, Hq, Dr, page_size = 2, 4, 8, 4
    pc = Paged(B, 1, page_size, capacity=12, dtype=torch.float32)
    kr_cache = torch.full((pc.num_pages, page_size, 1, Dr), float("nan"))
    for b, n in enumerate((6, 11)):
        lat = torch.randn(1, n, D, generator=g)
        pc.append(b, lat, lat)
        rows = torch.arange(n)
        kr_cache[pc.table[b, rows // page_size].long(), rows % page_size] = \
            torch.randn(n, 1, Dr, generator=g)
    q = torch.randn(B, Hq, 2, D, generator=g)
    qr = torch.randn(B, Hq, 2, Dr, generator=g)
    out = plain.paged(q, pc.k, None, pc.table, pc.lens, qr=qr, kr=kr_cache, scale=0.3)
    for b in range(B):
        n = int(pc.lens[b])
        lat = pc.rows(pc.k, b)[None]
        r = torch.arange(n)
        kr = kr_cache[pc.table[b, r // page_size].long(), r % page_size].transpose(0, 1)[None]
        qf = torch.zeros(1, Hq, n, D)
        qrf = torch.zeros(1, Hq, n, Dr)
        qf[0, :, n - 2:], qrf[0, :, n - 2:] = q[b], qr[b]
        ref = plain(qf, lat, None, qr=qrf, kr=kr, scale=0.3)[0, :, n - 2:]
        assert (out[b] - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max().item())
    mla = attnc.load("mla")
    with pytest.raises(ValueError, match="prologues_applied"):
        mla.paged(q, pc.k, None, pc.table, pc.lens, qr=qr, kr=kr_cache, scale=0.3)
    same = mla.paged(q, pc.k, None, pc.table, pc.lens, qr=qr, kr=kr_cache, scale=0.3,
                     prologues_applied=True)
    assert torch.equal(same, out)
    with pytest.raises(ValueError, match="no v_cache"):
        plain.paged(q, pc.k, pc.v, pc.table, pc.lens, qr=qr, kr=kr_cache)


def test_value_from_an_operand_cache_shared_by_the_heads():
    """`v = vc`: the value comes from a declared key-side cache with one head that every K/V
    head reads, passed as a keyword (v_cache None), of another head dim than k."""
    kernel = attnc.compile("""attention vc_value {
  operand vc[n]
  v = vc
  mask = n <= m
}""")
    g = torch.Generator().manual_seed(8)
    B, Hq, Hkv, Dv = 2, 4, 2, 8
    pc = Paged(B, Hkv, 4, capacity=13, dtype=torch.float32, Dv=1)  # its v goes unused
    for b, n in enumerate((7, 13)):
        pc.append(b, torch.randn(Hkv, n, D, generator=g), torch.zeros(Hkv, n, 1))
    vc = torch.randn(pc.num_pages, 4, 1, Dv, generator=g)
    q = torch.randn(B, Hq, 2, D, generator=g)
    out = kernel.paged(q, pc.k, None, pc.table, pc.lens, vc=vc)
    for b in range(B):
        n = int(pc.lens[b])
        r = torch.arange(n)
        vs = vc[pc.table[b, r // 4].long(), r % 4].transpose(0, 1)[None].expand(1, Hkv, n, Dv)
        qf = torch.zeros(1, Hq, n, D)
        qf[0, :, n - 2:] = q[b]
        ref = kernel(qf, pc.rows(pc.k, b)[None], None, vc=vs.contiguous())[0, :, n - 2:]
        assert (out[b] - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max().item())


def _record_paths(monkeypatch) -> list[dict]:
    """The PACKED and ONE_PAGE values of every paged launch from now on (PACKED None: the
    kernel cannot pack, its module has no such parameter)."""
    seen: list[dict] = []
    launch = KernelModule.launch

    def spy(self, role, values, grid=None, options=None):
        if role == "paged":
            seen.append({n: values.get(Bind(n)) for n in ("PACKED", "ONE_PAGE")})
        return launch(self, role, values, grid, options)
    monkeypatch.setattr(KernelModule, "launch", spy)
    return seen


# (spec, page size, query rows per sequence, one table read per tile, packed): key tiles of 16
# (block_n=16), GQA groups of 4; 12 rows x 4 heads take two query tiles of 32 rows (the
# second starts inside a head's rows and wraps into the next's); 33 x 4 exceed
# launch.PACKED_ROWS
PATHS = [("causal", 16, 1, True, True), ("causal", 32, 6, True, True),
         ("causal", 16, 12, True, True), ("sliding_window", 5, 12, False, True),
         ("causal", 5, 6, False, True), ("sliding_window", 16, 6, True, True),
         ("sliding_window", 32, 1, True, True), ("sliding_window", 5, 1, False, True),
         ("causal", 16, 33, True, False), ("full", 5, 33, False, False),
         ("alibi", 16, 6, True, None), ("alibi", 5, 1, False, None)]


@pytest.mark.parametrize("name,page_size,M,one_page,packed", PATHS)
def test_launch_paths_match_the_references(monkeypatch, name, page_size, M, one_page, packed):
    """Each path of the launch -- a GQA group's heads packed into a program's rows or one
    program per head, one table read per key tile (page_size a multiple of the key tile) or
    one per key -- equals both references, for decoding (M = 1) and a prefill of ragged
    q_lens over cached prefixes, with several key tiles per sequence. ALiBi reads the query
    head, so it never packs."""
    kernel = attnc.load(name, block_n=16, **SPECS[name][0])
    paths = _record_paths(monkeypatch)
    B, Hq, Hkv = 2, 8, 2
    tensors = _tensors(name, Hq)
    g = torch.Generator().manual_seed(page_size + M)
    pc = Paged(B, Hkv, page_size, capacity=80, dtype=torch.float32, seed=M)
    for b, n in enumerate((37, 70)):
        pc.append(b, *_random_kv(g, Hkv, n, torch.float32))
    q_lens = torch.tensor([M, max(M - 2, 1)], dtype=torch.int32)
    q = torch.randn(B, Hq, M, D, generator=g)
    got = kernel.paged(q, pc.k, pc.v, pc.table, pc.lens, q_lens=q_lens, return_lse=True,
                       **tensors)
    assert paths == [{"PACKED": packed, "ONE_PAGE": one_page}]
    zeros = torch.zeros(B, dtype=torch.int32)
    q_start = pc.lens - q_lens
    _close(got, contiguous(kernel, q, pc, zeros, q_start, q_lens, tensors), torch.float32)
    _close(got, from_math(name, q, pc, zeros, q_start, q_lens, tensors), torch.float32)


@pytest.mark.parametrize("k_start,one_page", [((16, 32), True), ((0, 3), False)])
def test_one_page_reads_need_aligned_k_start(monkeypatch, k_start, one_page):
    """A CPU k_start whose entries are all multiples of the key tile keeps one table read per
    tile (rows still start at a page boundary); one that is not falls back to a read per key;
    both equal the math reference, packed."""
    kernel = attnc.load("sliding_window", block_n=16, window=5)
    paths = _record_paths(monkeypatch)
    B, Hq, Hkv = 2, 8, 2
    g = torch.Generator().manual_seed(9)
    pc = Paged(B, Hkv, 16, capacity=60, dtype=torch.float32)
    for b, n in enumerate((20, 57)):
        pc.append(b, *_random_kv(g, Hkv, n, torch.float32))
    starts = torch.tensor(k_start, dtype=torch.int32)
    q_lens = torch.tensor([3, 2], dtype=torch.int32)
    q = torch.randn(B, Hq, 3, D, generator=g)
    got = kernel.paged(q, pc.k, pc.v, pc.table, pc.lens, k_start=starts, q_lens=q_lens,
                       return_lse=True)
    assert paths == [{"PACKED": True, "ONE_PAGE": one_page}]
    q_start = starts + pc.lens - q_lens
    _close(got, from_math("sliding_window", q, pc, starts, q_start, q_lens, {}), torch.float32)


def _args(B=2, Hq=4, Hkv=2, M=1, page_size=4, num_pages=6, max_pages=3):
    q = torch.randn(B, Hq, M, D)
    kc = torch.randn(num_pages, page_size, Hkv, D)
    vc = torch.randn(num_pages, page_size, Hkv, D)
    table = torch.arange(B * max_pages, dtype=torch.int32).view(B, max_pages) % num_pages
    lens = torch.tensor([5, 9][:B], dtype=torch.int32)
    return q, kc, vc, table, lens


BAD = [
    ("page_table", lambda a: {**a, "page_table": a["page_table"].long()},
     "page_table must be int32"),
    ("page_table", lambda a: {**a, "page_table": a["page_table"][0]}, "page_table must be 2-D"),
    ("page_table", lambda a: {**a, "page_table": a["page_table"][:1]}, "page_table has 1 rows"),
    ("page_table", lambda a: {**a, "page_table": a["page_table"] + 4},
     r"page_table\[\d, \d\] = \d+ is out of range"),
    ("page_table", lambda a: {**a, "page_table": a["page_table"] - 1},
     r"page_table\[0, 0\] = -1 is out of range"),
    ("kv_lens", lambda a: {**a, "kv_lens": a["kv_lens"].long()}, "kv_lens must be int32"),
    ("kv_lens", lambda a: {**a, "kv_lens": a["kv_lens"][:1]}, r"kv_lens must have shape \[B\]"),
    ("kv_lens", lambda a: {**a, "kv_lens": -a["kv_lens"]}, "kv_lens has negative"),
    ("kv_lens", lambda a: {**a, "kv_lens": a["kv_lens"] + 4}, "reach beyond the page table"),
    ("q_lens", lambda a: {**a, "q_lens": torch.tensor([2, 1], dtype=torch.int32)},
     r"q_lens must be in \[0, M\]"),
    ("k_start", lambda a: {**a, "k_start": torch.zeros(2)}, "k_start must be int32"),
    ("v_cache", lambda a: {**a, "v_cache": a["v_cache"][:, :2]}, "v_cache has shape"),
    ("k_cache", lambda a: {**a, "k_cache": a["k_cache"].double()}, "k_cache has dtype"),
    ("k_cache", lambda a: {**a, "k_cache": torch.randn(6, 4, 3, D),
                           "v_cache": torch.randn(6, 4, 3, D)}, "multiple of k_cache heads"),
    ("k_cache", lambda a: {**a, "k_cache": a["k_cache"][..., :8]}, "k has head dim 8"),
    ("k_cache", lambda a: {**a, "k_cache": a["k_cache"][0]}, "k_cache must be 4-D"),
    ("v_cache", lambda a: {**a, "v_cache": None}, "v_cache is required"),
    ("return_lse", lambda a: {**a, "return_lse": 1}, "return_lse must be True or False"),
]


@pytest.mark.parametrize("what,change,message", BAD, ids=[f"{b[0]}-{i}" for i, b in
                                                          enumerate(BAD)])
def test_bad_arguments_raise_value_error(what, change, message):
    kernel = _kernel("causal")
    q, kc, vc, table, lens = _args()
    args = change(dict(q=q, k_cache=kc, v_cache=vc, page_table=table, kv_lens=lens))
    with pytest.raises(ValueError, match=message):
        kernel.paged(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                     args.pop("page_table"), args.pop("kv_lens"), **args)


def test_refusals():
    """Gradients, tensors sized by the sequence, gates, block-sparse kernels; other kernel
    families have no paged forward."""
    q, kc, vc, table, lens = _args()
    with pytest.raises(ValueError, match="forward only"):
        _kernel("causal").paged(q.requires_grad_(), kc, vc, table, lens)
    q = q.detach()
    with pytest.raises(ValueError, match="depends on M or N"):
        attnc.load("document").paged(q, kc, vc, table, lens, doc=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="a gate"):
        attnc.load("gated_heads").paged(q, kc, vc, table, lens)
    with pytest.raises(ValueError, match="block_sparse"):
        attnc.load("causal", block_sparse=True).paged(q, kc, vc, table, lens)
    with pytest.raises(ValueError, match="missing param 'slopes'"):
        _kernel("alibi").paged(q, kc, vc, table, lens)
    with pytest.raises(ValueError, match="unknown input"):
        _kernel("causal").paged(q, kc, vc, table, lens, slopes=torch.ones(4))
    with pytest.raises(ValueError, match="N >= kernel_size"):  # N_b = 5 for sequence 0
        attnc.load("neighborhood_1d", kernel_size=7).paged(q, kc, vc, table, lens)
    with pytest.raises(ValueError, match="gathered keys"):
        attnc.load("nsa_selected").paged(q, kc, vc, table, lens)
    for name in ("grouped", "gla", "token_topk", "head_mixing"):
        assert not hasattr(attnc.load(name), "paged"), name


def test_torch_compile_fullgraph():
    """kernel.paged is a custom op: a compiled function calling it has no graph break."""
    kernel = _kernel("causal")
    q, kc, vc, table, lens = _args()

    @torch.compile(fullgraph=True, backend="eager")
    def step(q, kc, vc, table, lens):
        return kernel.paged(q * 2, kc, vc, table, lens, return_lse=True)

    out, lse = step(q, kc, vc, table, lens)
    ref, ref_lse = kernel.paged(q * 2, kc, vc, table, lens, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
