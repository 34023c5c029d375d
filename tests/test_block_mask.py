"""attnc.create_block_mask against torch's: same tensors, and no mask evaluation when static."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import attnc
from attnc.block_mask import _Grid, dense_to_ordered, ordered_to_dense
from attnc.testing import rel_error

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(w):
    return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx < w) & (q_idx >= kv_idx)


def prefix(p):
    return lambda b, h, q_idx, kv_idx: kv_idx < p


def chunked(c):
    return lambda b, h, q_idx, kv_idx: q_idx // c == kv_idx // c


def sinks(s):
    return lambda b, h, q_idx, kv_idx: kv_idx < s


def per_head_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 16 * (h + 1))


def bidirectional_band(b, h, q_idx, kv_idx):
    return torch.abs(q_idx - kv_idx) <= 20


STATIC = {
    "causal": causal,
    "inverse_causal": lambda b, h, q_idx, kv_idx: q_idx <= kv_idx,
    "sliding_window": window(40),
    "prefix_lm": attnc.or_masks(causal, prefix(50)),
    "chunked_causal": attnc.and_masks(causal, chunked(48)),
    "streaming": attnc.and_masks(causal, attnc.or_masks(sinks(4), window(33))),
    "per_head_window": per_head_window,
    "band": bidirectional_band,
    "noop": attnc.noop_mask,
    "empty_rows": lambda b, h, q_idx, kv_idx: (kv_idx > q_idx + 150),
    "row_condition": lambda b, h, q_idx, kv_idx: (q_idx >= 30) & (kv_idx < 90),
}

doc_ids = torch.randint(0, 5, (2, 300), generator=torch.Generator().manual_seed(0)).sort(-1).values
keep = torch.rand(2, 4, 300, generator=torch.Generator().manual_seed(1)) > 0.3

DATA = {
    "document": lambda b, h, q_idx, kv_idx: ((doc_ids[b, q_idx] == doc_ids[b, kv_idx])
                                             & (q_idx >= kv_idx)),
    "dilated": lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx) % 3 == 0),
    "keep_keys": lambda b, h, q_idx, kv_idx: keep[b, h, kv_idx] | (q_idx == kv_idx),
}

SHAPES = [(1, 1, 300, 300, 32), (2, 4, 211, 173, (32, 64)), (2, 4, 300, 257, 128),
          (1, 2, 77, 130, (64, 16))]


def _same_as_torch(mask_mod, B, H, M, N, bs):
    ours = attnc.create_block_mask(mask_mod, B, H, M, N, device="cpu", BLOCK_SIZE=bs)
    theirs = torch_block_mask(mask_mod, B, H, M, N, device="cpu", BLOCK_SIZE=bs)
    for f in FIELDS:
        assert torch.equal(getattr(ours, f), getattr(theirs, f)), f
    assert ours.BLOCK_SIZE == tuple(theirs.BLOCK_SIZE) and ours.seq_lengths == theirs.seq_lengths
    return ours


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-{s[4]}")
@pytest.mark.parametrize("name", list(STATIC))
def test_static_masks_match_torch_without_evaluating_the_mask(name, shape, monkeypatch):
    def no_evaluation(*args):
        raise AssertionError("a statically analyzable mask was evaluated")
    monkeypatch.setattr(_Grid, "evaluate", no_evaluation)
    _same_as_torch(STATIC[name], *shape)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("name", list(DATA))
def test_data_dependent_masks_match_torch(name, shape):
    B, H, M, N, bs = shape
    _same_as_torch(DATA[name], 2, 4, min(M, 300), min(N, 300), bs)


def test_slabs_cover_every_query_block(monkeypatch):
    import attnc.block_mask as module
    monkeypatch.setattr(module, "_SLAB_ELEMENTS", 1)  # one query block per slab
    _same_as_torch(DATA["document"], 2, 1, 300, 300, 32)


def test_ordered_and_dense_round_trip():
    dense = (torch.rand(2, 3, 5, 7) > 0.5).to(torch.int32)
    num, idx = dense_to_ordered(dense)
    assert torch.equal(ordered_to_dense(num, idx, 7), dense)


def test_block_mask_api_and_torch_round_trip():
    bm = attnc.create_block_mask(causal, None, None, 300, 300, device="cpu", BLOCK_SIZE=64)
    assert bm.shape == (1, 1, 300, 300) and bm.derived
    dense = bm.to_dense()
    assert dense.shape == (1, 1, 5, 5)
    assert torch.equal(dense[0, 0].diagonal(), torch.ones(5, dtype=torch.int32))  # partial
    assert (dense[0, 0].tril(-1)[:4] == 2 * torch.ones(4, 5, dtype=torch.int32).tril(-1)[:4]).all()
    assert 0 < bm.sparsity() < 100
    back = attnc.BlockMask.from_torch(bm.to_torch())
    assert not back.derived
    for f in FIELDS:
        assert torch.equal(getattr(back, f), getattr(bm, f))
    assert "BlockMask" in repr(bm)


Q_FIELDS = ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
TRANSPOSED = {"causal": causal, "sliding_window": STATIC["sliding_window"],
              "document": DATA["document"], "no_full_blocks": DATA["dilated"]}


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s[:4])) + f"-{s[4]}")
@pytest.mark.parametrize("name", list(TRANSPOSED))
def test_query_block_lists_match_torch(name, shape):
    """Ragged lengths, Q_LEN != KV_LEN, square and non-square blocks."""
    B, H, M, N, bs = shape
    ours = attnc.create_block_mask(TRANSPOSED[name], B, H, M, N, device="cpu", BLOCK_SIZE=bs)
    theirs = torch_block_mask(TRANSPOSED[name], B, H, M, N, device="cpu", BLOCK_SIZE=bs)
    if name == "no_full_blocks":
        assert not theirs.full_kv_num_blocks.any()
    for bm in (ours, attnc.BlockMask.from_torch(theirs)):
        for f in Q_FIELDS:
            assert getattr(bm, f).dtype == torch.int32 and getattr(bm, f).is_contiguous(), f
            assert torch.equal(getattr(bm, f), getattr(theirs, f)), f


def test_query_block_lists_without_full_blocks_are_cached_and_follow_to():
    # query blocks 0, 1, 2 see key blocks {1}, {}, {1, 0}: 3 query blocks, 2 key blocks
    num = torch.tensor([[[1, 0, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[1, 0], [0, 1], [1, 0]]]], dtype=torch.int32)
    bm = attnc.BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=32)
    assert torch.equal(bm.q_num_blocks, torch.tensor([[[1, 2]]], dtype=torch.int32))
    assert torch.equal(bm.q_indices, torch.tensor([[[[2, 0, 1], [0, 2, 1]]]], dtype=torch.int32))
    assert torch.equal(bm.full_q_num_blocks, torch.zeros(1, 1, 2, dtype=torch.int32))
    assert torch.equal(bm.full_q_indices, torch.arange(3, dtype=torch.int32).expand(1, 1, 2, 3))
    assert bm.q_indices is bm.q_indices
    moved = bm.to("meta")
    assert all(getattr(moved, f).device.type == "meta" for f in Q_FIELDS)
    assert moved.q_indices.shape == (1, 1, 2, 3)
    with pytest.raises(AttributeError):
        bm.q_indices = idx


@pytest.mark.parametrize("bad, message", [
    ({"B": 0}, "B must be a positive int"),
    ({"BLOCK_SIZE": (32, 0)}, "BLOCK_SIZE"),
    ({"mask_mod": lambda b, h, q_idx, kv_idx: q_idx + kv_idx}, "returns a number"),
])
def test_create_block_mask_rejects_bad_arguments(bad, message):
    args = {"mask_mod": causal, "B": 1, "H": 1, "Q_LEN": 64, "KV_LEN": 64, "BLOCK_SIZE": 32}
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        attnc.create_block_mask(args.pop("mask_mod"), args.pop("B"), args.pop("H"),
                                args.pop("Q_LEN"), args.pop("KV_LEN"), device="cpu", **args)


def test_from_kv_blocks_validates_shapes():
    with pytest.raises(ValueError, match="kv_indices must be"):
        attnc.BlockMask.from_kv_blocks(torch.zeros(1, 1, 3, dtype=torch.int32),
                                       torch.zeros(1, 1, 4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="or neither"):
        attnc.BlockMask.from_kv_blocks(torch.zeros(1, 1, 3, dtype=torch.int32),
                                       torch.zeros(1, 1, 3, 2, dtype=torch.int32),
                                       full_kv_num_blocks=torch.zeros(1, 1, 3, dtype=torch.int32))


# --- block-sparse kernels from .attn specs ----------------------------------------------------

def _qkv(B=2, H=4, Hkv=2, M=150, N=150, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


def test_attn_spec_compiled_block_sparse_follows_the_block_mask():
    q, k, v = _qkv()
    kern = attnc.load("document", block_sparse=True)
    doc = doc_ids[:, :150]
    bm = attnc.create_block_mask(lambda b, h, q_idx, kv_idx: (doc[b, q_idx] == doc[b, kv_idx])
                                 & (q_idx >= kv_idx), 2, 1, 150, 150, device="cpu", BLOCK_SIZE=32)
    out = kern(q, k, v, doc=doc, block_mask=bm)
    dense = attnc.load("document")(q, k, v, doc=doc)
    assert rel_error(out, dense) < 1e-5
    theirs = torch_flex(q.double(), k.double(), v.double(), block_mask=bm.to_torch(),
                        enable_gqa=True)
    assert rel_error(out, theirs) < 1e-5


def test_block_lists_restrict_the_keys_visited():
    """Blocks missing from the lists are skipped even where the mask is true, as in torch."""
    q, k, v = _qkv(B=1, H=2, Hkv=2, M=96, N=96)
    num = torch.tensor([[[1, 0, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[2, 0, 1], [0, 1, 2], [0, 1, 2]]]], dtype=torch.int32)
    bm = attnc.BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=32, seq_lengths=(96, 96))
    out, lse = attnc.compile("attention a {\n  score = dot(q, k) * scale\n}", block_sparse=True)(
        q, k, v, block_mask=bm, return_lse=True)
    # torch's eager flex_attention applies only mask_mod (its compiled kernels use the lists),
    # so the reference masks the elements of the listed blocks explicitly
    listed = (bm.to_dense() > 0).repeat_interleave(32, -2).repeat_interleave(32, -1)[0, 0]
    ref = torch_flex(q.double(), k.double(), v.double(),
                     score_mod=lambda s, b, h, q_idx, kv_idx: torch.where(
                         listed[q_idx, kv_idx], s, float("-inf")))
    assert rel_error(out, ref) < 1e-5
    assert torch.equal(out[:, :, 32:64], torch.zeros_like(out[:, :, 32:64]))
    assert torch.isneginf(lse[:, :, 32:64]).all() and not torch.isnan(out).any()


CAUSAL_SPEC = "attention a {\n  mask = n <= m\n}"


def test_block_sparse_kernels_check_their_block_mask():
    q, k, v = _qkv(B=1, H=2, Hkv=2, M=64, N=64)
    kern = attnc.compile(CAUSAL_SPEC, block_sparse=True)
    with pytest.raises(ValueError, match="needs block_mask"):
        kern(q, k, v)
    with pytest.raises(ValueError, match="takes no block_mask"):
        attnc.compile(CAUSAL_SPEC)(q, k, v, block_mask=object())
    bm = attnc.create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="lengths"):
        kern(q[:, :, :40], k, v, block_mask=bm)
    odd = attnc.create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=24)
    with pytest.raises(ValueError, match="power of two"):
        kern(q, k, v, block_mask=odd)
    with pytest.raises(ValueError, match="block_sparse must be"):
        attnc.compile(CAUSAL_SPEC, block_sparse="yes")


# --- full blocks skip the mask; a block mask's own mask_mod -----------------------------------

def _lists_with_full_blocks_over_a_false_mask():
    """M = 64, N = 80, blocks of 32 (the last key block is 16 keys long): query block 0 lists
    key block 0 as partial and 1, 2 as full; query block 1 lists 1 as partial and 2 as full.
    Under a causal mask every full block here lies where the mask is False."""
    num = torch.tensor([[[1, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 1, 2], [1, 0, 2]]]], dtype=torch.int32)
    full_num = torch.tensor([[[2, 1]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[1, 2, 0], [2, 0, 1]]]], dtype=torch.int32)
    return num, idx, full_num, full_idx


def _visible_by_the_rule(num, idx, full_num, full_idx, mask, M, N, block):
    """FlexAttention's rule, materialized: a full block's keys are all visible, a partial
    block's keys where the mask is, unlisted blocks' none."""
    visible = torch.zeros(M, N, dtype=torch.bool)
    for qb in range(num.shape[-1]):
        rows = slice(qb * block, (qb + 1) * block)
        for j in range(int(full_num[0, 0, qb])):
            kb = int(full_idx[0, 0, qb, j])
            visible[rows, kb * block:(kb + 1) * block] = True
        for j in range(int(num[0, 0, qb])):
            kb = int(idx[0, 0, qb, j])
            keys = slice(kb * block, (kb + 1) * block)
            visible[rows, keys] = mask[rows, keys]
    return visible


@pytest.mark.parametrize("route", ["flex_attention", "block_sparse_spec"])
def test_full_blocks_skip_the_mask_forward_and_backward(route):
    """A full block runs without the mask even where the mask is False (the last tile of the
    last key block, which reaches past N, applied the mask before). Gradients likewise."""
    from tests.sparse_reference import masked_attention
    M, N = 64, 80
    lists = _lists_with_full_blocks_over_a_false_mask()
    causal_mask = torch.arange(N)[None, :] <= torch.arange(M)[:, None]
    visible = _visible_by_the_rule(*lists, causal_mask, M, N, 32)
    assert (visible & ~causal_mask).any()  # the full blocks do open masked positions
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, H=2, Hkv=1, M=M, N=N, D=16, seed=4))
    if route == "flex_attention":
        bm = attnc.BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=32, mask_mod=causal,
                                            seq_lengths=(M, N))
        out, lse = attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                                        return_lse=True)
    else:
        bm = attnc.BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=32, seq_lengths=(M, N))
        out, lse = attnc.compile(CAUSAL_SPEC, block_sparse=True)(q, k, v, block_mask=bm,
                                                                  return_lse=True)
    ref, ref_lse = masked_attention(q, k, v, visible.expand(1, 2, M, N), return_lse=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-5)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(out, (q, k, v), d_out)
    want = torch.autograd.grad(ref, (q, k, v), d_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4)


def _ignored_warnings(record) -> list:
    return [w for w in record if "is ignored" in str(w.message)]


def test_a_block_masks_own_mask_mod_is_warned_about_once():
    """A block-sparse kernel compiled from a spec masks partial blocks with the spec's mask; a
    BlockMask bringing another mask_mod had it dropped silently."""
    q, k, v = _qkv(B=1, H=2, Hkv=2, M=64, N=64)
    kern = attnc.compile(CAUSAL_SPEC, block_sparse=True)
    other = attnc.create_block_mask(window(20), 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
    with pytest.warns(UserWarning, match=r"mask_mod '<lambda>' is ignored.*n <= m"):
        kern(q, k, v, block_mask=other)
    import warnings
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kern(q, k, v, block_mask=other)  # once per kernel
        kern(q, k, v, block_mask=other.to_torch())
    assert not _ignored_warnings(record)


def test_no_warning_when_nothing_of_the_mask_mod_is_ignored():
    import warnings
    q, k, v = _qkv(B=1, H=2, Hkv=2, M=64, N=64)
    kern = attnc.compile(CAUSAL_SPEC + "\n", block_sparse=True)  # a kernel of its own
    same = attnc.create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
    plain = attnc.BlockMask.from_kv_blocks(same.kv_num_blocks, same.kv_indices,
                                           BLOCK_SIZE=32, seq_lengths=(64, 64))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kern(q, k, v, block_mask=same)                   # the spec's mask, traced
        kern(q, k, v, block_mask=same.to_torch())        # the same, as torch's
        kern(q, k, v, block_mask=plain)                  # no mask_mod (noop)
        kern(q, k, v, block_mask=plain.to_torch())       # torch's noop_mask
        attnc.flex_attention(q, k, v, block_mask=other_doc_mask())  # flex applies its mod
    assert not _ignored_warnings(record)


def other_doc_mask():
    doc = torch.tensor([[0] * 20 + [1] * 44])
    return attnc.create_block_mask(lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx],
                                   1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
