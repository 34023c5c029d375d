"""The compile-latency suite: real child processes on a tiny spec (times are not checked)."""

from __future__ import annotations

from benchmarks import compile_latency


def test_quick_run_measures_every_attnc_latency(tmp_path):
    out = tmp_path / "r.md"
    assert compile_latency.main(["--quick", "--device", "cpu", "--no-flex", "--length", "64",
                                 "--head-dim", "16", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## compile latency" in text
    row = next(line for line in text.splitlines() if line.startswith("| causal |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # spec -> source, attnc cold / warm / steady and the flex-API cold call are numbers
    for cell in cells[1:6]:
        assert float(cell) > 0
    assert cells[6:] == ["-", "-", "-", "-"]  # torch flex left out


def test_a_failing_child_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_latency, "CHILD", "raise SystemExit('no such kernel')")
    out = tmp_path / "r.md"
    assert compile_latency.main(["--quick", "--device", "cpu", "--no-flex", "--out",
                                 str(out)]) == 1
    assert "no such kernel" in out.read_text()
