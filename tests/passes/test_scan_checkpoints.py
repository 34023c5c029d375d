"""schedule: a scan along a stage's parallel rank is resumed from the checkpoints an earlier
stage stores while walking it (stick-breaking's dK and dV sum over m values that read scans
along n; a forgetting gate's dK, dV likewise). The stages still compute the cascade
(backends/reference/stages.py against the reference interpreter, float64, under a mask), and
a schedule that loses a checkpoint fails there."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attnc.backends.reference.cascade import intermediates, interpret
from attnc.backends.reference.stages import run_stages
from attnc.errors import CompileError
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.ir.cascade import Cascade, Order, Saved
from attnc.library import variant_path
from attnc.passes import pass_count, schedule
from attnc.pipeline import run_passes
from tests.normalizer_reference import stick_breaking
from tests.passes.test_schedule import _data

HEAD = """  mask = n < m
  QK[m, n] = Q[m, e] * K[n, e]
  S[m, n] = scale * QK[m, n]
"""
FORGETTING = """cascade forgetting {
  input logf[B, H, N]
  mask = n <= m
  QK[m, n] = Q[m, e] * K[n, e]
  F[m, n] = rcumsum(n) logf[b, h, n]
  D[m, n] = scale * QK[m, n] + F[m, n] - logf[b, h, n]
  GM[m] = max(n) D[m, n]
  E[m, n] = exp(D[m, n] - GM[m])
  Z[m] = sum(n) E[m, n]
  O[m, f] = sum(n) E[m, n] * V[n, f] / Z[m]
}
"""
# column sums of stick-breaking weights: no traversal over n computes R before Y needs it, so
# a stage of its own stores R's checkpoints (and writes nothing)
COLUMNS = "cascade columns {\n" + HEAD + """  R[m, n] = rcumsum(n) softplus(S[m, n])
  A[m, n] = sigmoid(S[m, n]) * exp(softplus(S[m, n]) - R[m, n])
  Y[n] = sum(m) A[m, n]
  O[m, f] = sum(n) A[m, n] * Y[n] * V[n, f]
}
"""
# a scan along m read by a sum over n of the same pass: its checkpoint stage (parallel n)
# comes first
ALONG_M = "cascade along_m {\n" + HEAD + """  C[m, n] = cumsum(m) softplus(S[m, n])
  O[m, f] = sum(n) exp(-C[m, n]) * V[n, f]
}
"""
NESTED = "cascade nested {\n" + HEAD + """  C[m, n] = cumsum(m) softplus(S[m, n])
  R[m, n] = rcumsum(n) C[m, n]
  Y[n] = sum(m) exp(-R[m, n])
  O[m, f] = sum(n) sigmoid(S[m, n]) * Y[n] * V[n, f]
}
"""
OPPOSITE = "cascade opposite {\n" + HEAD + """  C[m, n] = cumsum(n) softplus(S[m, n])
  R[m, n] = rcumsum(n) C[m, n]
  Y[n] = sum(m) exp(-R[m, n])
  O[m, f] = sum(n) sigmoid(S[m, n]) * Y[n] * V[n, f]
}
"""


def _trail(src: str, upto: str = "schedule"):
    return run_passes(lower(parse(src), src), upto=upto)


def _stick_breaking_src() -> str:
    path = variant_path("stick_breaking")
    assert path is not None
    return path.read_text()


def _layout(c: Cascade):
    return [(st.parallel, st.loop, st.order, st.checkpoints, st.resumes, st.writes)
            for st in c.stages]


def _backward_case(src: str, inputs=None, seed=3):
    """(backward before schedule, after it, operands, inputs, saved) for a cascade."""
    trail = _trail(src)
    fwd = trail[0][1]
    before = dict(_trail(src, "autodiff"))["autodiff"].backward
    after = trail[-1][1].backward
    assert before is not None and after is not None
    q, k, v, given = _data(fwd)
    given = inputs(q, k) if inputs else given
    g = torch.Generator().manual_seed(seed)
    forward = intermediates(trail[-1][1], q, k, v, inputs=given)
    saved = {before.saved_name(Saved.DOUT): torch.randn(
        forward[fwd.output("out")].shape, generator=g, dtype=torch.float64)}
    saved.update({decl: forward[t] for t, decl in before.residuals})
    return before.cascade, after.cascade, (q, k, v), given, saved


def _same_grads(before, after, qkv, inputs, saved):
    want = interpret(before, *qkv, inputs=inputs, saved=saved)
    got = run_stages(after, *qkv, inputs=inputs, saved=saved)
    for role in ("dq", "dk", "dv"):
        assert want[role].abs().max() > 0
        torch.testing.assert_close(got[role], want[role], rtol=1e-9, atol=1e-9)
    return got


def test_stick_breaking_now_has_a_backward_that_resumes_its_scans():
    c = _trail(_stick_breaking_src())[-1][1]
    assert isinstance(c, Cascade) and c.backward is not None and c.no_backward is None
    desc, asc = Order.DESCENDING, Order.ASCENDING
    assert _layout(c.backward.cascade) == [
        ("m", "n", desc, ("R",), (), ("dR_scan_total",)),
        ("n", "m", asc, (), ("R",), ("dV",)),
        ("m", "n", desc, ("dR_scan_rcumsum",), (), ("dQ",)),
        ("n", "m", asc, (), ("R", "dR_scan_rcumsum"), ("dK",))]
    # checkpoints are kernel scratch, never tensors of the cascade's memory
    assert not {"R", "dR_scan_rcumsum"} & {x for st in c.backward.cascade.stages
                                           for x in st.reads + st.writes}


def test_stick_breaking_backward_stages_compute_the_gradients():
    before, after, qkv, inputs, saved = _backward_case(_stick_breaking_src())
    got = _same_grads(before, after, qkv, inputs, saved)
    q, k, v = (x.clone().requires_grad_(True) for x in qkv)
    ref, _ = stick_breaking(q, k, v)
    (ref * next(iter(saved.values()))).sum().backward()
    for role, x in (("dq", q), ("dk", k), ("dv", v)):
        torch.testing.assert_close(got[role], x.grad, rtol=1e-9, atol=1e-9)


def _logf(q, k):
    g = torch.Generator().manual_seed(7)
    B, H, N = q.shape[0], q.shape[1], k.shape[2]
    return {"logf": torch.nn.functional.logsigmoid(
        torch.randn(B, H, N, generator=g, dtype=torch.float64) + 2)}


def test_a_forgetting_gate_forward_and_backward():
    trail = _trail(FORGETTING)
    fwd, c = trail[0][1], trail[-1][1]
    q, k, v, _ = _data(fwd)
    inputs = _logf(q, k)
    torch.testing.assert_close(run_stages(c, q, k, v, inputs=inputs)["out"],
                               interpret(fwd, q, k, v, inputs=inputs)["out"],
                               rtol=1e-9, atol=1e-9)
    before, after, qkv, inputs, saved = _backward_case(FORGETTING, _logf)
    assert [(st.checkpoints, st.resumes) for st in after.stages] == [
        (("F",), ()), ((), ("F",))]
    got = _same_grads(before, after, qkv, inputs, saved)
    # against autograd of the forgetting transformer: s = q.k*scale + sum of logf over (n, m]
    q, k, v = (x.clone().requires_grad_(True) for x in qkv)
    M, N = q.shape[2], k.shape[2]
    cum = inputs["logf"].cumsum(-1)
    last = cum[..., torch.arange(M).clamp(max=N - 1)]
    s = q @ k.transpose(-1, -2).repeat_interleave(2, 1) * q.shape[-1] ** -0.5 \
        + last[..., :, None] - cum[..., None, :]
    s = s.masked_fill(torch.arange(N)[None, :] > torch.arange(M)[:, None], float("-inf"))
    out = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    (out * next(iter(saved.values()))).sum().backward()
    for role, x in (("dq", q), ("dk", k), ("dv", v)):
        torch.testing.assert_close(got[role], x.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("src, layout", [
    (COLUMNS, [("m", ("R",), (), ()), ("n", (), ("R",), ("Y",)), ("m", (), (), ("O",))]),
    (ALONG_M, [("n", ("C",), (), ()), ("m", (), ("C",), ("O",))]),
], ids=["own-stage", "same-pass-first"])
def test_a_checkpoint_stage_of_its_own_when_no_walk_computes_the_scan(src, layout):
    trail = _trail(src)
    before, after = trail[0][1], trail[-1][1]
    assert [(st.parallel, st.checkpoints, st.resumes, st.writes)
            for st in after.stages] == layout
    q, k, v, inputs = _data(before)
    torch.testing.assert_close(run_stages(after, q, k, v)["out"],
                               interpret(before, q, k, v)["out"], rtol=1e-9, atol=1e-9)
    assert pass_count.summary(before).endswith(
        f"; {len(layout)} kernel(s) (resuming {layout[1][2][0]} from checkpoints)")


@pytest.mark.parametrize("src, reason, tensor", [
    (NESTED, "which reads the scan C along m", "Y"),
    (OPPOSITE, "scan C of the opposite direction", "R"),
], ids=["reads-a-scan-along-the-loop", "opposite-walks"])
def test_scans_that_cannot_be_resumed_are_refused(src, reason, tensor):
    c = _trail(src, "autodiff")[-1][1]
    with pytest.raises(CompileError, match=reason) as caught:
        schedule.run(c)
    assert caught.value.tensor == tensor


def test_a_schedule_that_loses_a_checkpoint_or_a_resume_fails_the_oracle():
    _, after, qkv, inputs, saved = _backward_case(_stick_breaking_src())
    stages = list(after.stages)
    lost = replace(after, stages=(replace(stages[0], checkpoints=()), *stages[1:]))
    with pytest.raises(AssertionError, match="resumes"):
        run_stages(lost, *qkv, inputs=inputs, saved=saved)
    unmarked = replace(after, stages=(stages[0], replace(stages[1], resumes=()), *stages[2:]))
    with pytest.raises(AssertionError, match="the loop is m"):
        run_stages(unmarked, *qkv, inputs=inputs, saved=saved)
