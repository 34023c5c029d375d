"""benchmarks.decode: the quick CPU run end to end, and the byte and bandwidth counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import decode


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_quick_run_passes_and_writes_a_row_per_size(tmp_path):
    out = tmp_path / "results.md"
    assert decode.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## decode" in text and "Measured copy bandwidth of this device: **" in text
    header = [line for line in text.splitlines() if line.startswith("| B |")][0]
    assert "flex (us)" in header and "sdpa/attnc" in header
    rows = _rows(text)
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 64), (1, 192), (2, 64), (2, 192)]
    for row in rows:
        assert float(row[3]) > 0 and float(row[4]) > 0 and float(row[5]) > 0
        err, verdict = row[-1].split()
        assert float(err) <= decode.TOLERANCE[torch.bfloat16] and verdict == "ok"


def test_sizes_over_the_memory_share_are_skipped(tmp_path):
    out = tmp_path / "results.md"
    assert decode.main(["--quick", "--device", "cpu", "--out", str(out), "--flex", "off",
                        "--mem-fraction", "0", "--copy-mib", "1", "--batches", "1",
                        "--cache", "64"]) == 0
    text = out.read_text()
    row = _rows(text)[0]
    assert row[:2] == ["1", "64"] and row[3].startswith("skipped [")
    assert "exceed 0% of the free host memory" in text


def test_decode_bytes_counts_what_the_tensors_hold():
    B, Hq, Hkv, N, D = 3, 8, 2, 100, 32
    q = torch.empty(B, Hq, 1, D, dtype=torch.bfloat16)
    k = torch.empty(B, Hkv, N, D, dtype=torch.bfloat16)
    v = torch.empty(B, Hkv, N, D, dtype=torch.bfloat16)
    out = torch.empty(B, Hq, 1, D, dtype=torch.bfloat16)
    total = q.nbytes + k.nbytes + v.nbytes + out.nbytes
    assert decode.decode_bytes(B, Hq, Hkv, N, D, D, 2) == total
    assert decode.kv_cache_bytes(B, Hkv, N, D, D, 2) == k.nbytes + v.nbytes
    # the default GPU case, by hand: 64 x 8 x 128k x 128 x 2 (K and V) x 2 bytes + q + out
    assert decode.decode_bytes(64, 32, 8, 131072, 128, 128, 2) == \
        64 * 8 * 131072 * 128 * 2 * 2 + 2 * 64 * 32 * 128 * 2


def test_bandwidth_and_memory_share():
    assert decode.gb_per_second(2 * 10**9, 1000.0) == pytest.approx(2.0)
    assert decode.gb_per_second(3 * 10**6, 1.0) == pytest.approx(3.0)
    assert decode.fits(40, 100, 0.4) and not decode.fits(41, 100, 0.4)
    assert decode.fits(10**12, None, 0.4)


def test_reference_matches_sdpa_with_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(decode.reference(q, k, v), want)
