"""Shared benchmark plumbing: results files keep one section per suite, tables, the runner."""

from __future__ import annotations

import types

import torch

from benchmarks import __main__ as runner
from benchmarks import common


def test_sections_are_replaced_and_kept(tmp_path):
    path = tmp_path / "r.md"
    common.write_section(path, "cpu", "softmax", "python -m x --a", "table one")
    common.write_section(path, "cpu", "decode", "python -m y", "table two")
    common.write_section(path, "cpu", "softmax", "python -m x --b", "table three")
    text = path.read_text()
    assert text.startswith("# attnc benchmarks: ")
    assert "torch " + torch.__version__ in text and "triton " in text
    assert text.count("## softmax") == 1 and text.count("## decode") == 1
    assert "table three" in text and "table one" not in text and "table two" in text
    assert "`python -m x --b`" in text and "--a" not in text


def test_table_and_formatting():
    text = common.table(["a", "b"], [["x", 1.5], ["y", "-"]])
    assert text.splitlines() == ["| a | b |", "|---|---:|", "| x | 1.5 |", "| y | - |"]
    assert common.fmt(None) == "-" and common.fmt(2.0, ".1f") == "2.0"
    assert common.device_slug("cpu") == "cpu"


def test_relative_error_and_footnotes():
    b = torch.tensor([3.0, 4.0])
    assert common.relative_error(torch.tensor([3.0, 5.0]), b) == 0.2
    assert common.relative_error(b, b) == 0.0
    assert abs(common.relative_error(torch.ones(2), torch.zeros(2)) - 2 ** 0.5) < 1e-12
    assert common.relative_error(torch.tensor([float("nan"), 4.0]), b) == float("inf")
    notes = common.Notes()
    assert [notes.mark("a"), notes.mark("b |x"), notes.mark("a")] == ["[1]", "[2]", "[1]"]
    assert notes.render() == "[1] a\n[2] b /x"
    assert common.reason(ValueError("bad\n  thing")) == "ValueError: bad thing"


def test_cpu_timing_is_a_median_of_runs():
    calls = []
    ms = common.bench(lambda: calls.append(1), "cpu", repeat=5)
    assert len(calls) == 6 and ms >= 0  # one warm-up, five timed


def test_runner_passes_flags_and_reports_failures(monkeypatch, capsys):
    seen = {}

    def fake(name, status):
        def main(argv):
            seen[name] = argv
            if status == "crash":
                raise RuntimeError("boom")
            return status
        return types.SimpleNamespace(main=main)
    modules = {"m.ok": fake("ok", 0), "m.bad": fake("bad", 1), "m.crash": fake("crash", "crash"),
               "m.mask": fake("mask", 0)}
    monkeypatch.setattr(runner, "SUITES", {"softmax": "m.ok", "linear": "m.bad",
                                           "decode": "m.crash", "block_mask": "m.mask"})
    monkeypatch.setattr(runner.importlib, "import_module", modules.__getitem__)
    status = runner.main(["--quick", "--device", "cpu", "--no-autotune", "--out", "r.md"])
    assert status == 1
    assert "failed: linear, decode" in capsys.readouterr().out
    assert seen["ok"] == ["--device", "cpu", "--out", "r.md", "--quick", "--no-autotune"]
    assert seen["mask"][:4] == ["--device", "cpu", "--out", "r.md"]
    assert "--quick" not in seen["mask"] and "--lengths" in seen["mask"]
    runner.main(["--short", "--suites", "softmax", "--device", "cuda"])
    assert seen["ok"] == ["--device", "cuda", *runner.SHORT["softmax"]]
