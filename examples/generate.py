"""Greedy generation with transformers: eager attention against an attnc sliding-window kernel
reading its keys and values from an attnc.PagedKVCache; the token streams must be identical.

    python examples/generate.py [--window 8] [--new-tokens 16] [--page-size 4]

The model is a small Llama-style decoder with random weights (seeded, nothing downloaded):
transformers' Mistral, which is Llama with a sliding window, so the model itself implements
the window the attnc variant runs. The eager run is transformers' own attention and its
DynamicCache; the attnc run registers `sliding_window` (window = the model's) as an attention
implementation and generates with a PagedCache: every step appends the new keys and values to
fixed-size pages and the kernel reads them through the page table (`kernel.paged`). Two
left-padded prompts longer than the window, so the padding, the page boundaries and the window
all matter; a third run without the window shows that they do. Exit status 1 if the streams
differ.
"""

from __future__ import annotations

import argparse
import sys

# attnc before transformers: without CUDA it switches Triton to its interpreter first
import attnc  # noqa: F401, I001
import attnc.backends.triton  # noqa: F401
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from attnc.integrations import transformers as attnc_hf
from attnc.integrations.hf_paged import PagedCache


def model_with(attn: str, window: int | None):
    """The same random weights every time (seed 0), with attention `attn`."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, sliding_window=window)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def prompts(window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, 2 * window and window + 3 tokens, the shorter one left-padded."""
    gen = torch.Generator().manual_seed(1)
    long, short = 2 * window, window + 3
    ids = torch.randint(3, 128, (2, long), generator=gen)
    mask = torch.ones(2, long, dtype=torch.long)
    ids[1, :long - short], mask[1, :long - short] = 0, 0
    return ids, mask


def greedy(model, ids, mask, new: int, cache=None) -> torch.Tensor:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=0, eos_token_id=None, cache=cache)
    return out[:, ids.shape[1]:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=4)
    args = parser.parse_args(argv)
    ids, mask = prompts(args.window)

    eager = greedy(model_with("eager", args.window), ids, mask, args.new_tokens)
    attnc_hf.register("attnc_swa", "sliding_window", window=args.window)
    model = model_with("attnc_swa", args.window)
    rows = ids.shape[1] + args.new_tokens
    cache = PagedCache.for_model(model, num_pages=2 * -(-rows // args.page_size),
                                 page_size=args.page_size)
    paged = greedy(model, ids, mask, args.new_tokens, cache)
    unwindowed = greedy(model_with("eager", None), ids, mask, args.new_tokens)

    print(f"Mistral-style model, 2 layers, sliding window {args.window}; prompts of "
          f"{mask.sum(1).tolist()} tokens (left-padded to {ids.shape[1]})")
    for b in range(ids.shape[0]):
        print(f"prompt {b}:")
        print(f"  eager + DynamicCache        {eager[b].tolist()}")
        print(f"  attnc_swa + PagedCache      {paged[b].tolist()}")
        print(f"  eager without the window    {unwindowed[b].tolist()}")
    kv = cache.kv
    print(f"paged cache: {kv.num_pages} pages of {kv.page_size} tokens, "
          f"{kv.num_pages - kv.free_pages} in use; sequence lengths "
          f"{[kv.length(s) for s in cache.sequences]}")
    print(f"without the window the streams differ: {not torch.equal(unwindowed, eager)}")
    same = torch.equal(paged, eager)
    print("identical token streams" if same else "TOKEN STREAMS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
