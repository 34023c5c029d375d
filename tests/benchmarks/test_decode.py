"""benchmarks.decode: the quick CPU run end to end (contiguous, paged, peers), the paged pools,
the sm_90 jobs and work estimate, and the byte and bandwidth counts."""

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
    # 40 keys: a partly filled last page
    assert decode.main(["--quick", "--device", "cpu", "--out", str(out), "--cache", "40",
                        "64"]) == 0
    text = out.read_text()
    assert "## decode" in text and "Measured copy bandwidth of this device: **" in text
    header = [line for line in text.splitlines() if line.startswith("| B |")][0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    for name in ("view (us)", "paged p16 (us)", "flex (us)", "paged p16/attnc", "sdpa/attnc"):
        assert name in cols
    rows = _rows(text)
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 40), (1, 64), (2, 40), (2, 64)]
    for row in rows:
        assert float(row[3]) > 0 and float(row[4]) > 0 and float(row[5]) > 0
        assert float(row[cols.index("view (us)")]) > 0
        assert float(row[cols.index("paged p16 (us)")]) > 0
        err, verdict = row[-1].split()  # the worst of the contiguous, view and paged outputs
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


def test_page_pools_hold_each_sequence_at_its_table():
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 37, 4)
    k_pool, v_pool, table = decode.page_pools(k, v, 16)
    assert k_pool.shape == (6, 16, 3, 8) and v_pool.shape == (6, 16, 3, 4)
    assert table.dtype == torch.int32 and sorted(table.flatten().tolist()) == list(range(6))
    assert table.tolist() != [[0, 1, 2], [3, 4, 5]]  # scattered, as after appends and frees
    for b in range(2):
        rows = k_pool[table[b].long()].flatten(0, 1)[:37].transpose(0, 1)
        assert torch.equal(rows, k[b])
        assert torch.equal(v_pool[table[b].long()].flatten(0, 1)[:37].transpose(0, 1), v[b])


def test_sm90_jobs_are_the_launchers_cuda_launches():
    import attnc
    kernel = attnc.load("full")
    [paged] = decode.paged_jobs(kernel, 16, 4096, 32, 8, 128, 16, torch.bfloat16)
    assert paged["function"].endswith("_paged") and paged["arch"] == 90
    assert paged["config"]["num_warps"] == 8 and paged["constexprs"]["UPCAST"] is False
    # a GQA group's 4 query heads packed in one program's rows: one program per (b, kv head)
    # walking all 4096 keys BLOCK_N at a time; pages of 16 are under a key tile (a table read
    # per key), pages of 128 hold whole tiles (a read per tile)
    assert paged["constexprs"]["PACKED"] is True and paged["constexprs"]["ONE_PAGE"] is False
    assert decode.loop_work(paged, 4096) == (16 * 8, 4096 / paged["constexprs"]["BLOCK_N"])
    [large] = decode.paged_jobs(kernel, 16, 4096, 32, 8, 128, 128, torch.bfloat16)
    assert large["constexprs"]["ONE_PAGE"] is True
    forward = [j for j in decode.contiguous_jobs(kernel, 1, 4096, 32, 8, 128, torch.bfloat16)
               if j["kernel"] == "forward"]
    programs, iterations = decode.loop_work(forward[0], 4096)
    splits = forward[0]["config"].get("kv_splits", 1)
    assert splits > 1 and iterations == 4096 / splits / forward[0]["constexprs"]["BLOCK_N"]


@pytest.mark.slow
def test_cpu_run_without_quick_compiles_for_sm90(tmp_path):
    out = tmp_path / "results.md"
    assert decode.main(["--device", "cpu", "--out", str(out), "--batches", "1",
                        "--cache", "4096", "--page-sizes", "16"]) == 0
    text = out.read_text()
    assert "No GPU: nothing timed" in text
    work = [r for r in _rows(text) if r[0] == "1"]
    assert [r[2] for r in work] == ["contiguous", "paged p16"]
    assert all(float(r[-1]) > 0 for r in work)
