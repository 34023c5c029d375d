"""Several branches over the same queries: a sliding window plus compressed memory.

NSA (Yuan et al. 2025) and compressive memories give each query two kinds of keys: the recent
ones, exactly, and the distant past as one pooled key per block. `local_plus_compressed` (the
library variant) puts both under ONE softmax (`combine = softmax`, an lse merge of the two
branch kernels); the inline spec below instead normalizes each branch apart and mixes them with
a learned gate per head (`combine = gates`, NSA's gated mix). Both are compared with an eager
computation, then a few optimizer steps move the gates.

Runs in seconds on the CPU (Triton's interpreter); sizes grow on CUDA.
"""

import math

import torch

import attnc

GATED = """
attention window_plus_memory {
  option window = 32, stride = 16
  param g_local[h], g_memory[h]
  operand kc[n], vc[n]
  branch local {
    mask = n <= m and m - n < window
    gate = sigmoid(g_local[h])
  }
  branch memory {
    k = kc
    v = vc
    mask = (n + 1) * stride - 1 <= m
    gate = sigmoid(g_memory[h])
  }
  combine = gates
}
"""


def pool(x, stride):
    """Mean of each complete block of `stride` rows: [B, H, N, D] -> [B, H, N // stride, D]."""
    B, H, N, D = x.shape
    return x[:, :, : N // stride * stride].reshape(B, H, N // stride, stride, D).mean(3)


def eager(q, k, v, kc, vc, window, stride, gates=None):
    """Dense float64: joint softmax over [local keys, compressed keys], or a gated mix."""
    rep = q.shape[1] // k.shape[1]
    k, v, kc, vc = (t.repeat_interleave(rep, 1).double() for t in (k, v, kc, vc))
    m = torch.arange(q.shape[2])[:, None]
    n, nc = torch.arange(k.shape[2])[None, :], torch.arange(kc.shape[2])[None, :]
    scale = 1 / math.sqrt(q.shape[-1])
    local = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(
        ~((n <= m) & (m - n < window)), -math.inf)
    memory = (q.double() @ kc.transpose(-1, -2) * scale).masked_fill(
        ~((nc + 1) * stride - 1 <= m), -math.inf)
    if gates is None:
        p = torch.softmax(torch.cat([local, memory], -1), -1)
        return p @ torch.cat([v, vc], -2)
    parts = []
    for s, vals in ((local, v), (memory, vc)):
        p = torch.softmax(s, -1).nan_to_num()  # rows with no visible key: 0
        parts.append(p @ vals)
    return sum(torch.sigmoid(g.double())[None, :, None, None] * o for g, o in zip(gates, parts))


def main():
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, H, Hkv, N, D = (2, 16, 4, 4096, 128) if cuda else (1, 4, 2, 64, 32)
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device=device)
    k = torch.randn(B, Hkv, N, D, device=device)
    v = torch.randn(B, Hkv, N, D, device=device)

    joint = attnc.load("local_plus_compressed", window=32, stride=16)
    kc, vc = pool(k, 16), pool(v, 16)
    out, lse = joint(q, k, v, kc=kc, vc=vc, return_lse=True)
    err = (out.double() - eager(q, k, v, kc, vc, 32, 16)).norm() / out.double().norm()
    print(f"{joint!r}: {len(joint.kernels)} branch kernels + a torch lse merge; "
          f"relative error vs eager {err:.2e}")

    gated = attnc.compile(GATED)
    gates = [torch.zeros(H, device=device, requires_grad=True) for _ in range(2)]
    out = gated(q, k, v, kc=kc, vc=vc, g_local=gates[0], g_memory=gates[1])
    err = (out.double() - eager(q, k, v, kc, vc, 32, 16, gates)).norm() / out.double().norm()
    print(f"{gated!r}: relative error vs eager {err:.2e}")

    # learn the per-head mix toward a target that wants memory in the even heads only
    target = eager(q, k, v, kc, vc, 32, 16, [torch.full((H,), 2.0),
                                            torch.tensor([3.0, -3.0] * (H // 2))]).float()
    opt = torch.optim.Adam(gates, lr=0.3)
    for step in range(4):
        out = gated(q, k, v, kc=kc, vc=vc, g_local=gates[0], g_memory=gates[1])
        loss = (out - target.to(device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.4f}")
    mix = torch.sigmoid(gates[1]).detach().cpu()
    print("memory gate per head:", " ".join(f"{x:.2f}" for x in mix.tolist()))


if __name__ == "__main__":
    main()
