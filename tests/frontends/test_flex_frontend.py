"""The Python-mod frontend: tracing, the IR it produces, its errors and how kernels are cached."""

from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch

import attnc
from attnc.expr import symbols as S
from attnc.flex import kernel_for, trace_spec
from attnc.frontends.flex import Captures, ModError, trace_mask_mod, trace_score_mod

SIZES = {S.B: 2, S.H: 4, S.M: 64, S.N: 64}


def _mask(mask_mod, B=1):
    return attnc.create_block_mask(mask_mod, B, 1, 64, 64, device="cpu", BLOCK_SIZE=32)


def _flex_kernel(score_mod=None, mask_mod=None, B=1):
    spec, _ = trace_spec(score_mod, _mask(mask_mod, B) if mask_mod else None, SIZES)
    return kernel_for(spec).kernel_ir


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(w):
    return lambda b, h, q_idx, kv_idx: q_idx - kv_idx < w


slopes = torch.rand(4)
bias = torch.rand(4, 2 * 128 + 1)
doc = torch.zeros(2, 64, dtype=torch.long)

# (library variant, its options, score_mod, mask_mod, compile block-sparse)
EQUIVALENT = {
    "full": ({}, None, None, False),
    "causal": ({}, None, _causal, False),
    "sliding_window": ({"window": 256}, None, attnc.and_masks(_causal, _window(256)), False),
    "alibi": ({}, lambda s, b, h, q, kv: s + slopes[h] * (kv - q), _causal, False),
    "softcap": ({}, lambda s, b, h, q, kv: 50.0 * torch.tanh(s / 50.0), _causal, False),
    "prefix_lm": ({}, None, attnc.or_masks(_causal, lambda b, h, q, kv: kv < 64), False),
    "streaming": ({}, None, attnc.and_masks(_causal, attnc.or_masks(
        lambda b, h, q, kv: kv < 4, _window(256))), False),
    "chunked_local": ({}, None, lambda b, h, q, kv: (q >= kv) & (q // 128 == kv // 128), False),
    "rel_bias": ({}, lambda s, b, h, q, kv: s + bias[h, torch.clamp(kv - q, -128, 128) + 128],
                 None, False),
    "zerotuning": ({}, lambda s, b, h, q, kv: s + torch.where(kv == 0, torch.log(gamma[h]), 0),
                   _causal, False),
    # document ids are data: attnc's block mask lists drive a block-sparse kernel
    "document": ({"block_sparse": True}, None,
                 lambda b, h, q, kv: (q >= kv) & (doc[b, q] == doc[b, kv]),
                 True),
}
gamma = torch.rand(4) + 0.5


@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_mod_form_and_attn_form_give_the_same_kernel_ir(name):
    options, score_mod, mask_mod, _ = EQUIVALENT[name]
    from_attn = attnc.load(name, **options).kernel_ir
    from_mods = _flex_kernel(score_mod, mask_mod, B=2 if name == "document" else 1)
    assert dataclasses.replace(from_mods, name=name) == from_attn


def test_library_covers_every_equivalent():
    assert set(EQUIVALENT) <= set(attnc.variants())


# --- tracing ------------------------------------------------------------------------------------

def test_score_mod_traces_to_sympy_over_qk():
    caps = Captures()
    expr = trace_score_mod(lambda s, b, h, q, kv: s * 2 + torch.exp2(-(h + 1.0)), caps)
    qk = S.access("QK", S.m, S.n)
    assert sympy.simplify(expr - (2 * qk * S.scale + 2 ** (-(S.h + 1.0)))) == 0


def test_captured_tensors_become_inputs_named_after_their_variable():
    caps = Captures()
    doc_ids = torch.zeros(2, 64, dtype=torch.long)
    table = torch.rand(4, 9)
    trace_mask_mod(lambda b, h, q, kv: doc_ids[b, q] == doc_ids[b, kv], caps)
    trace_score_mod(lambda s, b, h, q, kv: s + table[h, (q - kv) % 9], caps)
    decls = {d.name: d for d in caps.decls(SIZES)}
    assert decls["doc_ids"].kind.value == "input" and decls["doc_ids"].dims == (S.B, S.N)
    assert decls["table"].kind.value == "param" and decls["table"].dims == (S.H, 9)


def test_bool_tensor_reads_are_conditions_and_and_masks_fold():
    caps = Captures()
    keep = torch.ones(64, dtype=torch.bool)
    expr = trace_mask_mod(attnc.and_masks(lambda b, h, q, kv: keep[kv], attnc.noop_mask), caps)
    assert expr == sympy.Ne(S.access("keep", S.n), 0)
    assert trace_mask_mod(attnc.noop_mask, caps) is sympy.true


def _where_if(b, h, q_idx, kv_idx):
    if q_idx > kv_idx:
        return True
    return False


def _erf(score, b, h, q_idx, kv_idx):
    return torch.erf(score)


def _float_index(score, b, h, q_idx, kv_idx):
    return score + bias[h, q_idx / 2]


def _slice(score, b, h, q_idx, kv_idx):
    return score + bias[h, :].sum()


def _whole_tensor(score, b, h, q_idx, kv_idx):
    return score + slopes


def _number_mask(b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def _bool_score(score, b, h, q_idx, kv_idx):
    return score > 0


def _three_args(b, h, q_idx):
    return q_idx > 0


@pytest.mark.parametrize("fn, kind, message", [
    (_where_if, "mask", "Python control flow"),
    (_erf, "score", "torch.erf is not supported"),
    (_float_index, "score", "is a float expression"),
    (_slice, "score", "slices"),
    (_whole_tensor, "score", "captured tensor is used whole"),
    (_number_mask, "mask", "returns a number"),
    (_bool_score, "score", "returns a boolean"),
    (_three_args, "mask", "must take 4 arguments"),
])
def test_unsupported_constructs_name_the_mod_and_the_operation(fn, kind, message):
    trace = trace_mask_mod if kind == "mask" else trace_score_mod
    with pytest.raises(ModError) as err:
        trace(fn, Captures())
    text = str(err.value)
    assert message in text
    assert fn.__name__ in text
    assert "test_flex_frontend.py:" in text  # file:line:col of the culprit, with a caret
    if fn is not _three_args:
        assert "^" in text


def test_errors_surface_through_flex_attention():
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(ModError, match="torch.erf"):
        attnc.flex_attention(q, q, q, score_mod=_erf)


# --- caching by IR ------------------------------------------------------------------------------

def _run(score_mod, q):
    return attnc.flex_attention(q, q, q, score_mod=score_mod)


def test_a_recreated_lambda_reuses_the_kernel(monkeypatch):
    q = torch.randn(1, 2, 20, 16)
    compiled = []
    import attnc.runtime
    real = attnc.runtime.compile_ir
    monkeypatch.setattr(attnc.runtime, "compile_ir", lambda *a: compiled.append(1) or real(*a))
    offset = torch.rand(2)
    for _ in range(3):  # a new function object every "step"; a captured tensor with new values
        offset.uniform_()
        out = _run(lambda s, b, h, q_idx, kv_idx: s + offset[h] * (q_idx - kv_idx) / 7, q)
        ref = _run(None, q)
        assert not torch.allclose(out, ref)
    assert len(compiled) <= 2  # the mod's kernel and the plain one, each compiled once at most


def test_a_captured_python_float_is_part_of_the_ir():
    q = torch.randn(1, 2, 20, 16)
    kernels = set()
    for cap in (10.0, 20.0, 10.0):
        spec, _ = trace_spec(lambda s, b, h, q_idx, kv_idx: cap * torch.tanh(s / cap), None,
                             SIZES)
        kernels.add(id(kernel_for(spec)))
        out = attnc.flex_attention(q, q, q,
                                   score_mod=lambda s, b, h, qi, ki: cap * torch.tanh(s / cap))
        assert torch.isfinite(out).all()
    assert len(kernels) == 2  # 10.0 and 20.0; the second 10.0 reuses the first kernel
