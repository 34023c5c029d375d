"""Attention without softmax: compile three of the library's normalizer variants, run them
forward and backward on random data, and compare with eager PyTorch written from the math.

- sigmoid_attn: w = sigmoid(s - log N), no normalization (one pass, no running max);
- standardized: w = (s - mean) / sqrt(var + 1e-6) over the keys a query sees (running sums);
- stick_breaking: w[m, n] = beta[m, n] * prod over n < j < m of (1 - beta[m, j]), a scan over
  the keys in descending order.

On a machine without CUDA the kernels run through Triton's interpreter (slow, exact) at small
sizes; with CUDA they run natively at larger ones.
"""

import math

import torch

import attnc


def scores(q, k):
    """Materialized scores s = q k^T / sqrt(D) (float64), k repeated over the query heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1).double()
    return q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def sigmoid_attn(q, k, v):
    s = scores(q, k)
    M, N = s.shape[-2:]
    causal = torch.ones(M, N, dtype=torch.bool, device=q.device).tril()
    return (torch.sigmoid(s - math.log(N)) * causal) @ v.double()


def standardized(q, k, v):
    s = scores(q, k)
    M, N = s.shape[-2:]
    causal = torch.ones(M, N, dtype=torch.bool, device=q.device).tril()
    count = causal.sum(-1, keepdim=True)
    mean = (s * causal).sum(-1, keepdim=True) / count
    var = ((s - mean) ** 2 * causal).sum(-1, keepdim=True) / count
    return ((s - mean) / torch.sqrt(var + 1e-6) * causal) @ v.double()


def stick_breaking(q, k, v):
    beta = torch.sigmoid(scores(q, k))
    M, N = beta.shape[-2:]
    before = torch.ones(M, N, dtype=torch.bool, device=q.device).tril(-1)  # keys n < m
    keep = torch.where(before, 1 - beta, torch.ones_like(beta))
    # rest[m, n] = prod over n < j < m of (1 - beta[m, j]): a reversed cumulative product,
    # shifted by one key so that key n itself is left out
    suffix = keep.flip(-1).cumprod(-1).flip(-1)
    rest = torch.cat([suffix[..., 1:], torch.ones_like(suffix[..., :1])], dim=-1)
    return (beta * rest * before) @ v.double()


def main():
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, Hq, Hkv, T, D = (2, 8, 4, 1024, 64) if cuda else (1, 2, 1, 32, 16)
    print(f"running on {'CUDA' if cuda else 'CPU via the Triton interpreter'}")
    torch.manual_seed(0)
    for name, eager in [("sigmoid_attn", sigmoid_attn), ("standardized", standardized),
                        ("stick_breaking", stick_breaking)]:
        kernel = attnc.load(name)
        q = torch.randn(B, Hq, T, D, device=device, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device=device, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device=device, requires_grad=True)
        grad = torch.randn(B, Hq, T, D, device=device)
        out = kernel(q, k, v)
        got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
        ref = eager(q, k, v.repeat_interleave(Hq // Hkv, 1))
        want = [ref, *torch.autograd.grad(ref, (q, k, v), grad.double())]
        err = max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want))
        print(f"{name:15s} out, dq, dk, dv: max relative error {err:.2e}")


if __name__ == "__main__":
    main()
