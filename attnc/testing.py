"""Random inputs for a kernel and a quick check against the IR reference interpreter (the
forward, and the gradients against autodiff's backward cascade).

Used by `attnc check`, the quickstart example and tests. Params get values in [0.5, 1.5) (safe
under log and division); integer inputs get small sorted ids along their last dimension, which
is how segment / document ids look.
"""

from __future__ import annotations

import math

import sympy
import torch

from attnc import symbols as S

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def random_inputs(kernel, B: int, H: int, M: int, N: int, device="cpu",
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    sizes = {S.B: B, S.H: H, S.M: M, S.N: N}
    out = {}
    for decl in kernel.kernel_ir.inputs:
        shape = tuple(int(sympy.sympify(d).xreplace(sizes)) for d in decl.dims)
        if decl.kind == "param":
            out[decl.name] = 0.5 + torch.rand(shape, generator=generator).to(device)
        else:
            ids = torch.randint(0, 3, shape, generator=generator)
            out[decl.name] = (ids.sort(dim=-1).values if ids.dim() else ids).to(device)
    return out


def check(kernel, *, B=2, H=4, Hkv=2, M=77, N=93, D=64, Dv=64, dtype=torch.float32,
          device=None, seed=0) -> dict:
    """Run `kernel` (forward and backward) on random inputs and compare with the reference
    interpreter in float64. `grad_rel_error` is the worst relative error over the gradients of
    q, k, v and the params (None when the kernel has no backward)."""
    from attnc.backends.reference import interpret

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, Dv, generator=g)
    inputs = random_inputs(kernel, B, H, M, N, "cpu", g)
    grads = kernel.kernel_ir.grad is not None
    leaves = [t.to(device, dtype).requires_grad_(grads) for t in (q, k, v)]
    params = {n: t.to(device).requires_grad_(grads and t.is_floating_point())
              for n, t in inputs.items()}
    out, lse = kernel(*leaves, return_lse=True, **params)
    stages = dict(kernel._trail)
    ref_inputs = {n: (t.double() if t.is_floating_point() else t) for n, t in inputs.items()}
    scale = 1 / math.sqrt(D)
    ref = interpret(stages["autodiff"], q.double(), k.double(), v.double(), scale=scale,
                    inputs=ref_inputs)
    err = rel_error(out, ref["out"])
    finite = torch.isfinite(ref["lse"])
    lse_err = (lse.double().cpu()[finite] - ref["lse"][finite]).abs().max().item() if finite.any() else 0.0
    lse_match = bool(torch.equal(torch.isfinite(lse.cpu()), finite))
    tol = TOLERANCE[dtype]
    grad_err = None
    if grads:
        d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        d_lse = torch.where(finite, torch.randn(lse.shape, generator=g, dtype=torch.float64), 0.0)
        loss = ((out.double().cpu() * d_out).sum()
                + (torch.where(finite, lse.double().cpu(), 0.0) * d_lse).sum())
        learn = [t for t in params.values() if t.requires_grad]
        got = torch.autograd.grad(loss, leaves + learn)
        want = interpret(stages["autodiff"].backward, q.double(), k.double(), v.double(),
                         scale=scale, inputs=ref_inputs,
                         saved={"O": ref["out"], "LSE": ref["lse"], "dO": d_out, "dLSE": d_lse})
        roles = ["dq", "dk", "dv"] + [f"d_{n}" for n, t in params.items() if t.requires_grad]
        grad_err = max(rel_error(a, want[r]) for a, r in zip(got, roles))
    # gradients pass through more rounding than the forward (p and ds are rounded to the input
    # dtype before their matmuls), hence the factor 2
    return {"rel_error": err, "lse_max_abs_error": lse_err, "tolerance": tol,
            "grad_rel_error": grad_err,
            "ok": (err <= tol and lse_match and lse_err <= 50 * tol
                   and (grad_err is None or grad_err <= 2 * tol))}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN anywhere counts as infinite error."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if torch.isnan(out).any():
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)
