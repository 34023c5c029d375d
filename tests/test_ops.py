"""attnc.ops: flash-linear-attention's function names, arguments and [B, T, H, D] layout, on
attnc's kernels, against the independent references of tests/linear_reference.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnc import ops
from tests import linear_reference as R

B, T, H, K, V = 2, 29, 3, 16, 16


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)
    return {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V),
            "g": F.logsigmoid(rnd(B, T, H)), "gk": F.logsigmoid(rnd(B, T, H, K)) / 4,
            "beta": torch.sigmoid(rnd(B, T, H)), "h0": 0.3 * rnd(B, H, K, V)}


def _ref_core(fn, d, *extra, **kw):
    """Run a core-layout reference on fla-layout data; back to fla layout."""
    core = [R.from_fla(x) for x in (d["q"], d["k"], d["v"], *extra)]
    o, final = fn(*core, initial_state={"S": d["h0"]}, **kw)
    return R.to_fla(o), final["S"]


CASES = {
    "linear_attn": (lambda d, f: f(d["q"], d["k"], d["v"], initial_state=d["h0"],
                                   output_final_state=True, normalize=False),
                    lambda d: _ref_core(R.simple_gla, d, torch.zeros(B, T, H))),
    "retention": (lambda d, f: f(d["q"], d["k"], d["v"], initial_state=d["h0"],
                                 output_final_state=True),
                  lambda d: _ref_core(R.retnet, d)),
    "simple_gla": (lambda d, f: f(d["q"], d["k"], d["v"], d["g"], initial_state=d["h0"],
                                  output_final_state=True),
                   lambda d: _ref_core(R.simple_gla, d, d["g"])),
    "gla": (lambda d, f: f(d["q"], d["k"], d["v"], d["gk"], initial_state=d["h0"],
                           output_final_state=True),
            lambda d: _ref_core(R.gla, d, d["gk"])),
    "delta_rule": (lambda d, f: f(d["q"], d["k"], d["v"], d["beta"], initial_state=d["h0"],
                                  output_final_state=True, use_qk_l2norm_in_kernel=True),
                   lambda d: _ref_core(R.delta_net, {**d, "q": F.normalize(d["q"], dim=-1),
                                                     "k": F.normalize(d["k"], dim=-1)},
                                       d["beta"])),
    "gated_delta_rule": (lambda d, f: f(d["q"], d["k"], d["v"], d["g"], d["beta"],
                                        initial_state=d["h0"], output_final_state=True,
                                        use_qk_l2norm_in_kernel=True),
                         lambda d: _ref_core(R.gated_delta_net,
                                             {**d, "q": F.normalize(d["q"], dim=-1),
                                              "k": F.normalize(d["k"], dim=-1)},
                                             d["g"], d["beta"])),
}


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("name", list(CASES))
def test_fla_style_functions(name, mode):
    fn = getattr(ops, f"{mode}_{name}")
    assert fn.__name__ == f"{mode}_{name}"
    run, ref = CASES[name]
    d = _data()
    o, final = run(d, fn)
    want, want_final = ref(d)
    assert o.shape == (B, T, H, V) and final.shape == (B, H, K, V)
    torch.testing.assert_close(o.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-4, atol=1e-5)


def test_final_state_only_when_asked():
    d = _data()
    o, final = ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"])
    assert final is None and o.shape == (B, T, H, V)


def test_linear_attn_normalizes_by_default_as_fla_does():
    d = _data(1)
    o, _ = ops.chunk_linear_attn(d["q"], d["k"], d["v"])
    scale = K ** -0.5
    plain, _ = ops.chunk_linear_attn(d["q"], d["k"], d["v"], normalize=False)
    z = (d["q"] * scale * d["k"].cumsum(1)).sum(-1, keepdim=True)
    torch.testing.assert_close(o, plain / (z + 1e-10), rtol=1e-3, atol=1e-4)


def test_varlen_and_gradients_in_fla_layout():
    d = _data(2)
    cu = torch.tensor([0, 10, 2 * T])
    pack = {n: d[n].reshape(1, 2 * T, H, -1) for n in ("q", "k", "v")}
    g = d["g"].reshape(1, 2 * T, H).clone().requires_grad_()
    beta = d["beta"].reshape(1, 2 * T, H)
    h0 = d["h0"].clone().requires_grad_()
    o, final = ops.chunk_gated_delta_rule(pack["q"], F.normalize(pack["k"], dim=-1), pack["v"],
                                          g, beta, initial_state=h0, output_final_state=True,
                                          cu_seqlens=cu)
    assert o.shape == (1, 2 * T, H, V) and final.shape == (2, H, K, V)
    first, f0 = ops.fused_recurrent_gated_delta_rule(
        pack["q"][:, :10], F.normalize(pack["k"][:, :10], dim=-1), pack["v"][:, :10],
        g[:, :10], beta[:, :10], initial_state=h0[:1], output_final_state=True)
    torch.testing.assert_close(o[:, :10], first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final[:1], f0, rtol=1e-4, atol=1e-5)
    dg, dh0 = torch.autograd.grad(o.sum() + final.sum(), (g, h0))
    assert torch.isfinite(dg).all() and dg.abs().sum() > 0 and dh0.abs().sum() > 0


def test_fla_layout_is_checked():
    d = _data()
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        ops.chunk_simple_gla(d["q"][0], d["k"], d["v"], d["g"])


@pytest.mark.parametrize("call, message", [
    (lambda d: ops.chunk_gla(d["q"], d["k"], d["v"], None),
     r"g must be a \[B, T, H, K\] tensor .* got NoneType"),
    (lambda d: ops.chunk_gla(d["q"], d["k"], d["v"], d["g"]),  # a scalar gate for gla
     r"g must be a \[B, T, H, K\] tensor"),
    (lambda d: ops.fused_recurrent_simple_gla(d["q"], d["k"], d["v"], d["gk"]),
     r"g must be a \[B, T, H\] tensor"),
    (lambda d: ops.chunk_simple_gla(d["q"], d["k"], d["v"], d["g"][:, :5]),
     r"g must be .* B, T, H = \(2, 29, 3\), got \(2, 5, 3\)"),
    (lambda d: ops.chunk_delta_rule(d["q"], d["k"], d["v"], None), "beta must be"),
    (lambda d: ops.chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], "beta"),
     "beta must be .* got str"),
    (lambda d: ops.chunk_gated_delta_rule(None, d["k"], d["v"], d["g"], d["beta"],
                                          use_qk_l2norm_in_kernel=True), "q must be"),
    (lambda d: ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"],
                                    use_qk_l2norm_in_kernel=None),
     "use_qk_l2norm_in_kernel must be True or False"),
    (lambda d: ops.chunk_retention(d["q"], d["k"], None), "v must be"),
    (lambda d: ops.chunk_retention(d["q"], d["k"], d["v"], initial_state=[0.0]),
     "initial_state must be a .* tensor or None, got list"),
    (lambda d: ops.chunk_retention(d["q"], d["k"], d["v"],
                                   initial_state=d["h0"].long()),
     "initial_state S must be a floating tensor"),
    (lambda d: ops.chunk_retention(d["q"], d["k"], d["v"], output_final_state="yes"),
     "output_final_state must be True or False"),
    (lambda d: ops.chunk_linear_attn(d["q"], d["k"], d["v"], normalize=None),
     "normalize must be True or False"),
    (lambda d: ops.chunk_linear_attn(d["q"], d["k"], d["v"], initial_state=d["h0"][:1]),
     "initial state S must be"),
    (lambda d: ops.chunk_retention(d["q"], d["k"], d["v"], scale="x"), "scale must be"),
    (lambda d: ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"].long()), "g must be a floating"),
    (lambda d: ops.chunk_retention(d["q"].int(), d["k"].int(), d["v"].int()),
     "q has dtype torch.int32"),
    (lambda d: ops.chunk_retention(d["q"].to("meta"), d["k"].to("meta"), d["v"].to("meta")),
     "device meta is not supported"),
])
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(_data())


def test_fake_tensors_give_shapes_as_the_softmax_kernels_do():
    """Under FakeTensorMode (shape propagation) the linear kernels run nothing and return
    outputs of the right shapes and dtypes, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        d = _data()
        gk = d["gk"].requires_grad_()
        o, final = ops.chunk_gla(d["q"], d["k"], d["v"], gk, initial_state=d["h0"],
                                 output_final_state=True)
        assert o.shape == (B, T, H, V) and o.dtype == torch.float32
        assert final.shape == (B, H, K, V) and final.dtype == torch.float32
        (dg,) = torch.autograd.grad(o.sum() + final.sum(), gk)
        assert dg.shape == gk.shape


def _strong(g: torch.Tensor, value: float) -> torch.Tensor:
    """log gates with a few entries at `value`: one feature at one step, and one whole step."""
    g = g.clone()
    g[0, 3, 1, ...] = value
    g[1, 17, 0] = value
    return g


@pytest.mark.parametrize("value", [-90.0, -math.inf])
def test_chunk_gla_with_gates_beyond_the_chunked_form(value):
    """exp(-G_s) of the diagonal-decay chunk overflows once a chunk's log gates sum below about
    -88 (and -inf gives inf - inf): the output was all NaN. Such gates now run the recurrent
    kernel forward and the recurrence's autograd backward; checked against the step-by-step
    reference."""
    d = _data(3)
    gk = _strong(d["gk"], value).requires_grad_()
    q = d["q"].clone().requires_grad_()
    o, final = ops.chunk_gla(q, d["k"], d["v"], gk, initial_state=d["h0"],
                             output_final_state=True)
    gq = R.from_fla(q.detach().double()).requires_grad_()
    gg = R.from_fla(gk.detach().double()).requires_grad_()
    want, want_final = R.gla(gq, R.from_fla(d["k"]), R.from_fla(d["v"]), gg,
                             initial_state={"S": d["h0"]})
    torch.testing.assert_close(o.double(), R.to_fla(want), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final["S"], rtol=1e-4, atol=1e-5)
    d_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(4))
    dq, dg = torch.autograd.grad(o, (q, gk), d_o)
    wq, wg = torch.autograd.grad(R.to_fla(want), (gq, gg), d_o.double())
    torch.testing.assert_close(dq.double(), R.to_fla(wq), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dg.double(), R.to_fla(wg), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["simple_gla", "gated_delta_rule"])
def test_scalar_gates_of_minus_inf(name):
    """A scalar decay's chunk forms exp(G_t - G_s) directly, so finite gates of any size are
    fine, but a -inf gate gave inf - inf = NaN; it now runs the recurrent kernel."""
    d = _data(5)
    g = _strong(d["g"], -math.inf)
    k = F.normalize(d["k"], dim=-1)
    if name == "simple_gla":
        o, _ = ops.chunk_simple_gla(d["q"], k, d["v"], g, initial_state=d["h0"])
        want, _ = R.simple_gla(*(R.from_fla(x) for x in (d["q"], k, d["v"], g)),
                               initial_state={"S": d["h0"]})
    else:
        o, _ = ops.chunk_gated_delta_rule(d["q"], k, d["v"], g, d["beta"], initial_state=d["h0"])
        want, _ = R.gated_delta_net(*(R.from_fla(x) for x in (d["q"], k, d["v"], g, d["beta"])),
                                    initial_state={"S": d["h0"]})
    torch.testing.assert_close(o.double(), R.to_fla(want), rtol=1e-4, atol=1e-5)
