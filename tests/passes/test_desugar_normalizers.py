"""desugar's general cascades: every normalizer, weight and sink, evaluated by the reference
interpreter (float64), against torch code written from the math of each normalizer.

Plain softmax keeps its 3-pass cascade (the golden dumps pin it); everything else is a general
cascade that masks through `Cascade.mask` and divides late.
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn.functional as F

from attnc.backends.reference.cascade import interpret
from attnc.ir.cascade import Cascade, Einsum, Normalizer, Reduce, reads, verify
from attnc.passes import desugar
from attnc.pipeline import frontend, read_spec

B, H, M, N, D, DV = 1, 2, 5, 7, 4, 3
SCALE = 0.5
# causal (every row sees a key), a band whose first row sees none, and no mask
MASKS = {"causal": "n <= m", "empty_row": "n < m", "none": None}
POINTWISE = {"sigmoid": torch.sigmoid, "softplus": F.softplus, "relu": torch.relu,
             "relu2": lambda x: torch.relu(x) ** 2, "none": lambda x: x}


def _desugar(text: str) -> Cascade:
    spec = frontend(read_spec(text))[1]
    c = desugar.run(spec)
    verify(c)
    return c


def _spec(normalize: str | None = None, mask: str | None = None, weight: str | None = None,
          sink: str | None = None, params: str = "") -> str:
    lines = ["attention t {"] + ([f"  param {params}"] if params else [])
    lines += [f"  mask = {mask}"] * (mask is not None)
    lines += [f"  normalize = {normalize}"] * (normalize is not None)
    lines += [f"  weight = {weight}"] * (weight is not None)
    lines += [f"  sink = {sink}"] * (sink is not None)
    return "\n".join(lines) + "\n}\n"


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (M, N))
    v = torch.randn(B, H, N, DV, generator=g, dtype=torch.float64)
    extra = {"sinks": torch.randn(H, generator=g, dtype=torch.float64),
             "wb": torch.randn(H, generator=g, dtype=torch.float64)}
    return q, k, v, extra


def _visible(mask: str | None) -> torch.Tensor:
    m = torch.arange(M)[:, None]
    n = torch.arange(N)[None, :]
    if mask is None:
        return torch.ones(M, N, dtype=torch.bool)
    return {"n <= m": n <= m, "n < m": n < m}[mask]


def _run(c: Cascade, q, k, v, extra):
    return interpret(c, q, k, v, scale=SCALE, inputs=extra)


def _scores(q, k):
    return q @ k.transpose(-1, -2) * SCALE


def _check(c, got_out, want_out, got_lse=None, want_lse=None):
    assert not torch.isnan(got_out).any()
    torch.testing.assert_close(got_out, want_out, rtol=1e-9, atol=1e-9)
    if want_lse is not None:
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-9, atol=1e-9)


# --- references, written from the math ---------------------------------------------------------

def ref_l1(s, vis, fn, v, weight=1.0):
    w = fn(s).masked_fill(~vis, 0)
    z = w.sum(-1, keepdim=True)
    out = (w * weight) @ v / z
    return torch.where(z == 0, torch.zeros_like(out), out)


def ref_mean(s, vis, fn, v, weight=1.0):
    count = vis.sum(-1, keepdim=True).to(s.dtype)
    out = (fn(s).masked_fill(~vis, 0) * weight) @ v / count
    return torch.where(count == 0, torch.zeros_like(out), out)


def ref_softmax(s, vis, v, weight=1.0, sink=None):
    """softmax over the visible keys (and the sink logit, when given); out = (p * weight) v."""
    logits = s.masked_fill(~vis, -math.inf)
    if sink is not None:
        logits = torch.cat([logits, sink.view(1, H, 1, 1).expand(B, H, M, 1)], dim=-1)
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)[..., :N]
    return (p * weight) @ v, lse


def ref_standardize(s, vis, v):
    count = vis.sum(-1, keepdim=True).to(s.dtype)
    mu = s.masked_fill(~vis, 0).sum(-1, keepdim=True) / count
    var = ((s - mu) ** 2).masked_fill(~vis, 0).sum(-1, keepdim=True) / count
    w = ((s - mu) / torch.sqrt(var + 1e-6)).masked_fill(~vis, 0)
    out = w @ v
    return torch.where(count == 0, torch.zeros_like(out), out)


def ref_sinkhorn(s, vis, v, k):
    e = torch.exp(s).masked_fill(~vis, 0)
    for _ in range(k):
        rows = e.sum(-1, keepdim=True)
        e = torch.where(rows == 0, torch.zeros_like(e), e / rows)
        cols = e.sum(-2, keepdim=True)
        e = torch.where(cols == 0, torch.zeros_like(e), e / cols)
    return e @ v


# --- the cascades' forms -------------------------------------------------------------------------

def test_plain_softmax_keeps_the_three_pass_cascade():
    for text in (_spec(mask="n <= m"), _spec("softmax", mask="n <= m")):
        c = _desugar(text)
        assert c.mask is None and c.mask_node is not None
        assert [nd.name for nd in c.nodes] == ["QK", "S", "SM", "GM", "SN", "SD", "A", "AV",
                                               "O", "LSE"]


@pytest.mark.parametrize("normalize", ["sigmoid", "l1(relu)", "mean(softplus)", "standardize",
                                       "sinkhorn(2)"])
def test_general_cascades_mask_through_cascade_mask(normalize):
    c = _desugar(_spec(normalize, mask="n <= m"))
    assert c.mask is not None and c.mask_node is None
    assert not any(isinstance(nd, Einsum) and nd.expr.has(-sympy.oo) and nd.ranks == ("m", "n")
                   for nd in c.nodes), "no where(mask, s, -oo) einsum"
    assert c.outputs == (("out", "O"),)


def test_late_division_reads_no_row_total_inside_a_sum():
    """One pass: no sum over n reads a sum over n of the same rows (a second pass)."""
    weighted = {"weight": "wb[h] * n", "params": "wb[H]"}
    for normalize, extra in (("l1(sigmoid)", weighted), ("mean(relu)", weighted),
                             ("softmax", weighted), ("standardize", {})):
        c = _desugar(_spec(normalize, mask="n <= m", **extra))
        sums = [nd for nd in c.nodes if isinstance(nd, Einsum) and nd.over == ("n",)]
        totals = {nd.name for nd in sums if nd.reduce is Reduce.SUM}
        for nd in sums:
            read = set(reads(nd))
            # a sum over n may read (besides [m, n] maps of the score) only the row's max
            assert not read & totals, (normalize, str(nd))
            assert not any(_reads_total(c, name, totals) for name in read), (normalize, str(nd))


def _reads_total(c: Cascade, name: str, totals: set[str]) -> bool:
    """Whether tensor `name` depends on one of `totals`."""
    if name in totals:
        return True
    try:
        nd = c.einsum(name)
    except KeyError:
        return False
    return any(_reads_total(c, src, totals) for src in reads(nd))


def test_softmax_with_weight_or_sink_is_stabilized_by_its_max():
    c = _desugar(_spec(mask="n <= m", sink="sinks[h]", params="sinks[H]"))
    gm = c.einsum("GM")
    assert gm.reduce is Reduce.MAX and gm.over == ("n",)
    assert str(c.einsum("SN").expr) == "exp(-GM[m] + S[m, n])"
    assert dict(c.outputs) == {"out": "O", "lse": "LSE"}


def test_new_names_avoid_declared_tensors():
    c = _desugar("attention t {\n  param GM[H], SN[H], LR1[H], W[H]\n"
                 "  score = dot(q, k) + GM[h] + SN[h] + LR1[h]\n"
                 "  weight = W[h]\n  normalize = softmax\n}\n")
    names = [nd.name for nd in c.nodes]
    assert "GM_1" in names and "SN_1" in names and "W_1" in names
    c = _desugar("attention t {\n  param LR1[H], GC1[H]\n  score = dot(q, k) + LR1[h] + GC1[h]\n"
                 "  normalize = sinkhorn(1)\n}\n")
    assert {"LR1_1", "GC1_1"} <= {nd.name for nd in c.nodes}


def test_statement_origins_move_to_their_nodes():
    text = ("attention t {\n"
            "  param sinks[H]\n"
            "  score = dot(q, k) * 0.5\n"
            "  mask = n <= m\n"
            "  weight = sigmoid(dot(q, k))\n"
            "  sink = sinks[h]\n"
            "  normalize = softmax\n"
            "}\n")
    c = _desugar(text)
    where = {o.tensor: (o.line, o.column) for o in c.origins}
    assert where[""] == (1, 1) and where["S"] == (3, 3) and where["mask"] == (4, 3)
    assert where["W"] == (5, 3) and where["SK"] == (6, 3)
    assert where["GM"] == where["O"] == where["LSE"] == (7, 3)


# --- values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("fn", list(POINTWISE))
def test_pointwise(fn, mask):
    q, k, v, extra = _inputs()
    c = _desugar(_spec(fn, MASKS[mask]))
    s, vis = _scores(q, k), _visible(MASKS[mask])
    _check(c, _run(c, q, k, v, extra)["out"], POINTWISE[fn](s).masked_fill(~vis, 0) @ v)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("fn", ["sigmoid", "relu", "softplus"])
def test_l1_and_mean(fn, mask):
    q, k, v, extra = _inputs(1)
    s, vis = _scores(q, k), _visible(MASKS[mask])
    c = _desugar(_spec(f"l1({fn})", MASKS[mask]))
    _check(c, _run(c, q, k, v, extra)["out"], ref_l1(s, vis, POINTWISE[fn], v))
    c = _desugar(_spec(f"mean({fn})", MASKS[mask]))
    _check(c, _run(c, q, k, v, extra)["out"], ref_mean(s, vis, POINTWISE[fn], v))


def test_l1_of_a_row_that_sums_to_zero_gives_zero():
    q, k, v, extra = _inputs(2)
    c = _desugar(_spec("l1(relu)", "n <= m"))
    got = _run(c, -q.abs(), k.abs(), v, extra)["out"]  # every score <= 0: relu gives 0
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("mask", list(MASKS))
def test_weighted_pointwise_l1_and_mean(mask):
    q, k, v, extra = _inputs(3)
    s, vis = _scores(q, k), _visible(MASKS[mask])
    weight = torch.sigmoid(q @ k.transpose(-1, -2)) * extra["wb"].view(1, H, 1, 1)
    for normalize, want in (
            ("sigmoid", (torch.sigmoid(s).masked_fill(~vis, 0) * weight) @ v),
            ("l1(softplus)", ref_l1(s, vis, F.softplus, v, weight)),
            ("mean(relu2)", ref_mean(s, vis, POINTWISE["relu2"], v, weight))):
        c = _desugar(_spec(normalize, MASKS[mask], weight="sigmoid(dot(q, k)) * wb[h]",
                           params="wb[H]"))
        _check(c, _run(c, q, k, v, extra)["out"], want)


@pytest.mark.parametrize("mask", list(MASKS))
def test_softmax_with_weight(mask):
    q, k, v, extra = _inputs(4)
    s, vis = _scores(q, k), _visible(MASKS[mask])
    weight = torch.arange(N, dtype=torch.float64) / N
    c = _desugar(_spec(None, MASKS[mask], weight="n / N"))
    got = _run(c, q, k, v, extra)
    want, lse = ref_softmax(s, vis, v, weight=weight)
    _check(c, got["out"], want, got["lse"], lse)


@pytest.mark.parametrize("mask", list(MASKS))
def test_softmax_with_sink(mask):
    q, k, v, extra = _inputs(5)
    s, vis = _scores(q, k), _visible(MASKS[mask])
    c = _desugar(_spec("softmax", MASKS[mask], sink="sinks[h]", params="sinks[H]"))
    got = _run(c, q, k, v, extra)
    want, lse = ref_softmax(s, vis, v, sink=extra["sinks"])
    _check(c, got["out"], want, got["lse"], lse)
    if mask == "empty_row":  # a row that sees no key: out 0, lse the sink
        assert torch.equal(got["out"][:, :, 0], torch.zeros_like(got["out"][:, :, 0]))
        torch.testing.assert_close(got["lse"][0, :, 0], extra["sinks"])


def test_softmax_with_a_sink_far_above_the_scores_stays_finite():
    q, k, v, extra = _inputs(6)
    extra = dict(extra, sinks=torch.full((H,), 900.0, dtype=torch.float64))
    c = _desugar(_spec(None, "n <= m", sink="sinks[h]", params="sinks[H]"))
    got = _run(c, q, k, v, extra)
    want, lse = ref_softmax(_scores(q, k), _visible("n <= m"), v, sink=extra["sinks"])
    _check(c, got["out"], want, got["lse"], lse)


def test_softmax_with_weight_and_sink():
    q, k, v, extra = _inputs(7)
    s, vis = _scores(q, k), _visible("n < m")
    weight = torch.sigmoid(q @ k.transpose(-1, -2))
    c = _desugar(_spec(None, "n < m", weight="sigmoid(dot(q, k))", sink="sinks[h] - 1",
                       params="sinks[H]"))
    got = _run(c, q, k, v, extra)
    want, lse = ref_softmax(s, vis, v, weight=weight, sink=extra["sinks"] - 1)
    _check(c, got["out"], want, got["lse"], lse)


@pytest.mark.parametrize("mask", list(MASKS))
def test_standardize(mask):
    q, k, v, extra = _inputs(8)
    c = _desugar(_spec("standardize", MASKS[mask]))
    want = ref_standardize(_scores(q, k), _visible(MASKS[mask]), v)
    _check(c, _run(c, q, k, v, extra)["out"], want)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn(iterations, mask):
    q, k, v, extra = _inputs(9)
    c = _desugar(_spec(f"sinkhorn({iterations})", MASKS[mask]))
    assert c.einsum("GC1").over == ("m",) and c.einsum("GC1").ranks == ("n",)
    want = ref_sinkhorn(_scores(q, k), _visible(MASKS[mask]), v, iterations)
    _check(c, _run(c, q, k, v, extra)["out"], want)


def test_sinkhorn_takes_its_iterations_from_an_option():
    text = "attention t {\n  option iters = 2\n  normalize = sinkhorn(iters)\n}\n"
    spec = frontend(read_spec(text), {"iters": 4})[1]
    assert spec.normalize is Normalizer.SINKHORN and spec.iterations == 4
    c = desugar.run(spec)
    assert "LC4" in {nd.name for nd in c.nodes} and "LC5" not in {nd.name for nd in c.nodes}
