"""attnc.nn layers against torch written from the math: Attention (projections, GQA by
repeating K/V heads, causal softmax; rope and QK-norm prologues; fp32 and bf16; gradients),
decoding with KVCache / PagedKVCache equal to the full forward at every step, LinearAttention
against a naive gated recurrence and token-by-token decoding, torch.compile(fullgraph=True)
over a small model, and the argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnc
from attnc.testing import rel_error

HIDDEN, HEADS, KV_HEADS, D = 32, 4, 2, 8
B, T = 2, 11
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _x(seed: int, dtype=torch.float32, T=T) -> torch.Tensor:
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _layer(seed: int = 0, **kw) -> attnc.nn.Attention:
    torch.manual_seed(seed)
    return attnc.nn.Attention(HIDDEN, HEADS, KV_HEADS, **kw)


def _rope(x, pos, theta: float, rot: int):
    """RoFormer's rotation of the first `rot` features of x [B, H, T, D] in half-split pairs
    (i, i + rot/2) by angle pos * theta^(-2i/rot); pos [B, T]."""
    i = torch.arange(rot // 2, dtype=torch.float64)
    angle = pos.double()[:, None, :, None] * theta ** (-2.0 * i / rot)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :rot // 2], x[..., rot // 2:rot]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, x[..., rot:]], -1)


def _l2norm(x, gain, eps: float = 1e-6):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps) * gain


def _reference(layer: attnc.nn.Attention, x, prologue=None, scale=None):
    """The layer from its weights: projections, `prologue(q, k)`, softmax(q k^T scale) over
    keys n <= m with each K/V head repeated for its query heads, o_proj."""
    Bx, Tx, _ = x.shape
    q = layer.q_proj(x).view(Bx, Tx, HEADS, -1).transpose(1, 2)
    k = layer.k_proj(x).view(Bx, Tx, KV_HEADS, -1).transpose(1, 2)
    v = layer.v_proj(x).view(Bx, Tx, KV_HEADS, -1).transpose(1, 2)
    if prologue is not None:
        q, k = prologue(q, k)
    group = HEADS // KV_HEADS
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    s = s.masked_fill(torch.ones(Tx, Tx, dtype=torch.bool).triu(1), float("-inf"))
    out = (s.softmax(-1) @ v.float()).to(x.dtype)
    return layer.o_proj(out.transpose(1, 2).reshape(Bx, Tx, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_torch(dtype):
    layer = _layer().to(dtype)
    x = _x(1, dtype)
    with torch.no_grad():
        err = rel_error(layer(x).double(), _reference(layer, x).double())
    assert err <= TOL[dtype], f"{dtype}: relative error {err:.3g}"


def test_attention_gradients_match_torch():
    layer, x = _layer(), _x(2).requires_grad_()
    dy = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(3))
    named = [x, *layer.parameters()]
    got = torch.autograd.grad(layer(x), named, dy)
    want = torch.autograd.grad(_reference(layer, x), named, dy)
    for (name, _), g, w in zip([("x", x), *layer.named_parameters()], got, want):
        assert rel_error(g.double(), w.double()) <= 1e-5, name


def test_rope_spec_matches_torch_rope_with_given_positions():
    layer = _layer(4, spec="rope", rot=6, theta=500.0)
    assert layer._query_positions == ["pos_q"] and layer._key_positions == ["pos_k"]
    x = _x(5)
    pos = torch.arange(T).expand(B, T) + torch.tensor([[0], [7]])  # the second one shifted
    ref = _reference(layer, x, lambda q, k: (_rope(q, pos, 500.0, 6), _rope(k, pos, 500.0, 6)))
    with torch.no_grad():
        assert rel_error(layer(x, positions=pos).double(), ref.double()) <= 1e-5
        zero = torch.arange(T).expand(B, T)
        plain = _reference(layer, x, lambda q, k: (_rope(q, zero, 500.0, 6),
                                                   _rope(k, zero, 500.0, 6)))
        assert rel_error(layer(x).double(), plain.double()) <= 1e-5  # default 0..T-1


def test_qk_norm_gains_are_parameters_and_learn():
    layer = _layer(6, spec="qk_norm", scale=3.0)
    assert sorted(layer.spec_params) == ["gk", "gq"]
    assert torch.equal(layer.spec_params["gq"].data, torch.ones(D))  # gains start at one
    with torch.no_grad():
        layer.spec_params["gq"].uniform_(0.5, 1.5)
        layer.spec_params["gk"].uniform_(0.5, 1.5)
    x, pos = _x(7), torch.arange(T).expand(B, T)
    gq, gk = layer.spec_params["gq"], layer.spec_params["gk"]

    def prologue(q, k):
        return (_rope(_l2norm(q, gq), pos, 10000.0, D), _rope(_l2norm(k, gk), pos, 10000.0, D))
    dy = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(8))
    y, ref = layer(x), _reference(layer, x, prologue, scale=3.0)
    assert rel_error(y.double(), ref.double()) <= 1e-5
    got = torch.autograd.grad(y, [gq, gk], dy)
    want = torch.autograd.grad(ref, [gq, gk], dy)
    for name, g, w in zip(("gq", "gk"), got, want):
        assert rel_error(g.double(), w.double()) <= 1e-4, name


def _decode_equals_full(layer, x, cache, steps=(4, 1, 1, 2, 1)):
    """Feed x in chunks of `steps` rows through the cache: each chunk's output equals the
    full forward's rows (the causal forward is the oracle)."""
    with torch.no_grad():
        full = layer(x)
        start = 0
        for n in steps:
            y = layer(x[:, start:start + n], cache=cache)
            err = rel_error(y.double(), full[:, start:start + n].double())
            assert err <= 1e-5, f"rows {start}..{start + n - 1}: relative error {err:.3g}"
            start += n
    return start


@pytest.mark.parametrize("max_length,spec,options", [
    (None, "causal", {}), (16, "sliding_window", {"window": 3})])
def test_decode_with_kv_cache_equals_full_forward(max_length, spec, options):
    layer = _layer(9, spec=spec, **options)
    cache = attnc.nn.KVCache(max_length=max_length)
    x = _x(10, T=9)
    assert _decode_equals_full(layer, x, cache) == 9 == cache.length(layer)


@pytest.mark.parametrize("spec,options", [("rope", {"rot": 8}), ("qk_norm", {"scale": 3.0})])
def test_prologue_decode_stores_transformed_keys(spec, options):
    layer = _layer(11, spec=spec, **options)
    with torch.no_grad():
        for p in layer.spec_params.values():  # gains away from one
            p.uniform_(0.5, 1.5)
    x = _x(12, T=9)
    _decode_equals_full(layer, x, attnc.nn.KVCache())


def test_two_layers_share_one_cache():
    first, second = _layer(13), _layer(14)
    x = _x(15, T=6)
    cache = attnc.nn.KVCache()
    with torch.no_grad():
        full = second(first(x))
        outs = [second(first(x[:, t:t + 1], cache=cache), cache=cache) for t in range(6)]
    assert rel_error(torch.cat(outs, 1).double(), full.double()) <= 1e-5
    assert cache.length(first) == cache.length(second) == 6


def test_paged_cache_decode_ragged_batch_equals_full_forward():
    """Two layers in one PagedKVCache; sequences prefilled apart (3 and 6 tokens), then decoded
    together (ragged lengths, pages of 4 rows)."""
    first, second = _layer(16, layer_idx=0), _layer(17, layer_idx=1)
    cache = attnc.PagedKVCache(12, 4, fields={"k": (KV_HEADS, D), "v": (KV_HEADS, D)},
                               num_layers=2, dtype=torch.float32)
    x = _x(18, T=9)
    lengths = (3, 6)
    seqs = [cache.new_sequence() for _ in lengths]
    with torch.no_grad():
        full = second(first(x))
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            y = second(first(x[b:b + 1, :n], cache=cache, seq_ids=[s]), cache=cache,
                       seq_ids=[s])
            assert rel_error(y.double(), full[b:b + 1, :n].double()) <= 1e-5, f"prefill {b}"
        for t in range(3):
            rows = torch.stack([x[b, n + t] for b, n in enumerate(lengths)])[:, None]
            y = second(first(rows, cache=cache, seq_ids=seqs), cache=cache, seq_ids=seqs)
            want = torch.stack([full[b, n + t] for b, n in enumerate(lengths)])[:, None]
            assert rel_error(y.double(), want.double()) <= 1e-5, f"step {t}"
    assert [cache.length(s) for s in seqs] == [6, 9]


def test_cache_calls_are_forward_only():
    layer = _layer(18)
    with pytest.raises(ValueError, match="no_grad"):
        layer(_x(19, T=2), cache=attnc.nn.KVCache())


# --- LinearAttention ------------------------------------------------------------------------

def _naive_gla(layer: attnc.nn.LinearAttention, x):
    """fla's GLA layer written out: per-feature log gate logsigmoid(W2 W1 x) / 16,
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = (q_t / sqrt(D))^T S_t, per-head RMSNorm,
    o_proj; returns y and the final S [B, H, D, D]."""
    Bx, Tx, _ = x.shape
    q, k, v = (_heads(p(x)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    g = _heads(F.logsigmoid(layer.gates["g"](x)) / 16.0)
    S = torch.zeros(Bx, HEADS, D, D)
    outs = []
    for t in range(Tx):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, :, None] * D ** -0.5 * S).sum(-2))
    o = torch.stack(outs, 2)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm.weight
    return layer.o_proj(o.transpose(1, 2).reshape(Bx, Tx, -1)), S


def _heads(x):
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def test_linear_attention_matches_naive_gla_and_its_gradients():
    torch.manual_seed(20)
    layer = attnc.nn.LinearAttention(HIDDEN, HEADS, "gla")
    x = _x(21).requires_grad_()
    y, state = layer(x)
    ref, ref_state = _naive_gla(layer, x)
    assert rel_error(y.double(), ref.double()) <= 1e-5
    assert rel_error(state.double(), ref_state.double()) <= 1e-5
    named = [x, *layer.parameters()]
    got = torch.autograd.grad(y, named, torch.ones_like(y))
    want = torch.autograd.grad(ref, named, torch.ones_like(ref))
    for (name, _), g, w in zip([("x", x), *layer.named_parameters()], got, want):
        assert rel_error(g.double(), w.double()) <= 1e-4, name


@pytest.mark.parametrize("spec", ["gla", "delta_net"])
def test_linear_attention_decode_token_by_token_equals_full(spec):
    torch.manual_seed(22)
    layer = attnc.nn.LinearAttention(HIDDEN, HEADS, spec)
    x = _x(23, T=7)
    cache = attnc.nn.LinearCache()
    with torch.no_grad():
        full, final = layer(x)
        first, _ = layer(x[:, :3], cache=cache)
        outs = [first] + [layer(x[:, t:t + 1], cache=cache)[0] for t in range(3, 7)]
    assert rel_error(torch.cat(outs, 1).double(), full.double()) <= 1e-5
    assert rel_error(cache.get(layer).double(), final.double()) <= 1e-5


# --- torch.compile --------------------------------------------------------------------------

class _Tiny(nn.Module):
    """Embedding, two pre-norm blocks of Attention and an MLP, a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, HIDDEN)
        self.attn = nn.ModuleList([attnc.nn.Attention(HIDDEN, HEADS, KV_HEADS)
                                   for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, 64), nn.GELU(),
                                                nn.Linear(64, HIDDEN)) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(HIDDEN) for _ in range(4)])
        self.head = nn.Linear(HIDDEN, 40)

    def forward(self, ids, cache=None):
        x = self.emb(ids)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(self.norms[2 * i](x), cache=cache)
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(x)


def test_torch_compile_fullgraph_forward_and_backward_equal_eager():
    torch.manual_seed(24)
    model = _Tiny()
    ids = torch.randint(0, 40, (B, 12), generator=torch.Generator().manual_seed(25))
    eager = model(ids)
    eager_grads = torch.autograd.grad(eager.square().mean(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    assert rel_error(out.double(), eager.double()) <= 1e-6
    for g, w in zip(grads, eager_grads):
        assert rel_error(g.double(), w.double()) <= 1e-6


def test_torch_compile_rope_layer_breaks_the_graph_cleanly():
    """A prologue spec's kernel launches from Python: the layer makes it a graph break."""
    layer, x = _layer(28, spec="rope", rot=8), _x(29)
    torch._dynamo.reset()
    got = torch.compile(layer, backend="aot_eager")(x)
    assert rel_error(got.double(), layer(x).double()) <= 1e-6


@pytest.mark.slow
def test_torch_compile_fullgraph_decode_step_equals_eager():
    """The decode step (kernel.paged is a custom op) traces whole, with a preallocated cache."""
    torch.manual_seed(26)
    model = _Tiny()
    ids = torch.randint(0, 40, (B, 7), generator=torch.Generator().manual_seed(27))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_cache, cache = attnc.nn.KVCache(max_length=8), attnc.nn.KVCache(max_length=8)
    with torch.no_grad():
        model(ids[:, :4], eager_cache)
        model(ids[:, :4], cache)
        for t in range(4, 7):
            want = model(ids[:, t:t + 1], eager_cache)
            got = compiled(ids[:, t:t + 1], cache)
            assert rel_error(got.double(), want.double()) <= 1e-6, f"step {t}"


# --- argument checks ------------------------------------------------------------------------

@pytest.mark.parametrize("build,match", [
    (lambda: attnc.nn.Attention(30, 4), "hidden_size"),
    (lambda: attnc.nn.Attention(32, 4, 3), "num_kv_heads"),
    (lambda: attnc.nn.Attention(32, 0), "num_heads"),
    (lambda: attnc.nn.Attention(32, 4, spec="gla"), "LinearAttention"),
    (lambda: attnc.nn.Attention(32, 4, spec=3), "spec"),
    (lambda: attnc.nn.LinearAttention(30, 4), "hidden_size"),
    (lambda: attnc.nn.LinearAttention(32, 4, "causal"), "attnc.nn.Attention"),
    (lambda: attnc.nn.KVCache(max_length=0), "max_length"),
])
def test_bad_arguments_raise_value_error_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_call_arguments():
    layer = _layer(26)
    with pytest.raises(ValueError, match=r"x must be \[B, T, 32\]"):
        layer(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="unexpected keyword 'bias'"):
        layer(_x(27), bias=torch.zeros(4))
    with pytest.raises(ValueError, match="positions"):
        _layer(28, spec="rope", rot=8)(_x(29), positions=torch.arange(3))
    with pytest.raises(ValueError, match="cache must be"):
        with torch.no_grad():
            layer(_x(30), cache={})
    cache = attnc.nn.KVCache(max_length=4)
    with torch.no_grad(), pytest.raises(ValueError, match="max_length=4"):
        layer(_x(31, T=5), cache=cache)
