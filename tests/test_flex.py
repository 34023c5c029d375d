"""attnc.flex_attention against torch's FlexAttention (eager, CPU), mod by mod.

The suite follows FlexAttention's own tests: each mod runs through torch in float64 (the
golden result), through torch in the test dtype, and through attnc in the test dtype. attnc's
mean absolute error against the golden result may exceed torch's by at most FUDGE[dtype]
(FlexAttention's tests use the same factors: 10x for fp32, 1.1x for low precision).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import attnc
from attnc.testing import rel_error

FUDGE = {torch.float32: 10.0, torch.bfloat16: 1.1}
B, HQ, HKV, M, N, D = 2, 4, 2, 77, 93, 32


def _identity(score, b, h, q_idx, kv_idx):
    return score


def _times_two(score, b, h, q_idx, kv_idx):
    return score * 2


def _squared(score, b, h, q_idx, kv_idx):
    return score * score


def _causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, float("-inf"))


def _inverse_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx <= kv_idx, score, float("-inf"))


def _rel_bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


def _rel_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score + (q_idx - kv_idx), float("-inf"))


def _alibi(num_heads: int):
    def alibi(score, b, h, q_idx, kv_idx):
        slope = torch.exp2(-((h + 1) * 8.0 / num_heads))
        return score + (kv_idx - q_idx) * slope
    return alibi


def _head_offset(dtype):
    head_offset = torch.rand(HQ, dtype=dtype, generator=torch.Generator().manual_seed(1))

    def head_offset_mod(score, b, h, q_idx, kv_idx):
        return score * head_offset[h]
    return head_offset_mod


def _trig(score, b, h, q_idx, kv_idx):
    return torch.sin(torch.cos(score)) + torch.tan(b)


def _trig2(score, b, h, q_idx, kv_idx):
    cos_score = torch.cos(score)
    sin_score = torch.sin(score)
    return cos_score * sin_score + torch.tan(b)


def _softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def _abs_exp(score, b, h, q_idx, kv_idx):
    return score - 0.1 * torch.abs(q_idx - kv_idx) + torch.exp(-score * score)


SCORE_MODS = {f.__name__ if hasattr(f, "__name__") else name: f for name, f in [
    ("identity", _identity), ("times_two", _times_two), ("squared", _squared),
    ("causal", _causal), ("inverse_causal", _inverse_causal), ("rel_bias", _rel_bias),
    ("rel_causal", _rel_causal), ("alibi", _alibi(HQ)), ("trig", _trig), ("trig2", _trig2),
    ("softcap", _softcap), ("abs_exp", _abs_exp)]}


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _sliding_window(window):
    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return sliding


def _document(doc):
    def document(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)
    return document


def _qkv(dtype, seed=0, m=M, n=N):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, m, D, generator=g)
    k = torch.randn(B, HKV, n, D, generator=g)
    v = torch.randn(B, HKV, n, D, generator=g)
    return q, k, v


def _compare(q, k, v, dtype, score_mod=None, mask_mod=None, block=32, mask_b=1, captured=()):
    """(attnc error, torch error) against torch in float64, mean absolute, as FlexAttention's
    tests measure; captured tensors are passed as (tensor) tuples already inside the mods."""
    n_q, n_k = q.shape[2], k.shape[2]
    ours_mask = theirs_mask = None
    if mask_mod is not None:
        ours_mask = attnc.create_block_mask(mask_mod, mask_b, 1, n_q, n_k, device="cpu",
                                            BLOCK_SIZE=block)
        theirs_mask = torch_block_mask(mask_mod, mask_b, 1, n_q, n_k, device="cpu",
                                       BLOCK_SIZE=block)
    gold = torch_flex(q.double(), k.double(), v.double(), score_mod=score_mod,
                      block_mask=theirs_mask, enable_gqa=True)
    ref = torch_flex(q.to(dtype), k.to(dtype), v.to(dtype), score_mod=score_mod,
                     block_mask=theirs_mask, enable_gqa=True)
    out = attnc.flex_attention(q.to(dtype), k.to(dtype), v.to(dtype), score_mod=score_mod,
                               block_mask=ours_mask, enable_gqa=True)
    assert out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    ours = (out.double() - gold).abs().mean().item()
    theirs = (ref.double() - gold).abs().mean().item()
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SCORE_MODS))
def test_score_mods(name, dtype):
    q, k, v = _qkv(dtype)
    ours, theirs = _compare(q, k, v, dtype, score_mod=SCORE_MODS[name])
    assert ours <= FUDGE[dtype] * theirs + 1e-7, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_head_offset(dtype):
    q, k, v = _qkv(dtype)
    ours, theirs = _compare(q, k, v, dtype, score_mod=_head_offset(torch.float32))
    assert ours <= FUDGE[dtype] * theirs + 1e-7, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["causal", "sliding_window", "document", "document_rel_bias"])
def test_mask_mods(case, dtype):
    q, k, v = _qkv(dtype, seed=3)
    doc = torch.randint(0, 4, (B, max(M, N)), generator=torch.Generator().manual_seed(2))
    doc = doc.sort(-1).values
    mask_mod, score_mod, mask_b = {
        "causal": (_causal_mask, None, 1),
        "sliding_window": (_sliding_window(24), None, 1),
        "document": (_document(doc), None, B),
        "document_rel_bias": (_document(doc), _rel_bias, B),
    }[case]
    ours, theirs = _compare(q, k, v, dtype, score_mod=score_mod, mask_mod=mask_mod, mask_b=mask_b)
    assert ours <= FUDGE[dtype] * theirs + 1e-7, (ours, theirs)


def test_lse_matches_torch():
    q, k, v = _qkv(torch.float32, seed=4)
    bm = attnc.create_block_mask(_sliding_window(16), 1, 1, M, N, device="cpu", BLOCK_SIZE=32)
    out, lse = attnc.flex_attention(q, k, v, score_mod=_rel_bias, block_mask=bm,
                                    enable_gqa=True, return_lse=True)
    ref, ref_lse = torch_flex(q.double(), k.double(), v.double(), score_mod=_rel_bias,
                              block_mask=bm.to_torch(), enable_gqa=True, return_lse=True)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)
    assert rel_error(out, ref) < 1e-5


def test_torch_block_mask_is_accepted():
    """A torch BlockMask's lists are used as they are (block-sparse kernel)."""
    q, k, v = _qkv(torch.float32, seed=5)
    theirs = torch_block_mask(_sliding_window(40), 1, 1, M, N, device="cpu", BLOCK_SIZE=32)
    out = attnc.flex_attention(q, k, v, block_mask=theirs, enable_gqa=True)
    ref = torch_flex(q.double(), k.double(), v.double(), block_mask=theirs, enable_gqa=True)
    assert rel_error(out, ref) < 1e-5


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = _qkv(torch.float32, seed=6)
    bm = attnc.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx > q_idx + 200, 1, 1, M, N,
                                 device="cpu", BLOCK_SIZE=32)
    out, lse = attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_scale_and_no_gqa():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    out = attnc.flex_attention(q, k, v, score_mod=_times_two, scale=0.3)
    ref = torch_flex(q.double(), k.double(), v.double(), score_mod=_times_two, scale=0.3)
    assert rel_error(out, ref) < 1e-5
    with pytest.raises(ValueError, match="enable_gqa"):
        attnc.flex_attention(q, k[:, :1], v[:, :1])
    assert math.isfinite(out.sum().item())


def test_a_score_mod_mask_survives_full_blocks():
    """With block lists, full blocks skip mask_mod, so a where(..., -inf) in the score_mod must
    stay in the score rather than move into the mask."""
    q, k, v = _qkv(torch.float32, seed=8)
    everything = torch_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= 0, 1, 1, M, N,
                                  device="cpu", BLOCK_SIZE=32)
    out = attnc.flex_attention(q, k, v, score_mod=_causal, block_mask=everything, enable_gqa=True)
    ref = torch_flex(q.double(), k.double(), v.double(), score_mod=_causal, enable_gqa=True)
    assert rel_error(out, ref) < 1e-5


# --- gradients --------------------------------------------------------------------------------
# torch's FlexAttention has no backward on the CPU, so the oracle here is FlexAttention's
# semantics materialized: dense [B, H, M, N] scores with the mods applied to broadcast index
# tensors, differentiated by torch autograd. As in FlexAttention's tests, the float64 run is the
# golden result and attnc's error may exceed the same eager computation's in the test dtype by
# FUDGE[dtype].

def _eager(q, k, v, score_mod=None, mask_mod=None):
    from tests.reference import masked_softmax
    B_, H, M_, D_ = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D_))
    idx = (torch.arange(B_).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1),
           torch.arange(M_).view(1, 1, -1, 1), torch.arange(k.shape[2]).view(1, 1, 1, -1))
    if score_mod is not None:
        s = score_mod(s, *idx)
    visible = mask_mod(*idx) if mask_mod is not None else torch.ones((), dtype=torch.bool)
    return masked_softmax(s, visible, v.to(s.dtype))[0]


def _grad_errors(q, k, v, dtype, score_mod=None, mask_mod=None, captured=(), mask_b=1):
    """Per gradient (of q, k, v, then each captured tensor): (attnc error, eager error) against
    the float64 eager gradients, mean absolute, and attnc's relative error."""
    n_q, n_k = q.shape[2], k.shape[2]
    block_mask = None
    if mask_mod is not None:
        block_mask = attnc.create_block_mask(mask_mod, mask_b, 1, n_q, n_k, device="cpu",
                                             BLOCK_SIZE=32)
    d_out = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(9))

    def grads(run, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        for t in captured:
            t.grad = None
        out = run(*leaves)
        (out.double() * d_out.double()).sum().backward()
        return [t.grad.double() for t in leaves] + [t.grad.double() for t in captured]

    gold = grads(lambda *a: _eager(*a, score_mod, mask_mod), torch.float64)
    theirs = grads(lambda *a: _eager(*a, score_mod, mask_mod), dtype)
    ours = grads(lambda *a: attnc.flex_attention(*a, score_mod=score_mod, block_mask=block_mask,
                                                 enable_gqa=True), dtype)
    return [((o - g).abs().mean().item(), (t - g).abs().mean().item(), rel_error(o, g))
            for o, t, g in zip(ours, theirs, gold)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SCORE_MODS))
def test_score_mod_gradients(name, dtype):
    q, k, v = _qkv(dtype, seed=10, m=45, n=61)
    for ours, theirs, _ in _grad_errors(q, k, v, dtype, score_mod=SCORE_MODS[name]):
        assert ours <= FUDGE[dtype] * theirs + 1e-7, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_tensor_gradients(dtype):
    """Captured floating tensors are params: their gradients come from the fused kernels. They
    have the test dtype, as in FlexAttention's tests (an fp32 one would lift the eager run's
    softmax to fp32 and leave no low-precision baseline)."""
    q, k, v = _qkv(dtype, seed=11, m=45, n=61)
    g = torch.Generator().manual_seed(12)
    head_offset = torch.rand(HQ, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(61, generator=g).to(dtype).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * head_offset[h] + bias[kv_idx] - bias[q_idx]

    errors = _grad_errors(q, k, v, dtype, score_mod=score_mod, captured=(head_offset, bias))
    assert len(errors) == 5
    for ours, theirs, _ in errors[:3]:
        assert ours <= FUDGE[dtype] * theirs + 1e-7, (ours, theirs)
    # A param's gradient sums over B * H * M * N elements and is rounded once to its dtype:
    # with a handful of entries, a mean error is that rounding, so judge it relatively.
    for _, _, rel in errors[3:]:
        assert rel <= {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype], rel


@pytest.mark.parametrize("case", ["sliding_window", "document_rel_bias"])
def test_mask_mod_gradients(case):
    q, k, v = _qkv(torch.float32, seed=13, m=61, n=61)
    doc = torch.randint(0, 3, (B, 61), generator=torch.Generator().manual_seed(2)).sort(-1).values
    mask_mod, score_mod, mask_b = {
        "sliding_window": (_sliding_window(20), None, 1),
        "document_rel_bias": (_document(doc), _rel_bias, B),
    }[case]
    for ours, theirs, _ in _grad_errors(q, k, v, torch.float32, score_mod=score_mod,
                                        mask_mod=mask_mod, mask_b=mask_b):
        assert ours <= FUDGE[torch.float32] * theirs + 1e-7, (ours, theirs)


# --- argument checks --------------------------------------------------------------------------

@pytest.mark.parametrize("mask_b, mask_h, lengths, message", [
    (1, 1, (M + 32, N), r"block_mask was built for \(Q_LEN, KV_LEN\) = \(109, 93\).*"
                        r"\(M, N\) = \(77, 93\)"),
    (1, 1, (M, N - 1), r"block_mask was built for .*\(77, 92\)"),
    (3, 1, (M, N), r"block_mask has B = 3, H = 1.*expected 1 \(broadcast\) or the call's B = 2"),
    (1, 2, (M, N), r"block_mask has B = 1, H = 2.*H = 4 \(query heads\)"),
])
def test_a_static_block_mask_must_fit_the_call(mask_b, mask_h, lengths, message):
    """The static kernel never reads the mask's lists, so a mask built for other lengths or
    batches ran silently; torch raises for the lengths, attnc's block-sparse path for both."""
    q, k, v = _qkv(torch.float32, seed=10)
    bm = attnc.create_block_mask(_causal_mask, mask_b, mask_h, *lengths, device="cpu",
                                 BLOCK_SIZE=32)
    assert bm.derived  # the static path
    with pytest.raises(ValueError, match=message):
        attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    with pytest.raises(ValueError, match=message):  # the block-sparse path says the same
        attnc.flex_attention(q, k, v, block_mask=bm.to_torch(), enable_gqa=True)


def test_a_block_mask_broadcasts_from_one_batch_and_head():
    q, k, v = _qkv(torch.float32, seed=11)
    for b, h in ((1, 1), (B, 1), (1, HQ), (B, HQ)):
        bm = attnc.create_block_mask(_causal_mask, b, h, M, N, device="cpu", BLOCK_SIZE=32)
        out = attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
        ref = torch_flex(q.double(), k.double(), v.double(), block_mask=bm.to_torch(),
                         enable_gqa=True)
        assert rel_error(out, ref) < 1e-5, (b, h)


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: attnc.flex_attention(None, k, v), "query must be a 4-D tensor"),
    (lambda q, k, v: attnc.flex_attention(q.int(), k.int(), v.int(), enable_gqa=True),
     "flex_attention: query has dtype torch.int32"),
    (lambda q, k, v: attnc.flex_attention(q, k.double(), v, enable_gqa=True),
     "flex_attention: key has dtype torch.float64"),
    (lambda q, k, v: attnc.flex_attention(q, k, v, enable_gqa="yes"), "enable_gqa must be"),
    (lambda q, k, v: attnc.flex_attention(q, k, v, enable_gqa=True, return_lse=None),
     "return_lse must be"),
    (lambda q, k, v: attnc.flex_attention(q, k, v, enable_gqa=True, scale="x"),
     "scale must be a Python number"),
    (lambda q, k, v: attnc.flex_attention(q, k, v, enable_gqa=True, block_mask=3),
     "block_mask must be"),
    (lambda q, k, v: attnc.flex_attention(q.to("meta"), k.to("meta"), v.to("meta"),
                                          enable_gqa=True), "device meta is not supported"),
])
def test_bad_arguments_name_flex_attentions_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(*_qkv(torch.float32, seed=12))
