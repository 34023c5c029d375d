"""State-update attention with attnc: a spec, its algebraic class, and the kernels it gets.

1. A gated delta rule written in the DSL: `chunk_scan` recognizes the class and schedules the
   chunked (WY/UT) form; the chunked and the recurrent kernel agree.
2. Decoding: the recurrent kernel one token at a time, carrying the state, reproduces the
   sequence run.
3. A nonlinear update still compiles (to the recurrent kernel, with a backward kernel generated
   from sympy's derivatives), and attnc says why it could not be chunked.
4. A BASED-style hybrid: the `based` linear spec (Taylor feature map) plus `sliding_window`
   softmax, mixed, trained for a few steps on a toy copy task to show gradients flow through
   both kernels (q, k, v and the mixing weight).
5. flash-linear-attention's calling convention: `attnc.ops.chunk_gated_delta_rule`.

On a machine without CUDA the kernels run through Triton's interpreter (slow, exact), so sizes
are small.
"""

import torch
import torch.nn.functional as F

import attnc
from attnc import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, T, D = (2, 4, 256, 64) if DEVICE == "cuda" else (1, 2, 48, 16)
torch.manual_seed(0)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


GATED_DELTA = """
linear my_gated_delta {
  input g[b, h, t], beta[b, h, t]      # log decay and write strength per step
  state S[i, j]                        # i: key features, j: value features
  S[i, j] = exp(g) * S[i, j] + beta * k[i] * (v[j] - exp(g) * sum(i) k[i] * S[i, j])
  o[j] = sum(i) q[i] * scale * S[i, j]
}
"""

NONLINEAR = """
linear saturating {
  state S[i, j]
  S[i, j] = tanh(S[i, j] + k[i] * v[j])
  o[j] = sum(i) q[i] * S[i, j]
}
"""


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def main() -> None:
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE) for _ in range(3))
    k = F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(B, H, T, device=DEVICE))
    beta = torch.sigmoid(torch.randn(B, H, T, device=DEVICE))

    section("1. a gated delta rule, classified and chunked")
    kernel = attnc.compile(GATED_DELTA)
    print(kernel.ir("chunk_scan"))
    chunked, state = kernel(q, k, v, g=g, beta=beta, output_final_state=True)
    recurrent = kernel(q, k, v, g=g, beta=beta, algorithm="recurrent")
    print(f"chunked vs recurrent kernel: relative difference {rel(chunked, recurrent):.1e}; "
          f"final state {tuple(state.shape)}")

    section("2. decoding one token at a time")
    state, steps = None, []
    for t in range(T):
        o, state = kernel(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                          g=g[:, :, t:t + 1], beta=beta[:, :, t:t + 1], initial_state=state,
                          output_final_state=True, algorithm="recurrent")
        steps.append(o)
    print(f"{T} single steps vs one sequence run: relative difference "
          f"{rel(torch.cat(steps, dim=2), chunked):.1e}")

    section("3. a nonlinear update falls back to the recurrence")
    saturating = attnc.compile(NONLINEAR)
    print(f"algorithm: {saturating.algorithm}; not chunked because {saturating.why_not_chunked}")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    saturating(*leaves).square().sum().backward()  # the backward kernel generated from sympy
    norms = ", ".join(f"{x.grad.norm().item():.3f}" for x in leaves)
    print(f"gradient norms of q, k, v from the generated backward kernel: {norms}")

    section("4. BASED hybrid: Taylor linear attention + sliding-window softmax")
    based = attnc.load("based")
    window = attnc.load("sliding_window", window=16)
    qf, kf = (torch.randn(B, H, T, 8, device=DEVICE) * 0.5 for _ in range(2))
    mix = torch.zeros(1, device=DEVICE, requires_grad=True)
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v)]
    target = torch.roll(v, shifts=1, dims=2)  # predict the previous value
    opt = torch.optim.Adam(leaves + [mix], lr=0.05)
    for step in range(6):
        a = torch.sigmoid(mix)
        out = a * based(*leaves) + (1 - a) * window(leaves[0], leaves[1], leaves[2])
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}  loss {loss.item():.4f}  mix {a.item():.3f}")

    section("5. flash-linear-attention's calling convention")
    o, final = ops.chunk_gated_delta_rule(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2),
        beta.transpose(1, 2), output_final_state=True)
    print(f"ops.chunk_gated_delta_rule: o {tuple(o.shape)} [B, T, H, V], final state "
          f"{tuple(final.shape)}; equals the spec's kernel: "
          f"{rel(o.transpose(1, 2), chunked):.1e}")


if __name__ == "__main__":
    main()
