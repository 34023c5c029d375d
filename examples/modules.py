"""attnc.nn layers in a tiny language model: train a few steps, then decode with caches.

    python examples/modules.py [--steps 4] [--tokens 4]

The model mixes a softmax layer (`attnc.nn.Attention`, GQA, rotary positions from the `rope`
spec) and an fla-style gated linear layer (`attnc.nn.LinearAttention`, spec `gla`). Training
runs the kernels' forward and backward, fitting one batch of a toy task (continue a repeating
pattern) for a few steps. Decoding
feeds one token at a time: the softmax layer appends its rotated keys to an `attnc.nn.KVCache`
and attends through `kernel.paged`, the linear layer carries its recurrent state in an
`attnc.nn.LinearCache`. The example checks that each decoded step's logits equal those of the
full forward over the tokens so far.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import attnc

VOCAB, HIDDEN = 16, 32


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.attn = attnc.nn.Attention(HIDDEN, num_heads=4, num_kv_heads=2, spec="rope", rot=8)
        self.mixer = attnc.nn.LinearAttention(HIDDEN, num_heads=2, spec="gla")
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(),
                                 nn.Linear(4 * HIDDEN, HIDDEN))
        self.norms = nn.ModuleList([nn.RMSNorm(HIDDEN) for _ in range(4)])
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids, kv_cache=None, linear_cache=None):
        x = self.emb(ids)
        x = x + self.attn(self.norms[0](x), cache=kv_cache)
        x = x + self.mixer(self.norms[1](x), cache=linear_cache)[0]
        x = x + self.mlp(self.norms[2](x))
        return self.head(self.norms[3](x))


def batch(generator: torch.Generator, B: int = 2, T: int = 12) -> torch.Tensor:
    """Sequences repeating a random pattern of 3 tokens: predictable after the first period."""
    pattern = torch.randint(0, VOCAB, (B, 3), generator=generator)
    return pattern.repeat(1, T // 3 + 1)[:, :T]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = batch(torch.Generator().manual_seed(1))  # one batch, fitted for a few steps
    for step in range(args.steps):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.4f}")

    prompt = ids[:, :5]
    kv, state = attnc.nn.KVCache(), attnc.nn.LinearCache()
    tokens, worst = prompt, 0.0
    with torch.no_grad():
        logits = model(prompt, kv, state)[:, -1]  # prefill: the prompt's keys and final state
        for _ in range(args.tokens):
            full = model(tokens)[:, -1]  # the whole prefix again: what the caches must equal
            worst = max(worst, ((logits - full).abs().max() / full.abs().max()).item())
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            logits = model(nxt, kv, state)[:, -1]
    for row in tokens.tolist():
        print("decoded", row[:5], "->", row[5:])
    print(f"cached decoding vs full forward: worst relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
