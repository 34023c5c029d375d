"""pass_count: passes over n and over m, the kernels a schedule needs, and the report `attnc
show --stage pass_count` prints (the counts after each later rewrite included)."""

from __future__ import annotations

from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.passes import desugar, online_rescale, pass_count
from attnc.pipeline import read_spec, show
from tests.passes.test_schedule import L1, SINKHORN, STANDARDIZE_RUNNING
from tests.specs import FUSEMAX_3PASS


def _cascade(src):
    return desugar.run(lower(parse(src), src))


def test_reductions_over_m_are_passes_too():
    c = _cascade(SINKHORN)
    assert (pass_count.count(c), pass_count.count(c, "m")) == (3, 2)
    p = pass_count.analyze(c)
    assert [p.level[t] for t in ("R1", "C1", "R2", "C2", "O")] == [1, 2, 3, 4, 5]


def test_a_stabilized_sum_shares_its_max_pass():
    c = online_rescale.run(_cascade(FUSEMAX_3PASS.replace(
        "}\n", "  X[m, f] = AV[m, f] * SD[m]\n}\n")))
    p = pass_count.analyze(c)
    assert p.level["GM"] == p.level["SD"] == p.level["AV_acc"] == 1
    assert pass_count.count(c) == 1


def test_independent_sums_share_a_pass():
    assert pass_count.count(_cascade(STANDARDIZE_RUNNING)) == 1


def test_the_report_shows_each_node_and_the_counts_after_each_rewrite():
    text = pass_count.report(_cascade(L1))
    lines = text.splitlines()
    assert lines[0].startswith("pass_count l1: 2 pass(es) over n, 0 over m; 2 kernel(s)")
    assert "    D        pass 1 over n" in lines
    assert "    A        pass 2" in lines
    assert lines[-2] == "after online_softmax: 2 pass(es) over n, 0 over m; 2 kernel(s)"
    assert lines[-1] == "after online_rescale: 1 pass(es) over n, 0 over m; 1 kernel(s)"


def test_the_softmax_report_ends_in_the_fused_kernel():
    text = show(read_spec("attention a {\n  mask = n <= m\n}\n"), "pass_count")
    assert text.splitlines()[-1] == ("after online_rescale: 1 pass(es) over n, 0 over m; "
                                     "1 kernel (the fused softmax)")
