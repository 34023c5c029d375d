"""Train a tiny character-level decoder-only language model whose attention is an attnc kernel
with a learnable relative-position bias, and print the loss as it falls.

The text is attnc's own README (it ships with the repository). Every layer owns its bias table
`bias[h, distance]`, an ordinary nn.Parameter; its gradient comes from attnc's fused backward
kernels, like those of q, k and v. On a machine without CUDA the kernels run through Triton's
interpreter, so the model is small (a few minutes for the default steps); with CUDA the same
script trains a larger model on longer contexts.

    python examples/train_tiny_lm.py [--steps N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import attnc

SPEC = """
# causal attention with a learned per-head bias on the (clipped) distance to the key
attention causal_rel_bias {
  option max_distance = 32
  param bias[h, max_distance + 1]
  score = dot(q, k) * scale + bias[h, clamp(m - n, 0, max_distance)]
  mask = n <= m
}
"""
MAX_DISTANCE = 32


class Attention(nn.Module):
    def __init__(self, kernel, d_model: int, heads: int):
        super().__init__()
        self.kernel, self.heads = kernel, heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.bias = nn.Parameter(torch.zeros(heads, MAX_DISTANCE + 1))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = self.kernel(q, k, v, bias=self.bias)  # [B, heads, T, C / heads]
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, kernel, d_model: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(kernel, d_model, heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, kernel, vocab: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(kernel, d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # (batch, context, d_model, heads, layers, steps, tile): the CPU sizes keep the interpreter
    # to a few minutes; one 64-wide tile covers a whole CPU context
    B, T, C, H, L, steps, tile = ((32, 256, 256, 4, 4, 600, 64) if cuda
                                  else (4, 64, 64, 2, 2, 200, 64))
    steps = args.steps or steps
    dtype = torch.bfloat16 if cuda else torch.float32

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]

    kernel = attnc.compile(SPEC, block_m=tile, block_n=tile)
    torch.manual_seed(0)
    model = TinyLM(kernel, len(chars), C, H, L).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if not cuda else 1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)

    def batch(source):
        starts = torch.randint(0, len(source) - T - 1, (B,), generator=g)
        x = torch.stack([source[s:s + T] for s in starts])
        y = torch.stack([source[s + 1:s + T + 1] for s in starts])
        return x.to(device), y.to(device)

    def loss_on(source):
        x, y = batch(source)
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            logits = model(x)
        return nn.functional.cross_entropy(logits.float().view(-1, len(chars)), y.view(-1))

    print(f"{len(text)} characters of README.md, vocabulary {len(chars)}; model "
          f"{sum(p.numel() for p in model.parameters())} parameters, {L} layers x {H} heads, "
          f"context {T}, on {'CUDA' if cuda else 'CPU (Triton interpreter)'}")
    print(f"step     0  loss {loss_on(train).item():.3f}  (uniform: {math.log(len(chars)):.3f})")
    start = time.time()
    for step in range(1, steps + 1):
        loss = loss_on(train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            with torch.no_grad():
                val = loss_on(valid).item()
            print(f"step {step:5d}  loss {loss.item():.3f}  valid {val:.3f}  "
                  f"({time.time() - start:.0f} s)")
    bias = model.blocks[0].attn.bias.detach().float().cpu()
    print("layer 0 bias per head, distances 0..7:")
    for h in range(H):
        print("  head", h, " ".join(f"{x:+.2f}" for x in bias[h, :8].tolist()))


if __name__ == "__main__":
    main()
