"""attnc.integrations.hf_paged: transformers generation with K/V in an attnc.PagedKVCache.

The cache's mechanics are checked with a torch attention that reads K/V through the page table
(so they do not depend on attnc's kernels); the attnc backend end to end with
`attnc.integrations.transformers.register` and `kernel.paged`."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnc.backends.triton  # noqa: F401 - before transformers imports Triton (CPU interpreter)

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AttentionMaskInterface,
    AutoModelForCausalLM,
    DynamicCache,
    DynamicLayer,
    LlamaConfig,
    MistralConfig,
)
from transformers.masking_utils import eager_mask  # noqa: E402
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

from attnc import PagedKVCache  # noqa: E402
from attnc.integrations import hf_paged  # noqa: E402
from attnc.integrations.hf_paged import PagedCache, paged_view  # noqa: E402

SIZES: dict[str, Any] = dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128)


def gather(pages: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """[B, H, max(lens), D] rows of each sequence read through its page table (zeros past its
    length)."""
    page_size = pages.shape[1]
    out = pages.new_zeros(len(lens), pages.shape[2], int(lens.max()), pages.shape[3])
    for b, n in enumerate(lens.tolist()):
        for r in range(n):
            out[b, :, r] = pages[table[b, r // page_size], r % page_size]
    return out


def table_attention(module, query, key, value, attention_mask, **kw):
    """Eager attention over K/V read through a PagedView's page table."""
    view = paged_view(key)
    assert view is not None, "the paged cache must hand the attention a PagedView"
    k = gather(view.k_pages, view.page_table, view.kv_lens)
    v = gather(view.v_pages, view.page_table, view.kv_lens)
    assert k.shape == key.shape and v.shape == value.shape
    return eager_attention_forward(module, query, k, v, attention_mask, **kw)


def blind_attention(module, query, key, value, attention_mask, **kw):
    """An attention that does not know paged views: it reads the stand-ins."""
    return eager_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("test_paged_table", table_attention)
AttentionMaskInterface.register("test_paged_table", eager_mask)
AttentionInterface.register("test_paged_blind", blind_attention)
AttentionMaskInterface.register("test_paged_blind", eager_mask)


def llama(attn: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**SIZES), attn_implementation=attn).eval()


def prompts():
    """Two left-padded prompts (5 and 3 tokens)."""
    ids = torch.tensor([[5, 17, 3, 40, 9], [0, 0, 22, 8, 31]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    return ids, mask


def greedy(model, ids, mask, cache, new=6):
    return model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new,
                          do_sample=False, pad_token_id=0)


def test_pages_hold_what_dynamic_cache_holds():
    model = llama("test_paged_table")
    ids, mask = prompts()
    dyn, paged = DynamicCache(), PagedCache.for_model(model, num_pages=8, page_size=4)
    with torch.no_grad():
        want = llama("eager")(ids, attention_mask=mask, cache=dyn).logits
        got = model(ids, attention_mask=mask, cache=paged).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert paged.get_seq_length() == 5 and len(paged.sequences) == 2
    for layer in range(SIZES["num_hidden_layers"]):
        for b, seq in enumerate(paged.sequences):
            k = paged.kv.gather(seq, layer, "k").transpose(0, 1)
            v = paged.kv.gather(seq, layer, "v").transpose(0, 1)
            cached = dyn.layers[layer]
            assert isinstance(cached, DynamicLayer)
            assert cached.keys is not None and cached.values is not None
            assert torch.equal(k, cached.keys[b]) and torch.equal(v, cached.values[b])


def test_generate_matches_eager_with_dynamic_cache():
    ids, mask = prompts()
    want = greedy(llama("eager"), ids, mask, DynamicCache())
    model = llama("test_paged_table")
    cache = PagedCache.for_model(model, num_pages=8, page_size=4)
    got = greedy(model, ids, mask, cache)
    assert torch.equal(got, want)
    # every token but the last generated one went through the pages
    assert [cache.kv.length(s) for s in cache.sequences] == [want.shape[1] - 1] * 2


def test_the_update_returns_stand_ins_carrying_the_view():
    kv = PagedKVCache(4, 2, {"k": (2, 8), "v": (2, 8)}, num_layers=1, dtype=torch.float32)
    cache = PagedCache(kv)
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    sk, sv = cache.update(k, v, 0)
    assert sk.shape == k.shape and sv.shape == v.shape and bool(sk.isnan().all())
    view = paged_view(sk)
    assert view is not None and view is paged_view(sv) and paged_view(k) is None
    assert view.kv_lens.tolist() == [3, 3] and view.page_table.dtype == torch.int32
    assert torch.equal(gather(view.k_pages, view.page_table, view.kv_lens), k)
    sk, _ = cache.update(k[:, :, :1], v[:, :, :1], 0)
    view = paged_view(sk)
    assert sk.shape[2] == 4 and view is not None and view.kv_lens.tolist() == [4, 4]


def test_an_attention_that_ignores_the_view_gives_nan():
    model = llama("test_paged_blind")
    ids, mask = prompts()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask,
                       cache=PagedCache.for_model(model, num_pages=8, page_size=4)).logits
    assert bool(logits.isnan().all())


def test_forked_prompt_continues_in_each_child():
    model = llama("test_paged_table")
    prompt = torch.tensor([[5, 17, 3, 40, 9, 11]])
    kv = PagedCache.for_model(model, num_pages=16, page_size=4).kv
    parent = PagedCache(kv)
    with torch.no_grad():
        model(prompt, cache=parent)
    seq = parent.sequences[0]
    before = kv.gather(seq, 0, "k").clone()
    children = [kv.fork(seq), kv.fork(seq)]
    ids = torch.cat([prompt.repeat(2, 1), torch.tensor([[7], [50]])], 1)
    got = greedy(model, ids, torch.ones_like(ids), PagedCache(kv, children), new=4)
    want = greedy(llama("eager"), ids, torch.ones_like(ids), DynamicCache(), new=4)
    assert torch.equal(got, want)
    assert torch.equal(kv.gather(seq, 0, "k"), before) and kv.length(seq) == 6


def test_bad_arguments_and_unsupported_generation_modes():
    kv = PagedKVCache(8, 4, {"k": (2, 8), "v": (2, 8)}, num_layers=2, dtype=torch.float32)
    a, b = kv.new_sequence(), kv.new_sequence()
    kv.append(a, 0, k=torch.randn(3, 2, 8), v=torch.randn(3, 2, 8))
    kv.append(a, 1, k=torch.randn(3, 2, 8), v=torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="same number of tokens"):
        PagedCache(kv, [a, b])
    with pytest.raises(ValueError, match="fields 'k' and 'v'"):
        PagedCache(PagedKVCache(4, 2, {"c": (8,)}, dtype=torch.float32))
    with pytest.raises(ValueError, match="kv must be an attnc.PagedKVCache"):
        PagedCache(DynamicCache())  # type: ignore[arg-type]
    cache = PagedCache(kv, [b])
    with pytest.raises(ValueError, match="key_states has batch 2"):
        cache.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), 0)
    with pytest.raises(ValueError, match="layer_idx must be in"):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 2)
    with pytest.raises(ValueError, match="dtype"):
        cache.update(torch.randn(1, 2, 1, 8, dtype=torch.float64),
                     torch.randn(1, 2, 1, 8, dtype=torch.float64), 0)
    model = llama("test_paged_table")
    ids, mask = prompts()
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2,
                       do_sample=False, pad_token_id=0,
                       cache=PagedCache.for_model(model, num_pages=8, page_size=4))


def test_free_returns_the_pages():
    model = llama("test_paged_table")
    cache = PagedCache.for_model(model, num_pages=8, page_size=4)
    ids, mask = prompts()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    assert cache.kv.free_pages == 4
    cache.free()
    assert cache.kv.free_pages == 8 and cache.kv.sequences == []


def mistral(attn: str, window: int):
    torch.manual_seed(0)
    config = MistralConfig(**SIZES, sliding_window=window)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def test_attnc_sliding_window_through_pages_matches_eager():
    from attnc.integrations import transformers as attnc_hf
    window = 4
    attnc_hf.register("attnc_test_paged_swa", "sliding_window", window=window)
    ids, mask = prompts()
    want = greedy(mistral("eager", window), ids, mask, DynamicCache(), new=8)
    model = mistral("attnc_test_paged_swa", window)
    got = greedy(model, ids, mask, PagedCache.for_model(model, num_pages=16, page_size=4), new=8)
    assert torch.equal(got, want)


def test_hf_paged_is_reachable_from_attnc_integrations():
    import attnc.integrations
    assert attnc.integrations.hf_paged is hf_paged


# --------------------------------------------------------------------- continuous batching

class TorchPaged:
    """`kernel.paged`'s contract written out in torch for a causal (optionally windowed) spec:
    key row r of sequence b at cache[table[b, r // page_size], r % page_size], position
    k_start + r; query row i at position q_start + i; padding rows give zeros."""

    def __init__(self, window=None):
        self.window = window
        self.k_starts: list[int] = []

    def paged(self, q, k_cache, v_cache, table, kv_lens, *, q_start, k_start, q_lens, scale):
        B, Hq, M, _ = q.shape
        out = q.new_zeros(B, Hq, M, v_cache.shape[-1])
        ps = k_cache.shape[1]
        self.k_starts += k_start.tolist()
        for b in range(B):
            n = int(kv_lens[b])
            idx = torch.arange(n)
            k = k_cache[table[b, idx // ps].long(), idx % ps].transpose(0, 1)   # [Hkv, n, D]
            v = v_cache[table[b, idx // ps].long(), idx % ps].transpose(0, 1)
            rep = Hq // k.shape[0]
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            m = int(q_start[b]) + torch.arange(M)[:, None]
            pos = int(k_start[b]) + idx[None, :]
            seen = (pos <= m) & (pos >= 0)
            if self.window is not None:
                seen &= m - pos < self.window
            s = (q[b] @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
            rows = (torch.arange(M) < int(q_lens[b])) & (m[:, 0] >= 0)
            out[b, :, rows] = (torch.softmax(s, -1) @ v)[:, rows]
        return out


def batched(model, prompts_, new):
    from transformers import ContinuousBatchingConfig, GenerationConfig
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=8, max_batch_tokens=32)
    out = model.generate_batch(prompts_, generation_config=config,
                               continuous_batching_config=cb, warmup=False)
    return [out[f"req_{i}"].generated_tokens for i in range(len(prompts_))]


CB_PROMPTS = [[5, 17, 3, 40, 9, 11, 2], [22, 8, 31], [7, 7, 60, 1, 33]]


def eager_tokens(model, new):
    return [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=-1)[0, len(p):].tolist()
            for p in CB_PROMPTS]


def test_continuous_batching_serves_llama_like_eager_generate():
    model = llama("eager")
    want = eager_tokens(model, 5)
    hf_paged.enable_continuous_batching(model, TorchPaged(), name="attnc_flash_test_full")
    assert batched(model, CB_PROMPTS, 5) == want


def test_continuous_batching_serves_sliding_window_layers():
    model = mistral("eager", 3)
    want = eager_tokens(model, 6)
    kernel = TorchPaged(3)
    hf_paged.enable_continuous_batching(model, kernel, name="attnc_flash_test_swa", window=3)
    assert batched(model, CB_PROMPTS, 6) == want
    assert max(kernel.k_starts) > 0  # transformers handed over trimmed windows


def test_continuous_batching_refuses_what_it_cannot_honor():
    attention = hf_paged.continuous_batching_attention(TorchPaged(4), window=4)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    cb = dict(cu_seq_lens_q=torch.tensor([0, 3]), cu_seq_lens_k=torch.tensor([0, 3]),
              position_ids=torch.arange(3)[None])
    out, _ = attention(None, q, k, k, None, scaling=0.5, sliding_window=4, **cb)
    assert out.shape == (1, 3, 4, 8)
    with pytest.raises(ValueError, match="sliding_window: .* 8 keys"):
        attention(None, q, k, k, None, scaling=0.5, sliding_window=8, **cb)
    with pytest.raises(ValueError, match="attention_mask"):
        attention(None, q, k, k, torch.ones(1, 1, 3, 3), scaling=0.5, **cb)
    with pytest.raises(ValueError, match="s_aux"):
        attention(None, q, k, k, None, scaling=0.5, s_aux=torch.zeros(4), **cb)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        attention(None, q, k, k, None, scaling=0.5)
    with pytest.raises(ValueError, match="name must contain 'flash'"):
        hf_paged.enable_continuous_batching(llama("eager"), TorchPaged(), name="attnc_cb")
    with pytest.raises(ValueError, match="no digit"):
        hf_paged.enable_continuous_batching(llama("eager"), TorchPaged(), name="flash2_attnc")


@pytest.mark.slow
def test_continuous_batching_with_an_attnc_sliding_window_kernel():
    model = mistral("eager", 3)
    want = eager_tokens(model, 4)
    kernel = hf_paged.enable_continuous_batching(model, "sliding_window",
                                                 name="attnc_flash_test_kernel", window=3)
    assert kernel.name == "sliding_window"
    assert batched(model, CB_PROMPTS, 4) == want
