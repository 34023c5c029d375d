"""chunk_scan: each update lands in its algebraic class, perturbed updates fall back to the
recurrence with the reason, and the chunked form computes what the recurrence computes
(interpret(before) == interpret_chunked(after) on random float64 inputs)."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F

from attnc.backends.eager import linear as E
from attnc.backends.reference import linear as LT
from attnc.ir.linear import DV, LinearScan, format_scan, j
from attnc.library import variants
from attnc.passes import chunk_scan
from attnc.pipeline import frontend, read_spec

LINEAR = [n for n in variants() if isinstance(frontend(read_spec(n))[1], LinearScan)]

CLASSES = {
    "linear_attn": {"S": "additive", "z": "additive"},
    "based": {"S": "additive", "z": "additive"},
    "hedgehog": {"S": "additive", "z": "additive"},
    "retnet": {"S": "scalar_decay"},
    "lightning": {"S": "scalar_decay"},
    "simple_gla": {"S": "scalar_decay"},
    "mamba2_ssd": {"S": "scalar_decay"},
    "gla": {"S": "diagonal_decay"},
    "delta_net": {"S": "delta_rule"},
    "gated_delta_net": {"S": "gated_delta_rule"},
}


def scheduled(text_or_name: str) -> LinearScan:
    return chunk_scan.run(frontend(read_spec(text_or_name))[1])


def spec(update: str, output: str = "sum(i) q[i] * S[i, j]", extra: str = "") -> str:
    return (f"linear p {{\n  input g[b, h, t], gv[b, h, t, i], gj[b, h, t, j], beta[b, h, t]\n"
            f"{extra}  state S[i, j]\n  S[i, j] = {update}\n  o[j] = {output}\n}}\n")


def test_every_linear_library_spec_is_classified():
    assert set(LINEAR) == set(CLASSES) | {"flowformer"}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_library_classes(name):
    sch = scheduled(name).schedule
    assert sch.chunked, sch.reason
    assert {p.state: p.kind.value for p in sch.states} == CLASSES[name]


def test_class_details():
    gla = scheduled("gla").schedule.states[0]
    assert str(gla.log_decay) == "g[i]" and str(gla.key) == "k[i]" and str(gla.value) == "v[j]"
    mamba = scheduled("mamba2_ssd").schedule.states[0]
    assert mamba.log_decay == sympy.Symbol("A", real=True) * sympy.Symbol("dt", real=True)
    gdn = scheduled("gated_delta_net").schedule.states[0]
    assert str(gdn.beta) == "beta" and str(gdn.log_decay) == "g"
    la = scheduled("linear_attn").schedule
    assert len(la.readouts) == 2  # (elu(q) + 1) against S and against z: one readout each


@pytest.mark.parametrize("update, kind", [
    ("S[i, j] + k[i] * v[j]", "additive"),
    ("0.9 * S[i, j] + k[i] * v[j]", "scalar_decay"),
    ("exp(g) * S[i, j] + 2 * k[i] * sigmoid(v[j])", "scalar_decay"),
    ("exp(gv[i]) * S[i, j] + k[i] * v[j]", "diagonal_decay"),
    ("exp(g) * (S[i, j] + k[i] * v[j])", "scalar_decay"),
    ("S[i, j] - beta * k[i] * (sum(i) k[i] * S[i, j]) + beta * k[i] * v[j]", "delta_rule"),
    ("exp(g) * S[i, j] + beta * k[i] * (v[j] - exp(g) * sum(i) k[i] * S[i, j])",
     "gated_delta_rule"),
    ("where(t % 4 == 0, 0.5, 1) * S[i, j] + k[i] * v[j]", "scalar_decay"),
])
def test_update_classes(update, kind):
    sch = scheduled(spec(update)).schedule
    assert sch.chunked, sch.reason
    assert sch.states[0].kind.value == kind


@pytest.mark.parametrize("update, output, reason", [
    ("tanh(S[i, j] + k[i] * v[j])", None, "not linear in S"),
    ("S[i, j] * S[i, j] + k[i] * v[j]", None, "not linear in S"),
    ("S[i, j] + k[i] * v[j] + q[i] * sigmoid(v[j])", None, "not an outer product"),
    ("exp(gj[j]) * S[i, j] + k[i] * v[j]", None, "varies along the value axis j"),
    ("S[i, j] + beta * k[i] * (v[j] - sum(i) q[i] * S[i, j])", None, "not a * beta * w[i]"),
    ("S[i, j] + k[i] * sum(j) S[i, j]", None, "not a (gated) delta rule"),
    ("-S[i, j] + k[i] * v[j]", None, "not positive"),
    # a reset: log 0 has no place in the chunked form's summed log decays
    ("where(t % 4 == 0, 0, S[i, j]) + k[i] * v[j]", None, "not positive"),
    ("where(beta > 0.5, -1, 1) * S[i, j] + k[i] * v[j]", None, "not positive"),
    ("S[i, j] + k[i] * v[j]", "sum(i) q[i] * exp(S[i, j])", "the output reads a state"),
])
def test_perturbed_updates_fall_back_with_a_reason(update, output, reason):
    text = spec(update) if output is None else spec(update, output)
    sch = scheduled(text).schedule
    assert not sch.chunked
    assert reason in sch.reason
    assert reason in format_scan(scheduled(text))


def test_nested_sums_in_the_output_keep_their_sum_over_j():
    sch = scheduled(spec("S[i, j] + k[i] * v[j]",
                         "sum(i) q[i] * S[i, j] + sum(j) sum(i) q[i] * S[i, j]")).schedule
    assert sch.chunked and len(sch.readouts) == 1
    r = sch.readouts[0].symbol
    assert sympy.simplify(sch.output - (r + sympy.Sum(r, (j, 0, DV - 1)))) == 0


def test_coupled_states_fall_back():
    sch = scheduled("flowformer").schedule
    assert not sch.chunked and "reads state" in sch.reason


def _inputs(scan: LinearScan, B, H, T, D, gen) -> dict:
    """Random inputs shaped by the declarations: gates in log space, betas in (0, 1)."""
    out = {}
    for d in scan.decls:
        dims = [{"B": B, "H": H, "T": T, "DK": D, "D": D}.get(str(x), None) for x in d.dims]
        dims = [x if x is not None else int(dict(scan.options).get(sympy.Symbol(str(y)), 8))
                if not str(y).isdigit() else int(str(y)) for x, y in zip(dims, d.dims)]
        x = torch.randn(*dims, generator=gen, dtype=torch.float64)
        out[d.name] = {"g": F.logsigmoid(x), "dt": F.softplus(x) * 0.5, "beta": torch.sigmoid(x),
                       "A": -x.abs(), "W": 0.3 * x}.get(d.name, x)
    return out


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_chunked_form_equals_the_recurrence(name, chunk):
    scan = scheduled(name)
    gen = torch.Generator().manual_seed(7)
    B, H, T, D = 2, 3, 23, 6
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    if "delta" in name:
        k = F.normalize(k, dim=-1)
    if name == "based":
        q, k = q * 0.5, k * 0.5
    inputs = _inputs(scan, B, H, T, D, gen)
    dk = E.feature_dim(scan, q, inputs)
    init = {s.name: E.public_state(s, torch.randn(E.state_shape(s, B, H, dk, D),
                                                   generator=gen, dtype=torch.float64))
            for s in scan.states}
    for name_ in init:
        init[name_] = init[name_].abs() if name_ == "z" else init[name_]
    want, want_final = LT.interpret(scan, q, k, v, inputs, initial_state=init)
    got, got_final = LT.interpret_chunked(scan, q, k, v, inputs, initial_state=init, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for n in want_final:
        torch.testing.assert_close(got_final[n], want_final[n], rtol=1e-9, atol=1e-9)
