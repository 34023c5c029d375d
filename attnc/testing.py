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

from attnc.backends.eager.linear import feature_dim, public_state, state_shape
from attnc.backends.reference.cascade import interpret, interpret_backward
from attnc.backends.reference.linear import interpret as interpret_scan
from attnc.expr import symbols as S
from attnc.ir.cascade import TensorKind

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def random_inputs(kernel, B: int, H: int, M: int, N: int, device="cpu",
                  generator: torch.Generator | None = None, D: int = 64, Dv: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """Random params (in [0.5, 1.5)) and small sorted ids for inputs, by name. A branched spec
    gets each branch's tensors, and keys and values a branch renames shaped like k [B, H, N, D]
    and v [B, H, N, Dv] (Dv None: D)."""
    if hasattr(kernel, "branches_ir"):
        out = {}
        for br, sub in zip(kernel.branches_ir.branches, kernel.kernels):
            out.update(random_inputs(sub, B, H, M, N, device, generator))
            for name, dim in ((br.keys, D), (br.values, D if Dv is None else Dv)):
                if name not in ("k", "v") and name not in out:
                    out[name] = torch.randn(B, H, N, dim, generator=generator).to(device)
        return out
    sizes = {S.B: B, S.H: H, S.M: M, S.N: N}
    # a gathered-key kernel's list (a block-list kernel keeps it beside its block-sparse IR)
    gather = getattr(kernel, "gather", None) or getattr(
        getattr(kernel.kernel_ir, "around", None), "gather", None)
    out = {}
    for decl in kernel.kernel_ir.inputs:
        shape = tuple(int(sympy.sympify(d).xreplace(sizes)) for d in decl.dims)
        if gather is not None and decl.name == gather.tensor:  # keys (blocks), -1 = padding
            blocks = -(-N // gather.key_block)
            out[decl.name] = torch.randint(-1, blocks, shape, generator=generator).to(device)
        elif decl.kind is TensorKind.PARAM:
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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, Dv, generator=g)
    around = getattr(getattr(kernel, "kernel_ir", None), "around", None)
    if around is not None and not around.plain:
        # autodiff's backward cascade knows nothing around the score: gradients come from torch
        # autograd through the reference interpreter instead
        from attnc.backends.reference.check_around import check_around
        return check_around(kernel, q, k, v, dtype=dtype, device=device, generator=g,
                            tolerance=TOLERANCE[dtype])
    inputs = random_inputs(kernel, B, H, M, N, "cpu", g)
    if hasattr(kernel, "plan"):
        return _check_general(kernel, q, k, v, inputs, dtype, device, g)
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
    lse_err = ((lse.double().cpu()[finite] - ref["lse"][finite]).abs().max().item()
               if finite.any() else 0.0)
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
        want = interpret_backward(stages["autodiff"].backward, q.double(), k.double(),
                                  v.double(), scale=scale, inputs=ref_inputs,
                                  saved={"O": ref["out"], "LSE": ref["lse"], "dO": d_out,
                                         "dLSE": d_lse})
        roles = ["dq", "dk", "dv"] + [f"d_{n}" for n, t in params.items() if t.requires_grad]
        grad_err = max(rel_error(a, want[r]) for a, r in zip(got, roles))
    # gradients pass through more rounding than the forward (p and ds are rounded to the input
    # dtype before their matmuls), hence the factor 2
    return {"rel_error": err, "lse_max_abs_error": lse_err, "tolerance": tol,
            "grad_rel_error": grad_err,
            "ok": (err <= tol and lse_match and lse_err <= 50 * tol
                   and (grad_err is None or grad_err <= 2 * tol))}


def _check_general(kernel, q, k, v, inputs, dtype, device, g) -> dict:
    """`check` for a general cascade (a CascadeKernel): its out against the reference
    interpreter's, and its gradients against torch autograd through that interpreter (float64:
    the cascade's own math, differentiated by torch rather than by attnc's autodiff)."""
    grads = kernel.plan.has_backward
    leaves = [t.to(device, dtype).requires_grad_(grads) for t in (q, k, v)]
    params = {n: t.to(device).requires_grad_(grads and t.is_floating_point())
              for n, t in inputs.items()}
    out = kernel(*leaves, **params)
    cascade = dict(kernel._trail)["autodiff"]
    ref_leaves = [t.double().requires_grad_(grads) for t in (q, k, v)]
    ref_inputs = {n: (t.double().requires_grad_(params[n].requires_grad)
                      if t.is_floating_point() else t) for n, t in inputs.items()}
    ref = interpret(cascade, *ref_leaves, scale=1 / math.sqrt(q.shape[-1]),
                    inputs=ref_inputs)["out"]
    err, tol = rel_error(out, ref), TOLERANCE[dtype]
    grad_err = None
    if grads:
        d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        learn = [n for n, t in params.items() if t.requires_grad]
        got = torch.autograd.grad(out, leaves + [params[n] for n in learn],
                                  d_out.to(device, out.dtype))
        want = torch.autograd.grad(ref, ref_leaves + [ref_inputs[n] for n in learn], d_out)
        grad_err = max(rel_error(a, b) for a, b in zip(got, want))
    return {"rel_error": err, "lse_max_abs_error": 0.0, "tolerance": tol,
            "grad_rel_error": grad_err,
            "ok": err <= tol and (grad_err is None or grad_err <= 2 * tol)}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN anywhere counts as infinite error."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if torch.isnan(out).any():
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def random_linear_inputs(kernel, B: int, H: int, T: int, D: int, Dv: int,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Inputs and params of a `linear` kernel: per-step values in [-0.4, 0.2) (mild as log-space
    gates, as betas or as step sizes), a feature map's weights ~ N(0, 0.3^2)."""
    scan = kernel.scan
    mapped = {p for mp in scan.maps for p in mp.params}
    sizes = {S.B: B, S.H: H, S.T: T, S.DV: Dv, S.D: D, **dict(scan.options)}
    out: dict[str, torch.Tensor] = {}
    # a feature map's weights first: they size DK, which sizes the other tensors
    for decl in sorted(scan.decls, key=lambda d: d.name not in mapped):
        if decl.name not in mapped and S.DK not in sizes:
            sizes[S.DK] = feature_dim(scan, torch.zeros(B, H, 0, D), out)
        shape = tuple(int(sympy.sympify(d).xreplace(sizes)) for d in decl.dims)
        if decl.name in mapped:
            out[decl.name] = 0.3 * torch.randn(shape, generator=generator)
        else:
            out[decl.name] = 0.6 * torch.rand(shape, generator=generator) - 0.4
    return out


def check_linear(kernel, *, B=2, H=4, T=45, D=32, Dv=32, dtype=torch.float32, device=None,
                 seed=0, algorithm=None) -> dict:
    """Run a `linear` kernel (forward with an initial state, and backward) on random inputs and
    compare with the scan's recurrence (backends/reference/linear.py) in float64: the output,
    the final states, and the gradients of q, k, v, inputs, params and the initial states."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g)
    inputs = random_linear_inputs(kernel, B, H, T, D, Dv, g)
    dk = feature_dim(kernel.scan, q, inputs)
    init = {s.name: 0.3 * public_state(s, torch.randn(state_shape(s, B, H, dk, Dv), generator=g))
            for s in kernel.scan.states}
    leaves = {"q": q, "k": k, "v": v, **inputs, **{f"init_{n}": x for n, x in init.items()}}
    run = {n: x.to(device, dtype if n in "qkv" else torch.float32).requires_grad_()
           for n, x in leaves.items()}
    state_arg = {n: run[f"init_{n}"] for n in init}
    out, final = kernel(run["q"], run["k"], run["v"], initial_state=state_arg,
                        output_final_state=True, algorithm=algorithm,
                        **{n: run[n] for n in inputs})
    final = final if isinstance(final, dict) else {kernel.states[0]: final}
    # the reference sees q, k, v rounded to the kernel's dtype: what is measured is the kernel's
    # own error, not the inputs' quantization
    ref_leaves = {n: (x.to(dtype) if n in "qkv" else x).double().requires_grad_()
                  for n, x in leaves.items()}
    ref_out, ref_final = interpret_scan(kernel.scan, ref_leaves["q"], ref_leaves["k"],
                                        ref_leaves["v"], {n: ref_leaves[n] for n in inputs},
                                   initial_state={n: ref_leaves[f"init_{n}"] for n in init})
    err = max([rel_error(out, ref_out)] + [rel_error(final[n], ref_final[n]) for n in init])
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out.double().cpu() * d_out).sum(), list(run.values()),
                              allow_unused=True)
    want = torch.autograd.grad((ref_out * d_out).sum(), list(ref_leaves.values()),
                               allow_unused=True)
    grad_err = max(rel_error(a if a is not None else torch.zeros_like(b), b)
                   for a, b in zip(got, want) if b is not None)
    tol = TOLERANCE[dtype]
    return {"rel_error": err, "grad_rel_error": grad_err, "tolerance": tol,
            "ok": err <= tol and grad_err <= 2 * tol}
