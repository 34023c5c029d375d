"""pass_count and online_softmax: FuseMax's 3-pass cascade becomes the 1-pass kernel, and the
text `cascade` and the equivalent `attention` block compile to the same kernel."""

from __future__ import annotations

from dataclasses import replace

from attnc.backends.triton.codegen import generate
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.cascade import OnlineSoftmax
from attnc.passes import desugar, online_softmax, pass_count
from attnc.pipeline import read_spec, run_passes, show
from tests.specs import FUSEMAX_3PASS

ATTENTION_EQUIVALENT = "attention attention_3pass {\n  score = dot(q, k)\n}\n"


def _cascade(src):
    return desugar.run(lower(parse(src), src))


def test_fusemax_cascade_needs_three_passes_then_one():
    c = _cascade(FUSEMAX_3PASS)
    assert pass_count.count(c) == 3
    rewritten = online_softmax.run(c)
    assert pass_count.count(rewritten) == 1
    assert sum(isinstance(nd, OnlineSoftmax) for nd in rewritten.nodes) == 1


def test_two_pass_form_with_late_division_is_rewritten_too():
    src = FUSEMAX_3PASS.replace("  A[m, n]  = SN[m, n] / SD[m]\n", "").replace(
        "AV[m, f] = sum(n) A[m, n] * V[n, f]", "AV[m, f] = sum(n) SN[m, n] * V[n, f]\n"
        "  O[m, f] = AV[m, f] / SD[m]")
    c = _cascade(src)
    assert pass_count.count(c) == 2
    assert pass_count.count(online_softmax.run(c)) == 1


def test_desugared_attention_counts_three_passes():
    src = "attention a {\n  mask = n <= m\n}\n"
    assert pass_count.count(_cascade(src)) == 3
    assert "# passes over n: 3" in show(read_spec(src), "desugar")
    assert "# passes over n: 1" in show(read_spec(src), "online_softmax")


def test_cascade_and_attention_block_compile_to_the_same_kernel():
    from_cascade = run_passes(lower(parse(FUSEMAX_3PASS), FUSEMAX_3PASS))[-1][1]
    from_block = run_passes(lower(parse(ATTENTION_EQUIVALENT), ATTENTION_EQUIVALENT))[-1][1]
    assert from_cascade == from_block
    assert generate(from_cascade).source == generate(from_block).source


def test_scaled_cascade_matches_the_default_score():
    scaled = FUSEMAX_3PASS.replace("Q[m, e] * K[n, e]", "Q[m, e] * K[n, e] * scale")
    a = run_passes(lower(parse(scaled), scaled))[-1][1]
    default = "attention attention_3pass {\n}\n"
    b = run_passes(lower(parse(default), default))[-1][1]
    assert a == b


def test_chain_read_elsewhere_is_not_rewritten():
    """If an intermediate (here SD) is also an output of another node, the chain stays."""
    src = FUSEMAX_3PASS.replace("}\n", "  X[m, f] = AV[m, f] * SD[m]\n}\n")
    c = _cascade(src)
    assert online_softmax.run(c) == c


def test_rewrite_is_pure():
    c = _cascade(FUSEMAX_3PASS)
    before = replace(c)
    online_softmax.run(c)
    assert c == before
