"""attnc kernels as a transformers attention implementation: tiny random models of several
families run with attn_implementation=<an attnc registration> and must match the same weights
run with transformers' eager attention (logits, every parameter's gradient, greedy generation
with left padding), and every argument attnc cannot honor must raise ValueError."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import attnc.backends.triton  # noqa: F401  (picks Triton's CPU interpreter before transformers)

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from attnc.integrations import transformers as attnc_hf  # noqa: E402

NAME = "attnc_test"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
             pad_token_id=0)
WINDOW = 5  # shorter than the sequences below, so windows (and sliding caches) matter


def _config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**SMALL)
    if family == "qwen3":
        return transformers.Qwen3Config(**SMALL)
    if family == "mistral":
        return transformers.MistralConfig(**SMALL, sliding_window=WINDOW)
    if family == "gemma2":
        return transformers.Gemma2Config(**SMALL, sliding_window=WINDOW,
                                         attn_logit_softcapping=1.0, query_pre_attn_scalar=2,
                                         layer_types=["sliding_attention", "full_attention"])
    if family == "gpt_oss":
        small = {**SMALL, "intermediate_size": 64}
        return transformers.GptOssConfig(**small, sliding_window=WINDOW, num_local_experts=4,
                                         num_experts_per_tok=2,
                                         rope_parameters={"rope_type": "default",
                                                          "rope_theta": 10000.0},
                                         layer_types=["sliding_attention", "full_attention"])
    raise AssertionError(family)


def _pair(family: str, dtype=torch.float32):
    """The same random weights twice: with eager attention and with attnc's."""
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name.endswith("q_proj.weight"):  # larger scores: soft-caps and windows matter
                p.mul_(4.0)
            if name.endswith("sinks"):
                p.normal_()
    eager = eager.to(dtype)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    return eager, ours


def _close(got, want, dtype=torch.float32):
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= tol * scale, (got - want).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def registered():
    attnc_hf.register(NAME)
    yield
    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop(NAME, None)


def _ids(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (B, T), generator=g)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2", "gpt_oss"])
def test_logits_and_gradients_match_eager(family):
    eager, ours = _pair(family)
    ids = _ids()
    want = eager(ids, labels=ids)
    got = ours(ids, labels=ids)
    _close(got.logits, want.logits)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(eager.named_parameters(), ours.parameters()):
        if p.grad is not None:
            _close(q.grad, p.grad)


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_bf16_logits_match_eager(family):
    eager, ours = _pair(family, torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        _close(ours(ids).logits.float(), eager(ids).logits.float(), torch.bfloat16)


def _left_padded(B=2, T=8):
    ids = _ids(B, T, seed=2)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_oss",
                                    pytest.param("qwen3", marks=pytest.mark.slow),
                                    pytest.param("gemma2", marks=pytest.mark.slow)])
def test_generate_with_left_padding_matches_eager(family):
    # 8 prompt + 6 new tokens against a window of 5: the sliding caches drop keys
    eager, ours = _pair(family)
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    want = eager.generate(ids, **kw)
    got = ours.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.logits, want.logits):
        _close(step_got, step_want)


def test_right_padding_trains_like_eager():
    eager, ours = _pair("llama")
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    want = eager(ids, attention_mask=mask, labels=labels)
    got = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    _close(got.logits[real], want.logits[real])
    want.loss.backward()
    got.loss.backward()
    for p, q in zip(eager.parameters(), ours.parameters()):
        _close(q.grad, p.grad)


def test_left_padding_forward_matches_and_backward_is_refused():
    eager, ours = _pair("mistral")
    ids, mask = _left_padded(2, 10)
    want = eager(ids, attention_mask=mask)
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    _close(got.logits[real], want.logits[real])
    with pytest.raises(ValueError, match="no gradients through attention with left padding"):
        got.logits[real].sum().backward()


def test_a_library_spec_runs_every_layer():
    # the contract's example: a Llama made sliding-window by registration equals Mistral's
    # eager sliding-window attention with the same weights
    attnc_hf.register("attnc_test_swa", "sliding_window", window=4)
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL),
                                             attn_implementation="attnc_test_swa")
    mistral = AutoModelForCausalLM.from_config(
        transformers.MistralConfig(**SMALL, sliding_window=4), attn_implementation="eager")
    mistral.load_state_dict(llama.state_dict())
    ids = _ids()
    with torch.no_grad():
        _close(llama(ids).logits, mistral(ids).logits)
        # a layer's own window becomes the spec's `window`; a different registered one is refused
        mistral.set_attn_implementation("attnc_test_swa")
        mistral.config.sliding_window = 6
        with pytest.raises(ValueError, match="window=4 was registered, but the model's layer "
                                             "has sliding_window=6"):
            mistral(ids)


def _attention(name=NAME):
    return AttentionInterface._global_mapping[name]


def _reference(q, k, v, scale, window=None, cap=None, sinks=None):
    """Causal softmax attention written from the math, [B, M, H, Dv]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    M, N = s.shape[-2:]
    m = torch.arange(M)[:, None] + N - M
    n = torch.arange(N)[None, :]
    keep = (n <= m) if window is None else (n <= m) & (m - n < window)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
    p = s.softmax(-1)[..., :N]
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("window,cap,sinks", [(None, None, False), (3, None, True),
                                              (None, 2.0, False), (3, 2.0, True)])
def test_attention_function_matches_the_math(window, cap, sinks):
    g = torch.Generator().manual_seed(3)
    q = (2 * torch.randn(2, 4, 9, 16, generator=g)).requires_grad_()
    k = torch.randn(2, 2, 9, 16, generator=g).requires_grad_()
    v = torch.randn(2, 2, 9, 8, generator=g).requires_grad_()
    s_aux = torch.randn(4, generator=g).requires_grad_() if sinks else None
    module = types.SimpleNamespace(is_causal=True, config=None)
    out, weights = _attention()(module, q, k, v, None, scaling=0.3, sliding_window=window,
                                softcap=cap, s_aux=s_aux, position_ids=torch.arange(9)[None])
    assert weights is None and out.shape == (2, 9, 4, 8) and out.is_contiguous()
    want = _reference(q, k, v, 0.3, window, cap, s_aux)
    _close(out, want)
    inputs = [t for t in (q, k, v, s_aux) if t is not None]
    grads = torch.autograd.grad(out.square().sum(), inputs)
    for got, exp in zip(grads, torch.autograd.grad(want.square().sum(), inputs)):
        _close(got, exp)


def test_mask_function_recognizes_an_equivalent_causal_mask():
    mask_fn = AttentionMaskInterface._global_mapping[NAME]
    assert mask_fn(2, 6, 6, mask_function=lambda b, h, q, kv: kv <= q) is None
    with pytest.raises(ValueError, match="not a plain causal"):
        mask_fn(2, 6, 6, mask_function=lambda b, h, q, kv: (kv <= q) & (kv % 2 == 0))


@pytest.mark.parametrize("case", ["dropout", "output_attentions", "mask_4d", "packed",
                                  "custom_positions", "holes", "is_causal", "spec_no_window",
                                  "position_bias"])
def test_what_attnc_cannot_honor_is_refused(case):
    family = "mistral" if case == "spec_no_window" else "llama"
    eager, ours = _pair(family)
    ids = _ids(1, 8)
    kw: dict = {}
    match = {"dropout": "dropout", "output_attentions": "output_attentions",
             "mask_4d": "4-D", "packed": "packed sequences", "custom_positions": "position_ids",
             "holes": "padding between real tokens", "is_causal": "is_causal=False",
             "spec_no_window": "no option `window`", "position_bias": "position_bias"}[case]
    if case == "dropout":
        ours.config.attention_dropout = 0.1
        for layer in ours.model.layers:
            layer.self_attn.attention_dropout = 0.1
        ours.train()
    elif case == "output_attentions":
        kw["output_attentions"] = True
    elif case == "mask_4d":
        kw["attention_mask"] = torch.zeros(1, 1, 8, 8)
    elif case == "packed":
        kw["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    elif case == "custom_positions":
        kw["position_ids"] = torch.tensor([[0, 1, 2, 3, 5, 6, 7, 8]])
        kw["attention_mask"] = torch.ones(1, 8, dtype=torch.long)  # no packing detection
    elif case == "holes":
        kw["attention_mask"] = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])
    elif case == "is_causal":
        kw["is_causal"] = False
    elif case == "position_bias":
        kw["position_bias"] = torch.zeros(1, 4, 8, 8)
    else:
        attnc_hf.register("attnc_test_causal", "causal")
        ours.set_attn_implementation("attnc_test_causal")
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        ours(ids, **kw)


def test_register_validates_its_arguments():
    with pytest.raises(ValueError, match="name"):
        attnc_hf.register("sdpa")
    with pytest.raises(ValueError, match="need a spec"):
        attnc_hf.register("attnc_test_x", window=3)
    with pytest.raises(ValueError, match="spec"):
        attnc_hf.register("attnc_test_x", "no_such_variant_or_file")
    with pytest.raises(ValueError, match="needs tensors"):
        attnc_hf.register("attnc_test_x", "alibi")
    with pytest.raises(ValueError, match="softmax-family"):
        attnc_hf.register("attnc_test_x", "sink_softmax")
    assert attnc_hf.registered()[NAME] is None


def test_a_static_cache_is_refused():
    _, ours = _pair("llama")
    with pytest.raises(ValueError, match="use a DynamicCache"):
        ours.generate(_ids(1, 6), max_new_tokens=2, do_sample=False,
                      cache_implementation="static")
