"""Multi-head latent attention (DeepSeek-V2's MLA) decoding from a paged latent cache.

    python examples/mla_decode.py [--steps 4]

Per token the cache holds the latent c (Dc numbers) and the rotated rope key kr (Dr numbers),
shared by every head, instead of H keys and values. The library spec `mla` is the absorbed form:
each head's key up-projection W_uk[h] is folded into its query (q_abs = x_nope W_uk[h]^T), the
latent is key and value (`v = k`), and the output's up-projection W_uv[h] is applied after.
`attnc.serving.MLADecoder` keeps the cache (attnc.PagedKVCache, copy-on-write forks), rotates
each key once as it is appended and the queries at each step, and calls the paged kernel.

Two prompts of different lengths prefill, the first is forked (both continuations share its
pages), then all three decode token by token. Each step prints the largest difference of the
decoder's per-head outputs from (a) the regular `mla` kernel over each whole sequence
(contiguous, rope inside the kernel) and (b) naive MLA in torch (per-head keys and values
up-projected from the latent). Runs in well under a minute on a CPU (Triton's interpreter).
"""

from __future__ import annotations

import argparse
import math

import torch

import attnc
from attnc.serving import MLADecoder

HIDDEN, H, DN, DR, DC, DV = 64, 4, 16, 16, 32, 16


def rotate(x, pos, theta=10000.0):
    """Interleaved rotary embedding of x [..., T, D] by positions pos [T]."""
    inv = theta ** (-2.0 * torch.arange(x.shape[-1] // 2, dtype=torch.float64) / x.shape[-1])
    angle = pos.double()[:, None] * inv
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)


class Weights:
    """A random MLA attention layer's projections (the query without its own low-rank step)."""

    def __init__(self, g: torch.Generator):
        def w(*shape):
            return torch.randn(*shape, generator=g) / math.sqrt(shape[-2])
        self.dkv, self.kr = w(HIDDEN, DC), w(HIDDEN, DR)        # down to the latent, rope key
        self.q_nope, self.q_rope = w(HIDDEN, H * DN), w(HIDDEN, H * DR)
        self.uk, self.uv = w(H, DC, DN), w(H, DC, DV)           # latent up to keys, values

    def token(self, x):
        """x [T, HIDDEN] -> latent c [T, Dc], rope key kr [T, Dr], query parts [H, T, Dn/Dr]."""
        T = x.shape[0]
        return (x @ self.dkv, x @ self.kr, (x @ self.q_nope).view(T, H, DN).transpose(0, 1),
                (x @ self.q_rope).view(T, H, DR).transpose(0, 1))


def naive_mla(w: Weights, xs, scale):
    """The last row's per-head output [H, 1, Dv] of MLA as written: keys [c W_uk ; rope(kr)],
    values c W_uv, causal softmax."""
    c, kr, q_nope, q_rope = w.token(xs)
    pos = torch.arange(xs.shape[0])
    keys = torch.cat([torch.einsum("nc,hcd->hnd", c, w.uk),
                      rotate(kr, pos).expand(H, -1, -1)], -1)
    query = torch.cat([q_nope[:, -1:], rotate(q_rope[:, -1:], pos[-1:])], -1)
    weights = torch.softmax(query @ keys.transpose(-1, -2) * scale, -1)
    return weights @ torch.einsum("nc,hcd->hnd", c, w.uv)


def regular_mla(kernel, w: Weights, xs, scale):
    """The last row's output [H, 1, Dv] from the regular `mla` kernel over the whole sequence."""
    c, kr, q_nope, q_rope = w.token(xs)
    pos = torch.arange(xs.shape[0])[None]
    q_abs = torch.einsum("hmd,hcd->hmc", q_nope, w.uk)
    latent = kernel(q_abs[None], c[None, None], qr=q_rope[None], kr=kr[None, None],
                    pos_q=pos, pos_k=pos, scale=scale)
    return torch.einsum("hmc,hcd->hmd", latent[0, :, -1:], w.uv)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    w = Weights(g)
    kernel = attnc.load("mla", block_m=16, block_n=16)
    scale = 1 / math.sqrt(DN + DR)
    dec = MLADecoder(num_pages=16, page_size=4, latent_dim=DC, rope_dim=DR, kernel=kernel)
    print(f"cache per token and layer: {DC + DR} numbers (latent {DC} + rope key {DR}); "
          f"per-head keys and values would take {H * (DN + DR + DV)}")

    prompts = [torch.randn(5, HIDDEN, generator=g), torch.randn(11, HIDDEN, generator=g)]
    seqs = [dec.new_sequence() for _ in prompts]
    for seq, x in zip(seqs, prompts):  # prefill: the prompts' latents and rope keys
        c, kr, _, _ = w.token(x)
        dec.append(seq, 0, c, kr)
    child = dec.fork(seqs[0])
    history = {seqs[0]: prompts[0], seqs[1]: prompts[1], child: prompts[0]}
    batch = [seqs[0], seqs[1], child]
    print(f"prompts of {len(prompts[0])} and {len(prompts[1])} tokens, a fork of the first; "
          f"{dec.cache.free_pages} of {dec.cache.num_pages} pages free")
    worst = 0.0
    for step in range(args.steps):
        xs = torch.randn(len(batch), 1, HIDDEN, generator=g)
        parts = [w.token(x) for x in xs]
        c, kr = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        q_abs = torch.stack([torch.einsum("hmd,hcd->hmc", p[2], w.uk) for p in parts])
        qr = torch.stack([p[3] for p in parts])
        latent = dec.decode(0, batch, q_abs, qr, c, kr, scale=scale)
        out = torch.einsum("bhmc,hcd->bhmd", latent, w.uv)
        errors = []
        for b, seq in enumerate(batch):
            history[seq] = torch.cat([history[seq], xs[b]])
            errors.append((float((out[b] - regular_mla(kernel, w, history[seq], scale))
                                 .abs().max()),
                           float((out[b] - naive_mla(w, history[seq], scale)).abs().max())))
        kernel_err, naive_err = max(e[0] for e in errors), max(e[1] for e in errors)
        worst = max(worst, kernel_err, naive_err)
        lengths = ", ".join(str(dec.length(s)) for s in batch)
        print(f"step {step}: lengths {lengths}: max |paged - regular mla kernel| "
              f"{kernel_err:.2e}, max |paged - naive MLA| {naive_err:.2e}")
    print(f"worst max error over {args.steps} steps: {worst:.2e}; "
          f"{dec.cache.free_pages} of {dec.cache.num_pages} pages free")
    for seq in batch:
        dec.free(seq)
    print(f"after freeing every sequence: {dec.cache.free_pages} pages free")


if __name__ == "__main__":
    main()
