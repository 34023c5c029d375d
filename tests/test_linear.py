"""Linear (state-update) kernels against the independent float64 recurrences of
tests/linear_reference.py: chunked and recurrent kernels, fp32 and bf16, T not a multiple of
the chunk, DV not a power of two, with and without an initial state, varlen packing against
per-sequence runs, one-step decoding, and gradients against autograd through the references.
On CPU the kernels run through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnc
import attnc.testing
from attnc.backends.eager import linear as E
from attnc.backends.reference import linear as LT
from attnc.ir.linear_kernel import ScanBackward
from tests import linear_reference as R

B, H, T, DK, DV = 2, 3, 37, 16, 24


def _inputs(gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen)
    return {
        "g": F.logsigmoid(rnd(B, H, T)),
        "gv": F.logsigmoid(rnd(B, H, T, DK)) / 4,
        "beta": torch.sigmoid(rnd(B, H, T)),
        "dt": F.softplus(rnd(B, H, T)) * 0.5,
        "A": -rnd(H).abs(),
        "D": rnd(H),
        "W": 0.3 * rnd(H, 8, 16),
    }


# name -> (reference, {kernel input: key in _inputs}, q/k transform, head dim of q and k)
SPECS = {
    "linear_attn": (R.linear_attn, {}, None, DK),
    "retnet": (R.retnet, {}, None, DK),
    "lightning": (R.lightning, {}, None, DK),
    "simple_gla": (R.simple_gla, {"g": "g"}, None, DK),
    "mamba2_ssd": (R.mamba2_ssd, {"dt": "dt", "A": "A", "D": "D"}, None, DK),
    "gla": (R.gla, {"g": "gv"}, None, DK),
    "delta_net": (R.delta_net, {"beta": "beta"}, "l2", DK),
    "gated_delta_net": (R.gated_delta_net, {"g": "g", "beta": "beta"}, "l2", DK),
    "based": (R.based, {}, "half", 4),
    "hedgehog": (R.hedgehog, {"W": "W"}, None, 8),
    "flowformer": (R.flowformer, {}, None, DK),
}
CHUNKED = [n for n in SPECS if n != "flowformer"]  # flowformer's states are coupled
KERNELS = [(n, a) for n in SPECS for a in ("chunked", "recurrent")
           if a == "recurrent" or n in CHUNKED]


def _case(name, dtype=torch.float32, seed=0, with_state=True):
    ref, names, transform, dk = SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, dk, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=gen)
    if transform == "l2":
        k = F.normalize(k, dim=-1)
    elif transform == "half":
        q, k = q * 0.5, k * 0.5
    q, k, v = (x.to(dtype) for x in (q, k, v))
    pool = _inputs(gen)
    inputs = {n: pool[key] for n, key in names.items()}
    kernel = attnc.load(name)
    init = None
    if with_state:  # states sized after the feature maps; positive, as normalizers are
        fdk = E.feature_dim(kernel.scan, q, inputs)
        init = {s.name: 0.3 * E.public_state(s, torch.randn(E.state_shape(s, B, H, fdk, DV),
                                                             generator=gen)).abs()
                for s in kernel.scan.states}
    return kernel, ref, q, k, v, inputs, init


def _per_step(x) -> bool:
    return tuple(x.shape[:3]) == (B, H, T)


def _as_dict(kernel, final):
    return final if isinstance(final, dict) else {kernel.states[0]: final}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype, with_state", [(torch.float32, True), (torch.float32, False),
                                               (torch.bfloat16, True)],
                         ids=["fp32", "fp32-zero-state", "bf16"])
@pytest.mark.parametrize("name, algorithm", KERNELS)
def test_forward_matches_the_naive_recurrence(name, algorithm, dtype, with_state):
    kernel, ref, q, k, v, inputs, init = _case(name, dtype, with_state=with_state)
    out, final = kernel(q, k, v, initial_state=init, output_final_state=True,
                        algorithm=algorithm, **inputs)
    want, want_final = ref(q, k, v, **inputs, initial_state=init)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (B, H, T, DV)
    assert _rel(out, want) < tol
    for n, x in _as_dict(kernel, final).items():
        assert x.dtype == torch.float32
        assert _rel(x, want_final[n]) < tol


@pytest.mark.parametrize("name, algorithm", KERNELS)
def test_gradients_match_autograd_through_the_reference(name, algorithm):
    kernel, ref, q, k, v, inputs, init = _case(name, seed=1)
    leaves = {"q": q, "k": k, "v": v, **inputs, **{f"init_{n}": x for n, x in init.items()}}
    run = {n: x.clone().requires_grad_() for n, x in leaves.items()}
    out, final = kernel(run["q"], run["k"], run["v"], algorithm=algorithm,
                        initial_state={n: run[f"init_{n}"] for n in init},
                        output_final_state=True, **{n: run[n] for n in inputs})
    final = _as_dict(kernel, final)
    gen = torch.Generator().manual_seed(2)
    d_out = torch.randn(out.shape, generator=gen)
    d_final = {n: torch.randn(x.shape, generator=gen) for n, x in final.items()}
    loss = (out * d_out).sum() + sum((final[n] * d_final[n]).sum() for n in final)
    got = torch.autograd.grad(loss, list(run.values()))
    ref_leaves = {n: x.double().requires_grad_() for n, x in leaves.items()}
    want_out, want_final = ref(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"],
                               **{n: ref_leaves[n] for n in inputs},
                               initial_state={n: ref_leaves[f"init_{n}"] for n in init})
    ref_loss = (want_out * d_out.double()).sum() + sum(
        (want_final[n] * d_final[n].double()).sum() for n in final)
    want = torch.autograd.grad(ref_loss, list(ref_leaves.values()))
    for n, a, b in zip(run, got, want):
        assert _rel(a, b) < 1e-4, n


@pytest.mark.parametrize("name, algorithm", [
    ("gla", "chunked"), ("gated_delta_net", "chunked"), ("linear_attn", "chunked"),
    ("gated_delta_net", "recurrent"), ("flowformer", "recurrent")])
def test_varlen_matches_per_sequence_runs(name, algorithm):
    kernel, _, q, k, v, inputs, init = _case(name)
    cu = torch.tensor([0, 5, 5, 22, T])  # an empty sequence too
    N = cu.numel() - 1
    gen = torch.Generator().manual_seed(3)
    init_n = {n: torch.randn((N,) + x.shape[1:], generator=gen).abs() * 0.3
              for n, x in init.items()}
    per_step = {n: x[:1] for n, x in inputs.items() if _per_step(x)}
    constant = {n: x for n, x in inputs.items() if not _per_step(x)}
    out, final = kernel(q[:1], k[:1], v[:1], cu_seqlens=cu, initial_state=init_n,
                        output_final_state=True, algorithm=algorithm, **per_step, **constant)
    final = _as_dict(kernel, final)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = {n: x[s:s + 1] for n, x in init_n.items()}
        o1, f1 = kernel(q[:1, :, a:b], k[:1, :, a:b], v[:1, :, a:b], initial_state=one,
                        output_final_state=True, algorithm=algorithm,
                        **{n: x[:, :, a:b] for n, x in per_step.items()}, **constant)
        torch.testing.assert_close(out[:, :, a:b], o1, rtol=1e-5, atol=1e-5)
        for n, x in _as_dict(kernel, f1).items():
            torch.testing.assert_close(final[n][s:s + 1], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(final[kernel.states[0]][1], init_n[kernel.states[0]][1])  # empty: as given


def test_varlen_gradients_match_per_sequence():
    kernel, _, q, k, v, inputs, _ = _case("gated_delta_net", with_state=False)
    cu = torch.tensor([0, 11, T])
    leaves = [x[:1].clone().requires_grad_() for x in (q, k, v, inputs["g"], inputs["beta"])]
    out = kernel(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    pieces = []
    for a, b in ((0, 11), (11, T)):
        part = [x.detach()[:, :, a:b].clone().requires_grad_() for x in leaves]
        o = kernel(*part[:3], g=part[3], beta=part[4])
        pieces.append(torch.autograd.grad(o.square().sum(), part))
    for n, g in enumerate(grads):
        torch.testing.assert_close(g, torch.cat([p[n] for p in pieces], dim=2), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["gated_delta_net", "gla", "flowformer"])
def test_decoding_one_step_at_a_time(name):
    kernel, _, q, k, v, inputs, init = _case(name)
    full, full_final = kernel(q, k, v, initial_state=init, output_final_state=True,
                              algorithm="recurrent", **inputs)
    state, steps = init, []
    for t in range(T):
        step = {n: (x[:, :, t:t + 1] if _per_step(x) else x) for n, x in inputs.items()}
        o, state = kernel(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                          initial_state=state, output_final_state=True, algorithm="recurrent",
                          **step)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-5, atol=1e-5)
    for n, x in _as_dict(kernel, state).items():
        torch.testing.assert_close(x, _as_dict(kernel, full_final)[n], rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_results():
    kernel, _, q, k, v, inputs, _ = _case("gated_delta_net")
    base = kernel(q, k, v, **inputs)
    for size in (16, 64):
        other = attnc.load("gated_delta_net", chunk_size=size)(q, k, v, **inputs)
        torch.testing.assert_close(other, base, rtol=1e-5, atol=1e-5)


def test_a_nonlinear_update_compiles_to_the_recurrent_kernel():
    kernel = attnc.compile("""
linear tanh_state {
  state S[i, j]
  S[i, j] = tanh(S[i, j] + k[i] * v[j])
  o[j] = sum(i) q[i] * S[i, j]
}""")
    assert kernel.algorithm == "recurrent" and "not linear in S" in kernel.why_not_chunked
    assert "_chunked" not in kernel.source and "def tanh_state_recurrent(" in kernel.source
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, T, DK, generator=gen) for _ in range(3))
    out = kernel(q, k, v)
    want, _ = R.nonlinear_tanh(q, k, v)
    assert _rel(out, want) < 1e-5
    with pytest.raises(ValueError, match="has no chunked kernel: the update of S is not linear"):
        kernel(q, k, v, algorithm="chunked")


def test_empty_sequences():
    kernel, _, q, k, v, inputs, init = _case("simple_gla")
    out, final = kernel(q[:, :, :0], k[:, :, :0], v[:, :, :0], g=inputs["g"][:, :, :0],
                        initial_state=init["S"], output_final_state=True)
    assert out.shape == (B, H, 0, DV)
    torch.testing.assert_close(final, init["S"])


@pytest.mark.parametrize("call, message", [
    (lambda kern, q, k, v, g: kern(q, k, v), "needs the input 'g'"),
    (lambda kern, q, k, v, g: kern(q, k, v, g=g, bogus=g), "unknown input 'bogus'"),
    (lambda kern, q, k, v, g: kern(q, k, v, g=g[:, :, :3]), r"input g must have shape"),
    (lambda kern, q, k, v, g: kern(q, k[:, :, :3], v, g=g), "q and k must have the same shape"),
    (lambda kern, q, k, v, g: kern(q[0], k, v, g=g), "q must be 4-D"),
    (lambda kern, q, k, v, g: kern(q, k, v, g=g, cu_seqlens=torch.tensor([0, T])),
     "B must be 1"),
    (lambda kern, q, k, v, g: kern(q[:1], k[:1], v[:1], g=g[:1], cu_seqlens=torch.tensor([0, 3])),
     "cu_seqlens must rise from 0 to T"),
    (lambda kern, q, k, v, g: kern(q, k, v, g=g, initial_state=torch.zeros(1)),
     "initial state S must be"),
    (lambda kern, q, k, v, g: kern(q, k, v, g=g, algorithm="fast"), "algorithm must be one of"),
])
def test_bad_calls_say_what_is_wrong(call, message):
    kernel, _, q, k, v, inputs, _ = _case("simple_gla", with_state=False)
    with pytest.raises(ValueError, match=message):
        call(kernel, q, k, v, inputs["g"])


def test_bad_compile_options():
    with pytest.raises(ValueError, match="chunk_size must be 16, 32, 64 or 128"):
        attnc.load("gla", chunk_size=20)
    with pytest.raises(ValueError, match="do not apply to a linear block"):
        attnc.load("gla", block_m=64)
    with pytest.raises(ValueError, match="chunk_size applies to linear blocks only"):
        attnc.load("causal", chunk_size=32)


@pytest.mark.parametrize("name, dtype", [
    ("gla", torch.bfloat16), ("gated_delta_net", torch.bfloat16), ("flowformer", torch.bfloat16),
    ("mamba2_ssd", torch.float16)])
def test_low_precision_forward_and_gradients(name, dtype):
    """attnc.testing.check_linear: output, final states and every gradient against the float64
    recurrence on the same (rounded) q, k, v."""
    res = attnc.testing.check_linear(attnc.load(name), B=1, H=2, T=29, D=16, Dv=16, dtype=dtype)
    assert res["ok"], res


def test_under_torch_compile():
    """A linear kernel is a graph break under torch.compile; results and gradients unchanged."""
    kernel, _, q, k, v, inputs, _ = _case("simple_gla", with_state=False)
    leaves = [x.clone().requires_grad_() for x in (q, k)]

    def loss(a, b):
        return (kernel(a, b, v, **inputs) * 2).square().sum()
    want = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.compile(loss, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


POSITIONAL = """
linear positional {
  state S[i, j]
  S[i, j] = exp(-0.05 * (t + 1)) * S[i, j] + k[i] * v[j] / (t + 1)
  o[j] = sum(i) q[i] * S[i, j]
}
"""


@pytest.mark.parametrize("algorithm", ["chunked", "recurrent"])
def test_t_counts_from_each_packed_sequence_start(algorithm):
    """`t` is the step within its own sequence, in both kernels and in the fused backward."""
    kernel = attnc.compile(POSITIONAL)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 7, 30])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = kernel(*leaves, cu_seqlens=cu, algorithm=algorithm)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    for a, b in ((0, 7), (7, 30)):
        part = [x[:, :, a:b].clone().requires_grad_() for x in (q, k, v)]
        want, _ = LT.interpret(kernel.scan, *(x.double() for x in part), {})
        torch.testing.assert_close(out[:, :, a:b].double(), want, rtol=1e-5, atol=1e-6)
        one = kernel(*part, algorithm=algorithm)
        for g, w in zip(grads, torch.autograd.grad(one.square().sum(), part)):
            torch.testing.assert_close(g[:, :, a:b], w, rtol=1e-4, atol=1e-5)


MIXED = """
linear mixed_nonlinear {
  input g[b, h, t, i], beta[b, h, t]
  param A[h], D[h]
  state S[i, j], z[i]
  S[i, j] = tanh(exp(g[i] * A) * S[i, j] + beta * k[i] * (v[j] - sum(i) k[i] * S[i, j]))
  z[i] = z[i] + relu(k[i])
  o[j] = (sum(i) q[i] * S[i, j]) / (1 + sum(i) sigmoid(q[i]) * z[i]) + D * v[j]
}
"""


@pytest.mark.parametrize("varlen", [False, True])
def test_generated_recurrent_backward(varlen):
    """A scan chunk_scan cannot chunk gets a fused backward generated from sympy VJPs: per-step
    vector and scalar inputs, per-head params, a contraction, relu and a quotient, against
    autograd through the float64 recurrence."""
    kernel = attnc.compile(MIXED)
    assert kernel.plan.backward is ScanBackward.RECURRENT and kernel.generated.has("recurrent_bwd")
    gen = torch.Generator().manual_seed(6)
    Bn, Tn = (1, 41) if varlen else (2, 41)
    q, k = (torch.randn(Bn, 2, Tn, 8, generator=gen) for _ in range(2))
    v = torch.randn(Bn, 2, Tn, 12, generator=gen)
    inputs = {"g": -torch.rand(Bn, 2, Tn, 8, generator=gen), "beta": torch.rand(Bn, 2, Tn,
                                                                               generator=gen),
              "A": torch.rand(2, generator=gen), "D": torch.randn(2, generator=gen)}
    cu = torch.tensor([0, 30, Tn]) if varlen else None
    N = 2
    init = {"S": 0.3 * torch.randn(N, 2, 8, 12, generator=gen),
            "z": torch.rand(N, 2, 8, generator=gen)}
    leaves = {"q": q, "k": k, "v": v, **inputs, **{f"init_{n}": x for n, x in init.items()}}
    run = {n: x.clone().requires_grad_() for n, x in leaves.items()}
    out, final = kernel(run["q"], run["k"], run["v"], cu_seqlens=cu, output_final_state=True,
                        initial_state={n: run[f"init_{n}"] for n in init},
                        **{n: run[n] for n in inputs})
    d_out, d_s = torch.randn(out.shape, generator=gen), torch.randn(N, 2, 8, 12, generator=gen)
    got = torch.autograd.grad((out * d_out).sum() + (final["S"] * d_s).sum(), list(run.values()))
    ref = {n: x.double().requires_grad_() for n, x in leaves.items()}
    spans = [(0, Tn)] if cu is None else [(0, 30), (30, Tn)]
    loss = 0
    for s, (a, b) in enumerate(spans):
        pick = (lambda x: x) if cu is None else (lambda x: x[s:s + 1])
        o, f = LT.interpret(kernel.scan, ref["q"][:, :, a:b], ref["k"][:, :, a:b],
                            ref["v"][:, :, a:b],
                            {"g": ref["g"][:, :, a:b], "beta": ref["beta"][:, :, a:b],
                             "A": ref["A"], "D": ref["D"]},
                            initial_state={n: pick(ref[f"init_{n}"]) for n in init})
        loss = loss + (o * d_out[:, :, a:b].double()).sum() + (f["S"] * pick(d_s).double()).sum()
    want = torch.autograd.grad(loss, list(ref.values()))
    for n, a, b in zip(run, got, want):
        assert _rel(a, b) < 1e-4, n


def test_eager_backward_where_no_vjp_is_derived():
    """`%` has no sympy derivative: the kernel still trains, through the eager recurrence."""
    kernel = attnc.compile("""
linear wrapped {
  state S[i, j]
  S[i, j] = tanh(S[i, j] + (k[i] % 1.0) * v[j])
  o[j] = sum(i) q[i] * S[i, j]
}""")
    assert kernel.plan.backward is ScanBackward.EAGER and kernel.plan.no_vjp
    assert not kernel.generated.has("recurrent_bwd")
    gen = torch.Generator().manual_seed(8)
    leaves = [torch.randn(1, 2, 9, 8, generator=gen).requires_grad_() for _ in range(3)]
    got = torch.autograd.grad(kernel(*leaves).sum(), leaves)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    want = torch.autograd.grad(LT.interpret(kernel.scan, *ref, {})[0].sum(), ref)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


def test_a_sum_over_j_keeps_all_value_features_in_one_program():
    """`sum(j) sum(i) ...` is one sympy Sum with limits (i, j): its j limit, not only the first,
    must make the kernel keep all of DV (96 here, more than one 64-wide tile) in one program."""
    kernel = attnc.compile("""
linear normed {
  state S[i, j]
  S[i, j] = 0.9 * S[i, j] + k[i] * v[j]
  o[j] = (sum(i) q[i] * S[i, j]) / sqrt(1 + sum(j) sum(i) q[i] * S[i, j] * q[i] * S[i, j])
}""")
    gen = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 20, 96, generator=gen)
    want, _ = LT.interpret(kernel.scan, q.double(), k.double(), v.double(), {})
    assert _rel(kernel(q, k, v), want) < 1e-5


def test_a_chunked_output_with_nested_sums():
    """`sum(j) sum(i) q[i] * S[i, j]` (one sympy Sum, limits i and j) is a sum over j of a
    readout: the chunked schedule keeps the j sum (it once dropped it), forward and backward."""
    kernel = attnc.compile("""
linear sumj {
  state S[i, j]
  S[i, j] = 0.9 * S[i, j] + k[i] * v[j]
  o[j] = sum(i) q[i] * S[i, j] + 0.1 * sum(j) sum(i) q[i] * S[i, j]
}""")
    assert kernel.algorithm == "chunked"
    gen = torch.Generator().manual_seed(10)
    leaves = [torch.randn(1, 2, 20, 16, generator=gen).requires_grad_() for _ in range(3)]
    out = kernel(*leaves)
    got = torch.autograd.grad(out.square().sum(), leaves)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    want_out, _ = LT.interpret(kernel.scan, *ref, {})
    want = torch.autograd.grad(want_out.square().sum(), ref)
    assert _rel(out, want_out) < 1e-5
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("algorithm", ["chunked", "recurrent"])
def test_per_head_feature_params(algorithm):
    """A param over (head, key feature), `param theta[h, i]`, as a diagonal decay: forward and
    gradients (theta's included) against the recurrence written out here."""
    kernel = attnc.compile("""
linear rot {
  param theta[h, i]
  state S[i, j]
  S[i, j] = exp(-theta[i]) * S[i, j] + k[i] * v[j]
  o[j] = sum(i) q[i] * S[i, j]
}""")
    assert kernel.algorithm == "chunked"
    gen = torch.Generator().manual_seed(11)
    q, k, v = (0.5 * torch.randn(2, 3, 19, 16, generator=gen) for _ in range(3))
    theta = torch.rand(3, 16, generator=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, theta)]
    out = kernel(*leaves[:3], theta=leaves[3], algorithm=algorithm)
    ref = [x.double().requires_grad_() for x in (q, k, v, theta)]
    S = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    outs = []
    for t in range(19):
        S = (torch.exp(-ref[3])[None, :, :, None] * S
             + ref[1][:, :, t, :, None] * ref[2][:, :, t, None, :])
        outs.append((ref[0][:, :, t, :, None] * S).sum(-2))
    want = torch.stack(outs, 2)
    assert _rel(out, want) < 1e-5
    for a, b in zip(torch.autograd.grad(out.square().sum(), leaves),
                    torch.autograd.grad(want.square().sum(), ref)):
        assert _rel(a, b) < 1e-4


def test_gates_beyond_the_chunked_form_are_told_apart():
    """The check behind the recurrent fallback: a chunk's summed |log gate| over 80 (diagonal
    decay), or any non-finite gate, leaves the chunked form; ordinary gates keep it. With
    packed sequences a chunk starts at its sequence's start, so the check bounds chunks that
    straddle two aligned ones."""
    gla = attnc.load("gla")                   # chunks of 16 steps
    gen = torch.Generator().manual_seed(6)
    q, k = (torch.randn(1, 2, 58, DK, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 58, DV, generator=gen)
    ordinary = F.logsigmoid(torch.randn(1, 2, 58, DK, generator=gen))
    assert gla.gates_fit(q, k, v, {"g": ordinary}, 0.25)
    for strong in (-90.0, float("-inf"), float("nan")):
        g = ordinary.clone()
        g[0, 1, 40, 3] = strong
        assert not gla.gates_fit(q, k, v, {"g": g}, 0.25), strong
    # -6 per step over steps 10..25: 60 in the aligned chunk [16, 32), 36 in [0, 16), but 96 in
    # the packed second sequence's first chunk (steps 10..25)
    g = torch.zeros(1, 2, 58, DK)
    g[0, 0, 10:26, 0] = -6.0
    assert gla.gates_fit(q, k, v, {"g": g}, 0.25)
    cu = torch.tensor([0, 10, 58])
    assert not gla.gates_fit(q, k, v, {"g": g}, 0.25, cu)
    out = gla(q, k, v, g=g, cu_seqlens=cu, algorithm="chunked")
    for a, b in ((0, 10), (10, 58)):
        want, _ = R.gla(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], g[:, :, a:b])
        torch.testing.assert_close(out[:, :, a:b].double(), want, rtol=1e-4, atol=1e-5)
    # a scalar decay only fails on non-finite gates: exp(G_t - G_s) is formed directly
    simple = attnc.load("simple_gla")
    g1 = torch.full((1, 2, 58), -90.0)
    assert simple.gates_fit(q, k, v, {"g": g1}, 0.25)
    g1[0, 0, 7] = float("-inf")
    assert not simple.gates_fit(q, k, v, {"g": g1}, 0.25)
