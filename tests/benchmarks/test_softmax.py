"""benchmarks.softmax: the quick run works end to end, and visible work is counted exactly."""

import sys

import pytest
import torch

from benchmarks import softmax


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _rows(text):
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| spec")]
    return [[c.strip() for c in row] for row in rows]


def test_quick_run_writes_a_passing_table(tmp_path):
    out = tmp_path / "r.md"
    status = softmax.main(["--quick", "--device", "cpu", "--lengths", "96", "--out", str(out),
                           "--specs", *softmax.SOFTMAX_SPECS])
    text = out.read_text()
    assert "## softmax" in text
    rows = _rows(text)
    labels = {row[0].split("(")[0] for row in rows}
    assert labels == set(softmax.SOFTMAX_SPECS)
    assert len(rows) == 2 * len(softmax.SOFTMAX_SPECS)  # fwd and bwd, one length, one head dim
    for row in rows:
        assert row[4] in ("fwd", "bwd")
        assert row[5].startswith("ok "), row        # attnc agrees with the fp32 reference
        assert float(row[6]) > 0 and float(row[7]) > 0  # attnc ms and TFLOP/s
    # eager flex runs every forward on a CPU, with the same result; its backward shows why not
    assert all(float(row[8]) > 0 for row in rows if row[4] == "fwd")
    assert "differs from the reference" not in text
    assert "FlexAttention has no backward on a CPU" in text
    assert status == 0


def test_quick_run_of_the_normalizers(tmp_path):
    """Every normalizer spec runs forward and backward and agrees with its eager weights; the
    peers (all softmax) say why they sit out."""
    out = tmp_path / "r.md"
    status = softmax.main(["--quick", "--device", "cpu", "--lengths", "40", "--out", str(out),
                           "--specs", *softmax.NORMALIZER_SPECS, "--peers", "flex", "sdpa"])
    text = out.read_text()
    rows = _rows(text)
    assert {row[0].split("(")[0] for row in rows} == set(softmax.NORMALIZER_SPECS)
    assert len(rows) == 2 * len(softmax.NORMALIZER_SPECS)
    for row in rows:
        assert row[5].startswith("ok "), row
        assert float(row[6]) > 0 and row[8].startswith("- ")
    assert "FlexAttention computes a softmax" in text and "SDPA computes a softmax" in text
    assert status == 0


@pytest.mark.parametrize("mask, N, pairs", [
    (causal, 10, 55),
    (lambda b, h, q, k: (q >= k) & (q - k < 3), 10, 1 + 2 + 3 * 8),     # window 3
    (lambda b, h, q, k: (q >= k) | (k < 4), 10, 4 * 4 + sum(range(5, 11))),  # prefix 4
    (lambda b, h, q, k: q < 0, 7, 0),                                     # nothing visible
    (lambda b, h, q, k: torch.tensor(True), 6, 36),                       # full, a 0-d mask
])
def test_visible_pairs_counts_exactly(mask, N, pairs):
    for slab in (1 << 24, 7, 1):  # one slab, several, and a row at a time
        assert softmax.visible_pairs(mask, 1, 1, N, N, "cpu", slab=slab) == pairs
    # same mask for every (batch, head): evaluated once, scaled by B * H
    assert softmax.visible_pairs(mask, 3, 2, N, N, "cpu", per_batch=False) == 6 * pairs


def test_visible_pairs_per_batch_and_head():
    doc = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])

    def document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])
    # batch 0: documents of 3 and 2 tokens (6 + 3 pairs); batch 1: 1 and 4 tokens (1 + 10)
    assert softmax.visible_pairs(document, 2, 1, 5, 5, "cpu") == 9 + 11
    assert softmax.visible_pairs(document, 2, 4, 5, 5, "cpu", slab=5) == 4 * 20
    window = torch.tensor([1, 2])

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window[h])
    assert softmax.visible_pairs(per_head, 1, 2, 4, 4, "cpu", per_head=True) == 4 + 7
    # M != N: causal is top-left aligned, query m sees keys 0..m
    assert softmax.visible_pairs(causal, 1, 1, 3, 8, "cpu") == 1 + 2 + 3


def test_flops_convention():
    assert softmax.flops(55, 8, "fwd") == 4 * 8 * 55
    assert softmax.flops(55, 8, "bwd") == 2.5 * 4 * 8 * 55


def test_failures_are_reported_not_raised(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(softmax, "TOLERANCE_CPU_FP32", 0.0)  # every check fails
    monkeypatch.setitem(softmax.RUNNERS, "sdpa", broken)
    out = tmp_path / "r.md"
    status = softmax.main(["--quick", "--device", "cpu", "--specs", "causal", "--lengths", "64",
                           "--modes", "fwd", "--peers", "sdpa", "--out", str(out)])
    text = out.read_text()
    assert status == 1
    assert "| FAIL " in text and "sdpa: RuntimeError: boom" in text


def _fake_flash_attn():
    """flash_attn's two entry points in eager torch, with its documented semantics ([B, N, H, D]
    layout, window_size=(left, right), alibi bias -slope * |i - j|, softcap on the scaled
    score), to run the flash peer's plumbing without a GPU."""
    import types

    def attend(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               softmax_scale=None):
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))  # [..., H, N, D]
        scale = softmax_scale or q.shape[-1] ** -0.5
        s = q @ k.transpose(-1, -2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(q.shape[-2]).view(-1, 1)
        j = torch.arange(k.shape[-2]).view(1, -1)
        if alibi_slopes is not None:
            s = s - alibi_slopes.view(-1, 1, 1) * (i - j).abs()
        seen = torch.ones_like(s, dtype=torch.bool)
        if causal:
            window_size = (window_size[0], 0)
        if window_size[0] >= 0:
            seen &= j >= i - window_size[0]
        if window_size[1] >= 0:
            seen &= j <= i + window_size[1]
        p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)
        return (p @ v).transpose(-3, -2)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
        return attend(q, k, v, causal, window_size, softcap, alibi_slopes, softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        cu = cu_q.tolist()
        return torch.cat([attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale=softmax_scale)
                          for a, b in zip(cu[:-1], cu[1:])])

    return types.SimpleNamespace(flash_attn_func=flash_attn_func,
                                 flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_peer_plumbing(tmp_path, monkeypatch):
    """Layouts, window, ALiBi sign, softcap and document packing agree with attnc's specs: a
    disagreement would leave a 'differs from the reference' footnote."""
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    out = tmp_path / "r.md"
    status = softmax.main(["--quick", "--device", "cpu", "--lengths", "40", "--window", "24",
                           "--batch", "2", "--peers", "flash", "--specs", "sliding_window",
                           "alibi", "softcap", "document", "--modes", "fwd", "--out", str(out)])
    text = out.read_text()
    assert status == 0
    assert "differs from the reference" not in text and "flash: " not in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 4 and all(float(row[9]) > 0 for row in rows)  # flash ms
