"""The compiled-kernels suite: stage kernels lowered for sm_90 by Triton's own ptxas, read
back with its cuobjdump (no GPU; the counts are not pinned, only that they were read)."""

from __future__ import annotations

from benchmarks import compiled


def test_quick_run_reads_every_kernels_registers_and_key_loop(tmp_path):
    out = tmp_path / "r.md"
    assert compiled.main(["--quick", "--device", "cpu", "--head-dim", "64", "--out",
                          str(out)]) == 0
    text = out.read_text()
    assert "## compiled kernels (sm_90), 64x64 tiles, head dim 64" in text
    rows = [line for line in text.splitlines() if line.startswith("| sigmoid_attn |")]
    assert [r.split("|")[2].strip() for r in rows] == ["forward1", "backward1", "backward2"]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2] == "1"  # one pass: K and V are read once
    spills = cells.pop(4)
    registers, shared, sass, loop, mufu, mma = map(int, cells[3:])
    assert 0 < registers <= 255 and 0 < loop < sass and mma > 0 and mufu > 0
    assert [int(b) >= 0 for b in spills.split("/")] == [True, True]  # store/load bytes
