"""attnc.serving: a spec's prologues applied outside the kernel (equal to the rotation and
normalization written from the math, and to the kernel's own fused prologue), and the absorbed
MLA spec decoding from a paged latent cache, equal at every step to the regular `mla` kernel
over the whole contiguous sequence and to a naive (per-head up-projected) DeepSeek-style MLA."""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.serving import MLADecoder, apply_prologue


def turned(x, pos, theta=10000.0, dims=None, interleaved=False):
    """RoFormer's rotation from the formula: feature pair i of the first `dims` features (pairs
    (i, i + dims/2), or (2i, 2i + 1) interleaved) turned by pos · theta^(-2i/dims)."""
    R = x.shape[-1] if dims is None else dims
    out = x.double().clone()
    for i in range(R // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + R // 2)
        angle = pos.double() * theta ** (-2 * i / R)
        xa, xb = x[..., a].double(), x[..., b].double()
        out[..., a] = xa * angle.cos() - xb * angle.sin()
        out[..., b] = xb * angle.cos() + xa * angle.sin()
    return out.to(x.dtype)


def test_apply_prologue_matches_the_math():
    g = torch.Generator().manual_seed(0)
    mla = attnc.load("mla")
    qr = torch.randn(2, 3, 4, 8, generator=g)
    pos = torch.randint(0, 50, (2, 9), generator=g)
    start = torch.tensor([2, 5])
    rows = start[:, None] + torch.arange(4)  # the rows' own positions in pos_q
    expect = turned(qr, pos.gather(1, rows)[:, None], interleaved=True)
    torch.testing.assert_close(apply_prologue(mla, "qr", qr, start=start, pos_q=pos), expect)
    kr = torch.randn(1, 1, 3, 8, generator=g)
    torch.testing.assert_close(apply_prologue(mla, "kr", kr, start=6, pos_k=pos[:1]),
                               turned(kr, pos[:1, None, 6:], interleaved=True))
    assert apply_prologue(mla, "q", qr) is qr  # no prologue: x itself
    norm = attnc.load("qk_norm")
    k = torch.randn(2, 2, 5, 16, generator=g, dtype=torch.bfloat16)
    gain = torch.rand(16, generator=g) + 0.5
    unit = k.double() / torch.sqrt((k.double() ** 2).sum(-1, keepdim=True) + 1e-6) * gain
    out = apply_prologue(norm, "k", k, pos_k=pos[:, :5], gk=gain)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, turned(unit, pos[:, None, :5]).to(torch.bfloat16),
                               rtol=1.6e-2, atol=1e-2)


def test_apply_prologue_shifts_the_row_index_by_start():
    """A position written as the row index itself: rows start.. of x turn by start + i."""
    g = torch.Generator().manual_seed(4)
    spec = attnc.compile("""attention byrow {
      k = rope(k, n, 10000.0)
      q = rope(q, N - m, 10000.0)
      mask = n <= m
    }""")
    x = torch.randn(2, 1, 3, 8, generator=g)
    start = torch.tensor([6, 0])
    rows = (start[:, None] + torch.arange(3))[:, None]
    torch.testing.assert_close(apply_prologue(spec, "k", x, start=start), turned(x, rows))
    with pytest.raises(ValueError, match="the prologue of q reads N, which apply_prologue "
                                         "cannot know"):
        apply_prologue(spec, "q", x)


def test_apply_prologue_errors():
    mla = attnc.load("mla")
    x = torch.randn(1, 1, 3, 8)
    pos = torch.arange(3)[None]
    cases = [(lambda: apply_prologue(mla, "kq", x, pos_k=pos), "operand: mla has no operand"),
             (lambda: apply_prologue(mla, "kr", x), "pos_k: missing"),
             (lambda: apply_prologue(mla, "kr", x, pos_k=pos, w=pos), "unknown input 'w'"),
             (lambda: apply_prologue(mla, "kr", x, start=-1, pos_k=pos), "start must be"),
             (lambda: apply_prologue(mla, "kr", x, start=torch.tensor([0.5]), pos_k=pos),
              "start must be a"),
             (lambda: apply_prologue(mla, "kr", x, start=2, pos_k=pos), "does not cover"),
             (lambda: apply_prologue(mla, "kr", x[0], pos_k=pos), "x must be a 4-D"),
             (lambda: apply_prologue(object(), "kr", x), "kernel must be")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_applied_prologue_equals_the_fused_one():
    """Rotating outside (apply_prologue) then the plain causal kernel == the rope kernel."""
    g = torch.Generator().manual_seed(1)
    rope, causal = attnc.load("rope", rot=8), attnc.load("causal")
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    pos = torch.randperm(40, generator=g)[:12][None]
    fused = rope(q, k, v, pos_q=pos, pos_k=pos)
    outside = causal(apply_prologue(rope, "q", q, pos_q=pos),
                     apply_prologue(rope, "k", k, pos_k=pos), v)
    torch.testing.assert_close(outside, fused, rtol=1e-5, atol=1e-5)


H, DC, DR = 4, 32, 16


def random_step(g, T):
    """One sequence's T new rows: absorbed q [H, T, Dc], qr [H, T, Dr], latent c [T, Dc],
    rotary key kr [T, Dr] (unrotated)."""
    return {"q": torch.randn(H, T, DC, generator=g), "qr": torch.randn(H, T, DR, generator=g),
            "c": torch.randn(T, DC, generator=g), "kr": torch.randn(T, DR, generator=g)}


def test_mla_decoding_from_the_paged_latent_cache_equals_the_regular_kernel():
    """Two sequences of ragged prefills (3 and 6 rows, page size 4), a fork of the second, then
    single-token decode steps; every step's rows against attnc.load("mla") run on the whole
    contiguous sequence (its rope prologues inside the kernel)."""
    g = torch.Generator().manual_seed(2)
    mla = attnc.load("mla", block_m=16, block_n=16)
    dec = MLADecoder(16, 4, DC, DR, num_layers=1, kernel=mla)
    scale = 1 / math.sqrt(24.0)
    seqs = [dec.new_sequence(), dec.new_sequence()]
    history: dict[int, list[dict]] = {s: [] for s in seqs}

    def check(batch, out, T):
        for b, seq in enumerate(batch):
            h = {n: torch.cat([step[n] for step in history[seq]], 0 if n in ("c", "kr") else 1)
                 for n in ("q", "qr", "c", "kr")}
            N = h["c"].shape[0]
            pos = torch.arange(N)[None]
            ref = mla(h["q"][None], h["c"][None, None], qr=h["qr"][None],
                      kr=h["kr"][None, None], pos_q=pos, pos_k=pos, scale=scale)
            torch.testing.assert_close(out[b, :, :T[b]], ref[0, :, N - T[b]:], rtol=1e-5,
                                       atol=1e-5)

    prefill = [random_step(g, 3), random_step(g, 6)]
    q = torch.zeros(2, H, 6, DC)
    qr = torch.zeros(2, H, 6, DR)
    for b, (seq, new) in enumerate(zip(seqs, prefill)):
        dec.append(seq, 0, new["c"], new["kr"])
        q[b, :, :new["q"].shape[1]], qr[b, :, :new["q"].shape[1]] = new["q"], new["qr"]
        history[seq].append(new)
    out = dec.attend(0, seqs, q, qr, q_lens=torch.tensor([3, 6], dtype=torch.int32),
                     scale=scale)
    check(seqs, out, [3, 6])
    child = dec.fork(seqs[1])
    history[child] = list(history[seqs[1]])
    batch = seqs + [child]
    for _ in range(3):
        news = [random_step(g, 1) for _ in batch]
        for seq, new in zip(batch, news):
            history[seq].append(new)
        stacked = {n: torch.stack([new[n] for new in news]) for n in news[0]}
        out = dec.decode(0, batch, stacked["q"], stacked["qr"], stacked["c"], stacked["kr"],
                         scale=scale)
        check(batch, out, [1, 1, 1])


def test_mla_decode_step_equals_naive_deepseek_mla():
    """One decode step after a 7-token prefill against MLA as DeepSeek-V2 writes it: per head,
    keys [c W_uk[h] ; rope(kr)] and values c W_uv[h] up-projected from the latent, queries
    [x_nope ; rope(x_rope)], softmax(q k^T / sqrt(Dn + Dr)) v. The decoder gets the absorbed
    query x_nope W_uk[h]^T and up-projects its latent output with W_uv."""
    g = torch.Generator().manual_seed(3)
    Dn, Dv, N = 16, 16, 8
    w_uk = torch.randn(H, DC, Dn, generator=g) / math.sqrt(DC)
    w_uv = torch.randn(H, DC, Dv, generator=g) / math.sqrt(DC)
    c, kr = torch.randn(N, DC, generator=g), torch.randn(N, DR, generator=g)
    x_nope, x_rope = torch.randn(H, 1, Dn, generator=g), torch.randn(H, 1, DR, generator=g)
    scale = 1 / math.sqrt(Dn + DR)
    dec = MLADecoder(4, 4, DC, DR)
    seq = dec.new_sequence()
    dec.append(seq, 0, c[:N - 1], kr[:N - 1])
    q_abs = torch.einsum("hmd,hcd->hmc", x_nope, w_uk)
    latent = dec.decode(0, [seq], q_abs[None], x_rope[None], c[None, N - 1:], kr[None, N - 1:],
                        scale=scale)
    out = torch.einsum("hmc,hcd->hmd", latent[0], w_uv)
    pos = torch.arange(N)
    keys = torch.cat([torch.einsum("nc,hcd->hnd", c, w_uk),
                      turned(kr, pos, interleaved=True).expand(H, N, DR)], -1)
    query = torch.cat([x_nope, turned(x_rope, pos[N - 1:, None], interleaved=True)], -1)
    values = torch.einsum("nc,hcd->hnd", c, w_uv)
    naive = torch.softmax(query @ keys.transpose(-1, -2) * scale, -1) @ values
    torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-5)
