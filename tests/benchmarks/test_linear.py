"""benchmarks.linear: the quick CPU run end to end, and the pieces its numbers rest on."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from attnc import ops
from benchmarks import linear
from tests import linear_reference as R


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear") / "results.md"
    code = linear.main(["--quick", "--device", "cpu", "--out", str(out)])
    return code, out.read_text()


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_quick_run_passes_and_writes_a_row_per_case(quick_run):
    code, text = quick_run
    assert code == 0
    assert "## linear" in text and "- command: `python -m benchmarks.linear --quick" in text
    rows = _rows(text)
    assert [(r[0], r[3]) for r in rows] == [(op, mode) for op in linear.OPS
                                            for mode in linear.MODES]
    for row in rows:
        assert row[1] == "16" and row[2] == "1x64"
        assert float(row[4]) > 0 and float(row[7]) > 0   # attnc time and throughput
        assert row[9].startswith("fp64 1x64 + ")
        err = float(row[10].split()[0])
        assert 0 <= err <= linear.TOLERANCE[torch.bfloat16] and row[11] == "ok"
    if importlib.util.find_spec("fla") is None:
        assert all(r[5].startswith("- [") and r[9].endswith("recurrent") for r in rows)
        assert "fla not usable: ModuleNotFoundError" in text


def test_tokens_per_second():
    assert linear.tokens_per_second(4, 2048, 2.0) == pytest.approx(4 * 2048 / 0.002)
    assert linear.tokens_per_second(1, 1000, 1000.0) == pytest.approx(1000.0)


@pytest.mark.parametrize("op", linear.OPS)
def test_eager_recurrence_matches_the_independent_references(op):
    torch.manual_seed(1)
    x = {n: t.double() for n, t in linear.make_inputs(op, 2, 9, 3, 4, "cpu",
                                                     torch.float32).items()}
    o, state = linear.eager_recurrence(op, **x)
    core = {n: R.from_fla(t) for n, t in x.items()}
    q, k = core["q"], core["k"]
    if "delta" in op:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    spec = {"gla": R.gla, "simple_gla": R.simple_gla, "delta_rule": R.delta_net,
            "gated_delta_rule": R.gated_delta_net, "retention": R.retnet}[op]
    extra = [core[n] for n in ("g", "beta") if n in core]
    want_o, want_state = spec(q, k, core["v"], *extra)
    torch.testing.assert_close(o, R.to_fla(want_o))
    torch.testing.assert_close(state, want_state["S"])


def test_eager_check_covers_gradients_and_catches_a_wrong_kernel():
    torch.manual_seed(2)
    x = linear.make_inputs("simple_gla", 1, 40, 2, 16, "cpu", torch.bfloat16)
    do = torch.randn(1, 40, 2, 16).bfloat16()
    got, errors = linear.check_against_eager(ops.chunk_simple_gla, "simple_gla", x, {},
                                             "fwdbwd", do, 1, 40)
    assert set(got) == {"o", "state", "dq", "dk", "dv", "dg"}
    assert set(errors) == {f"fp64 {n}" for n in ("o", "state", "dq", "dk", "dv", "dg")}
    assert max(errors.values()) < linear.TOLERANCE[torch.bfloat16]

    def wrong(g, **kw):   # gates twice as strong as the inputs say
        return ops.chunk_simple_gla(g=2 * g, **kw)
    _, errors = linear.check_against_eager(wrong, "simple_gla", x, {}, "fwd", do, 1, 40)
    assert errors["fp64 state"] > 0.1


def test_peer_path_with_a_stand_in_fla(tmp_path, monkeypatch):
    """fla is not installed here: stand-ins exercise the peer code the GPU run takes -- one
    that works (attnc's own function under fla's name) and one that raises."""
    import types

    def broken(**kw):
        raise RuntimeError("stand-in fla kernel failed")
    modules = {"fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"),
               "fla.ops.simple_gla": types.ModuleType("fla.ops.simple_gla"),
               "fla.ops.retention": types.ModuleType("fla.ops.retention")}
    modules["fla.ops.simple_gla"].chunk_simple_gla = ops.chunk_simple_gla
    modules["fla.ops.retention"].chunk_retention = broken
    for name, module in modules.items():
        monkeypatch.setitem(__import__("sys").modules, name, module)
    out = tmp_path / "results.md"
    assert linear.main(["--quick", "--device", "cpu", "--out", str(out), "--ops", "simple_gla",
                        "retention", "--modes", "fwdbwd"]) == 0
    text = out.read_text()
    gla, retention = _rows(text)
    assert gla[9] == "fp64 1x64 + fla" and float(gla[5]) > 0 and float(gla[6]) > 0
    assert retention[9] == "fp64 1x64 + recurrent" and retention[5].startswith("- [")
    assert "fla chunk_retention failed: RuntimeError: stand-in fla kernel failed" in text
