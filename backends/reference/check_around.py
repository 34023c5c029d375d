"""`attnc check` for a softmax kernel with something around its score (operands, prologues, a
value alias, a gate, a head map, gathered keys, head mixing: attnc.ir.around): random operands,
params and inputs, the kernel's out and lse against the reference interpreter's in float64, and
its gradients against torch autograd through that interpreter (autodiff's backward cascade knows
nothing around the score).

Random values: params in [0.5, 1.5); operands ~ N(0, 1) with q's head dim; an input read by
`kv_head` holds K/V heads in [0, Hkv); a gathered-key list holds keys (key blocks) in
[-1, N / block) (-1 is padding); an input a rope position reads holds positions in [0, 4·max(M,
N)); any other input small sorted ids in [0, 3) along its last dimension (like
attnc.testing.random_inputs).
"""

from __future__ import annotations

import math

import sympy
import torch

from attnc.backends.reference.cascade import interpret
from attnc.expr import symbols as S
from attnc.ir.around import Rope, Side
from attnc.ir.cascade import TensorKind


def _reads(expr) -> set[str]:
    return {str(a.base) for a in sympy.sympify(expr).atoms(sympy.Indexed)}


def random_around_inputs(kernel, B: int, H: int, Hkv: int, M: int, N: int, D: int,
                         generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Params, inputs and operands by name, float32 and int64 (see the module docstring)."""
    ir = kernel.kernel_ir
    a = ir.around
    sizes = {S.B: B, S.H: H, S.M: M, S.N: N, S.D: D}
    heads = _reads(a.kv_head) if a.kv_head is not None else set()
    positions = {t for p in a.prologues for op in p.ops if isinstance(op, Rope)
                 for t in _reads(op.position)}
    out: dict[str, torch.Tensor] = {}
    for decl in ir.inputs:
        shape = tuple(int(sympy.sympify(d).xreplace(sizes)) for d in decl.dims)
        if decl.kind is TensorKind.PARAM:
            out[decl.name] = 0.5 + torch.rand(shape, generator=generator)
        elif decl.name in heads:
            out[decl.name] = torch.randint(0, Hkv, shape, generator=generator)
        elif a.gather is not None and decl.name == a.gather.tensor:
            blocks = -(-N // a.gather.key_block)
            out[decl.name] = torch.randint(-1, blocks, shape, generator=generator)
        elif decl.name in positions:
            out[decl.name] = torch.randint(0, 4 * max(M, N), shape, generator=generator)
        else:
            ids = torch.randint(0, 3, shape, generator=generator)
            out[decl.name] = ids.sort(dim=-1).values if ids.dim() else ids
    for o in a.operands:
        rows = (H, M) if o.side is Side.QUERY else (Hkv, N)
        out[o.name] = torch.randn(B, *rows, D, generator=generator)
    return out


def check_around(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 dtype: torch.dtype, device, generator: torch.Generator,
                 tolerance: float) -> dict:
    """attnc.testing.check's result for `kernel` on q, k, v (v unused when the value is another
    operand)."""
    from attnc.testing import rel_error

    ir = kernel.kernel_ir
    a = ir.around
    B, H, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    inputs = random_around_inputs(kernel, B, H, Hkv, M, N, D, generator)
    grads = ir.grad is not None
    operands = {o.name for o in a.operands}
    base = {"q": q, "k": k, **({"v": v} if a.value == "v" else {})}
    learn = {n for n, t in inputs.items() if t.is_floating_point()} | set(base)
    got_leaves = {n: t.to(device, dtype if n in operands or n in base else t.dtype)
                  .requires_grad_(grads and n in learn)
                  for n, t in {**base, **inputs}.items()}
    out, lse = kernel(got_leaves["q"], got_leaves["k"], got_leaves.get("v"), return_lse=True,
                      **{n: got_leaves[n] for n in inputs})
    # the reference sees what the kernel saw: operands rounded to its dtype
    ref_leaves = {n: (t.to(dtype).double() if t.is_floating_point() else t)
                  .requires_grad_(grads and n in learn) for n, t in {**base, **inputs}.items()}
    cascade = dict(kernel._trail)["autodiff"]
    ref = interpret(cascade, ref_leaves["q"], ref_leaves["k"], ref_leaves.get("v"),
                    scale=1 / math.sqrt(D), inputs={n: ref_leaves[n] for n in inputs})
    err = rel_error(out, ref["out"])
    finite = torch.isfinite(ref["lse"]).detach()
    lse_err = ((lse.double().cpu()[finite] - ref["lse"].detach()[finite]).abs().max().item()
               if finite.any() else 0.0)
    lse_match = bool(torch.equal(torch.isfinite(lse.cpu()), finite))
    grad_err = None
    if grads:
        d_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        d_lse = torch.where(finite, torch.randn(lse.shape, generator=generator,
                                                dtype=torch.float64), 0.0)
        names = sorted(learn)

        def loss(o, s):
            return (o.double().cpu() * d_out).sum() + (torch.where(
                finite, s.double().cpu(), 0.0) * d_lse).sum()

        got = torch.autograd.grad(loss(out, lse), [got_leaves[n] for n in names],
                                  allow_unused=True)
        want = torch.autograd.grad(loss(ref["out"], ref["lse"]),
                                   [ref_leaves[n] for n in names], allow_unused=True)
        grad_err = max(rel_error(x if x is not None else torch.zeros_like(y), y)
                       for x, y in zip(got, want) if y is not None)
    return {"rel_error": err, "lse_max_abs_error": lse_err, "tolerance": tolerance,
            "grad_rel_error": grad_err,
            "ok": (err <= tolerance and lse_match and lse_err <= 50 * tolerance
                   and (grad_err is None or grad_err <= 2 * tolerance))}
