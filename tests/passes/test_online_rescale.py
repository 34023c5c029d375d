"""online_rescale: late division and stabilizer marks keep a general cascade's meaning and cut
its passes; a softmax cascade (OnlineSoftmax) is left alone."""

from __future__ import annotations

import pytest
import torch

from attnc.backends.reference.cascade import interpret
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.passes import desugar, online_rescale, online_softmax, pass_count
from tests.passes.test_schedule import GROUPED, L1, SINK, SINKHORN, STANDARDIZE_NAIVE, _data
from tests.specs import FUSEMAX_3PASS

# A softmax that online_softmax leaves general (SD is read outside its chain)
SOFTMAX_KEPT = FUSEMAX_3PASS.replace("}\n", "  X[m, f] = AV[m, f] * SD[m]\n}\n")
L1_GUARDED = L1.replace("A[m, n] = W[m, n] / D[m]", "A[m, n] = where(D[m] == 0, 0, W[m, n] / D[m])")


def _general(src):
    return online_softmax.run(desugar.run(lower(parse(src), src)))


@pytest.mark.parametrize("src, before, after", [
    (L1, 2, 1), (L1_GUARDED, 2, 1), (SOFTMAX_KEPT, 3, 1), (SINK, 3, 1), (GROUPED, 3, 1),
    (STANDARDIZE_NAIVE, 3, 2), (SINKHORN, 3, 3),
], ids=["l1", "l1-guarded", "softmax", "sink", "grouped", "standardize", "sinkhorn"])
def test_rescaling_keeps_the_meaning_and_cuts_passes(src, before, after):
    c = _general(src)
    out = online_rescale.run(c)
    assert (pass_count.count(c), pass_count.count(out)) == (before, after)
    q, k, v, inputs = _data(c)
    torch.testing.assert_close(interpret(out, q, k, v, inputs=inputs)["out"],
                               interpret(c, q, k, v, inputs=inputs)["out"],
                               rtol=1e-9, atol=1e-9)


def test_late_division_keeps_the_user_names():
    out = online_rescale.run(_general(L1))
    assert str(out.einsum("O")) == "O[m, f] = O_acc[m, f]/D[m]"
    assert str(out.einsum("O_acc")) == "O_acc[m, f] = sum(n) V[n, f]*W[m, n]"
    assert out.output("out") == "O"


def test_sums_of_exp_minus_a_max_are_marked_with_it():
    out = online_rescale.run(_general(SOFTMAX_KEPT))
    assert out.einsum("SD").stabilizer == "GM"
    assert out.einsum("AV_acc").stabilizer == "GM"
    assert out.einsum("GM").stabilizer is None


def test_exp_factors_are_never_moved_out_of_a_sum():
    """sum(n) exp(x - GM) is the stable form; exp(-GM) * sum(n) exp(x) would overflow."""
    out = online_rescale.run(_general(SOFTMAX_KEPT))
    assert "GM" in str(out.einsum("SD").expr) or "SN" in str(out.einsum("SD").expr)
    assert not any(nd.name.startswith("SD_acc") for nd in out.nodes)


def test_grouped_normalization_gets_one_accumulator_per_group():
    out = online_rescale.run(_general(GROUPED))
    assert [nd.name for nd in out.nodes if nd.name.startswith("O_acc")] == ["O_acc", "O_acc_1"]
    assert str(out.einsum("O").expr) == "O_acc[m, f]/Z0[m] + O_acc_1[m, f]/Z1[m]"


def test_a_softmax_cascade_is_left_alone():
    c = _general(FUSEMAX_3PASS)
    assert online_rescale.run(c) is c
