"""Calls of a softmax kernel with something around its score (attnc.ir.around.Around): the
per-call checks of its operands, the row values and head map evaluated with torch, and the
autograd formula.

Row values (`attnc.ir.around.row_values`: rope positions, row-scale factors, l2norm gains, the
gate) are evaluated from the spec's expressions by the one sympy -> torch evaluator
(backends/eager/evaluate.py) into fp32 tensors the kernels read, broadcast (expanded, stride 0
where an expression does not vary) to [B, Hq, M] on the query side, [B, Hkv, N] on the key side
(there `h` is the K/V head) and [B, H_side, D_operand] for gains (`d` the feature). They are
evaluated with autograd on, so the adjoints the backward kernels write for them reach the params
through torch autograd. The head map is evaluated for every (b, h) of the call, must be integer
and in [0, Hkv) (ValueError naming the tensor it reads).

`AroundFunction` is the autograd formula: its inputs are q, k, the value tensor (v, or the
operand it aliases: the alias's gradient then adds up with the operand's own), the spec's params
and inputs, the declared operands and the row values; the backward is H2b's
`launch_backward_around` (backends/triton/softmax/prologue_vjp.py states its interface).
Python over sympy runs at every call, so a kernel with an Around is a torch.autograd.Function,
not a custom op: `torch.compile(fullgraph=True)` over it breaks the graph (plain kernels are
custom ops and do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from attnc.backends.eager.evaluate import Evaluator, gather
from attnc.backends.triton.softmax.launch import AroundArgs
from attnc.expr import symbols as S
from attnc.ir.around import Around, Rope, RowKind, Side, row_values
from attnc.ir.cascade import TensorKind
from attnc.runtime import validate
from attnc.runtime.params import ParamGradients


def split_tensors(kernel, tensors: dict) -> tuple[dict, dict]:
    """(declared operands, params and inputs) of a call's keyword tensors."""
    names = {o.name for o in kernel.kernel_ir.around.operands}
    return ({n: t for n, t in tensors.items() if n in names},
            {n: t for n, t in tensors.items() if n not in names})


def value_tensor(kernel, k, v, operands: dict):
    """The tensor the weights average: v, or the operand `around.value` aliases (the call then
    takes no v)."""
    a = kernel.kernel_ir.around
    if a.value == "v":
        return v
    if v is not None:
        raise ValueError(f"{kernel.name}: this spec's value is {a.value} (`v = {a.value}`), so "
                         "the call takes no v; pass v=None")
    if a.value == "k":
        return k
    return operands.get(a.value)


def check_operands(kernel, q, k, operands: dict) -> dict[str, int]:
    """The declared operands: each given, 4-D, of q's dtype and device, laid out like q (query
    side: [B, Hq, M, Dx]) or k (key side: [B, Hkv, N, Dx]) with 1 <= Dx <= 256; the dots'
    operands of equal head dims; rope dims even and at most the operand's head dim. Returns
    each operand's head dim (q, k and the declared ones)."""
    a = kernel.kernel_ir.around
    B, H, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    dims = {"q": q.shape[3], "k": k.shape[3]}
    for o in a.operands:
        t = operands.get(o.name)
        if t is None:
            raise ValueError(f"{kernel.name}: missing operand {o.name!r} "
                             f"({'[B, Hq, M, D]' if o.side is Side.QUERY else '[B, Hkv, N, D]'})")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{kernel.name}: {o.name} must be a torch.Tensor, got "
                             f"{type(t).__name__}")
        query = o.side is Side.QUERY
        rows = ("H", H, "M", M) if query else ("Hkv", Hkv, "N", N)
        if t.dim() != 4 or tuple(t.shape[:3]) != (B, rows[1], rows[3]):
            raise ValueError(f"{kernel.name}: operand {o.name} has shape {tuple(t.shape)}, "
                             f"expected [B, {rows[0]}, {rows[2]}, D_{o.name}] = [{B}, {rows[1]}, "
                             f"{rows[3]}, D_{o.name}] (laid out like {'q' if query else 'k'})")
        if t.dtype != q.dtype:
            raise ValueError(f"{kernel.name}: operand {o.name} has dtype {t.dtype}, q has "
                             f"{q.dtype}; operands share q's dtype")
        if t.device != q.device:
            raise ValueError(f"{kernel.name}: operand {o.name} is on {t.device}, q is on "
                             f"{q.device}")
        if not 1 <= t.shape[3] <= 256:
            raise ValueError(f"{kernel.name}: operand {o.name} has head dim {t.shape[3]}; "
                             "supported 1..256")
        dims[o.name] = t.shape[3]
    for term in a.dots:
        if dims[term.query] != dims[term.key]:
            raise ValueError(f"{kernel.name}: dot({term.query}, {term.key}): {term.key} has head "
                             f"dim {dims[term.key]}, {term.query} has {dims[term.query]}")
    for p in a.prologues:
        width = dims.get(p.operand)
        for op in p.ops:
            if isinstance(op, Rope) and width is not None:
                rot = width if op.dims is None else op.dims
                if rot > width or rot % 2:
                    raise ValueError(
                        f"{kernel.name}: the rope of {p.operand} rotates {rot} features but "
                        f"{p.operand} has head dim {width}; rope dims must be even and at most "
                        "the head dim")
    return dims


def _accessed(ex) -> list[str]:
    return sorted({str(acc.base) for acc in sympy.sympify(ex).atoms(sympy.Indexed)})


def _evaluator(named: dict, grid: dict, like: torch.Tensor) -> Evaluator:
    def access(acc):
        return gather(named[str(acc.base)], [ev(i) for i in acc.indices])
    ev = Evaluator(grid, like, access=access)
    return ev


def evaluate_rows(a: Around, named: dict, sizes: dict, dims: dict, device) -> dict:
    """{key: fp32 tensor} of every row value (module docstring), with autograd through the
    params it reads. `sizes`: B, Hq, Hkv, M, N; `dims`: each operand's head dim."""
    like = torch.empty((), dtype=torch.float32, device=device)
    out = {}
    for rv in row_values(a):
        heads = sizes["Hq"] if rv.side is Side.QUERY else sizes["Hkv"]
        if rv.kind is RowKind.GAIN:
            axis, extent = S.d, dims[rv.operand] if rv.operand != "v" else dims["value"]
        elif rv.side is Side.QUERY:
            axis, extent = S.m, sizes["M"]
        else:
            axis, extent = S.n, sizes["N"]
        B = sizes["B"]
        grid = {S.b: torch.arange(B, device=device).view(-1, 1, 1),
                S.h: torch.arange(heads, device=device).view(1, -1, 1),
                axis: torch.arange(extent, device=device).view(1, 1, -1),
                S.B: B, S.H: sizes["Hq"], S.M: sizes["M"], S.N: sizes["N"]}
        value = _evaluator(named, grid, like)(rv.expr)
        t = torch.as_tensor(value, device=device)
        t = t.to(torch.float32) if t.dtype != torch.float32 else t
        out[rv.key] = torch.broadcast_to(t, (B, heads, extent))
    return out


def head_map(kernel, a: Around, named: dict, B: int, Hq: int, Hkv: int, device):
    """The [B, Hq] int32 K/V head of each query head (`kv_head`), checked in [0, Hkv)."""
    grid = {S.b: torch.arange(B, device=device).view(-1, 1),
            S.h: torch.arange(Hq, device=device).view(1, -1), S.B: B, S.H: Hq}
    like = torch.empty((), dtype=torch.float64, device=device)
    with torch.no_grad():
        t = torch.as_tensor(_evaluator(named, grid, like)(a.kv_head), device=device)
    names = ", ".join(_accessed(a.kv_head)) or "kv_head"
    if t.is_floating_point():
        if not bool(torch.all(t == torch.round(t))):
            raise ValueError(f"{kernel.name}: {names}: kv_head = {a.kv_head} is not an integer "
                             "for every head")
    t = torch.broadcast_to(t.round().long() if t.is_floating_point() else t.long(), (B, Hq))
    if B * Hq and (int(t.min()) < 0 or int(t.max()) >= Hkv):
        raise ValueError(f"{kernel.name}: {names}: kv_head = {a.kv_head} ranges over "
                         f"[{int(t.min())}, {int(t.max())}] but k and v have {Hkv} heads")
    return t.to(torch.int32).contiguous()


@dataclass(frozen=True)
class CallMeta:
    """What AroundFunction's forward needs besides its tensors."""

    kernel: Any  # the attnc.runtime.softmax.Kernel called
    extras: tuple[str, ...]
    operands: tuple[str, ...]
    rows: tuple[str, ...]
    kv_map: torch.Tensor | None
    block_lists: tuple
    block_sizes: tuple
    scale: float
    return_lse: bool


def call(kernel, q, k, v, scale, return_lse, block_mask, tensors: dict):
    """A call of a kernel with an Around (softmax.Kernel dispatches here)."""
    from attnc.runtime.softmax import check_call
    a = kernel.kernel_ir.around
    operands, spec_tensors = split_tensors(kernel, tensors)
    value = value_tensor(kernel, k, v, operands)
    validate.operands(kernel.name, {"q": "[B, H, M, D]", "k": "[B, H, N, D]"}, q=q, k=k)
    extras = check_call(kernel, q, k, value if value is not None else k, scale, spec_tensors)
    dims = check_operands(kernel, q, k, operands)
    dims["v"] = dims["value"] = value.shape[3]
    B, Hq, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    named = dict(zip(kernel.inputs, extras))
    rows = evaluate_rows(a, named, dict(B=B, Hq=Hq, Hkv=Hkv, M=M, N=N), dims, q.device)
    kv_map = head_map(kernel, a, named, B, Hq, Hkv, q.device) if a.kv_head is not None else None
    lists, sizes = kernel._block_lists(q, k, block_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    op_names = tuple(o.name for o in a.operands)
    meta = CallMeta(kernel, tuple(kernel.inputs), op_names, tuple(rows), kv_map, tuple(lists),
                    tuple(sizes), scale, return_lse)
    out, lse = AroundFunction.apply(meta, q, k, value, *extras,
                                    *(operands[n] for n in op_names), *rows.values())
    return (out, lse) if return_lse else out


class AroundFunction(torch.autograd.Function):
    """out, lse = the kernel's forward; the backward returns gradients for q, k, the value
    tensor, every param, operand and (non-position) row value."""

    @staticmethod
    def forward(ctx, meta: CallMeta, q, k, value, *flat):
        kernel = meta.kernel
        ne, no = len(meta.extras), len(meta.operands)
        extras, operands, rows = flat[:ne], flat[ne:ne + no], flat[ne + no:]
        named = dict(zip(meta.extras, extras))
        ops = dict(zip(meta.operands, operands))
        rowd = dict(zip(meta.rows, rows))
        grad_due = any(  # (grad mode is off inside Function.forward: read the flags)
            t.requires_grad for t in (q, k, value, *flat) if isinstance(t, torch.Tensor))
        gated = "gate" in rowd
        args = AroundArgs(ops, rowd, meta.kv_map, save=gated and grad_due,
                          skip=gated and not grad_due and not meta.return_lse)
        sizes = (meta.block_sizes[0], meta.block_sizes[1]) if meta.block_sizes else None

        def run(config):
            return kernel.launch_forward(q, k, value, named, meta.scale, config,
                                         list(meta.block_lists[:4]), sizes, args)
        result = run(kernel.config(q, k, value, run))
        out, lse = result[0], result[1]
        kept = result[2] if gated and result[2] is not None else out
        ctx.meta = meta
        ctx.save_for_backward(q, k, value, kept, lse, *flat)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from attnc.backends.triton.softmax.launch import launch_backward_around
        meta: CallMeta = ctx.meta
        kernel = meta.kernel
        q, k, value, out, lse, *flat = ctx.saved_tensors
        ne, no = len(meta.extras), len(meta.operands)
        extras, operands, rows = flat[:ne], flat[ne:ne + no], flat[ne + no:]
        a = kernel.kernel_ir.around
        ir = kernel.kernel_ir
        if ir.grad is None:
            raise RuntimeError(f"{kernel.name}: no backward: {ir.no_backward}")
        if dout is None:
            dout = torch.zeros_like(out)
        named = dict(zip(meta.extras, extras))
        needs = ctx.needs_input_grad  # (meta, q, k, value, *flat)
        wanted = [n for d, n, flag in zip(ir.inputs, meta.extras, needs[4:4 + ne])
                  if flag and d.kind is TensorKind.PARAM]
        grads = ParamGradients(ir, named, wanted, q.shape[0], q.shape[1], q.shape[2],
                               k.shape[2])
        tensors = {"q": q, "k": k, **({"v": value} if a.value == "v" else {}),
                   **dict(zip(meta.operands, operands))}
        config = kernel.backward_config(q, k, value)
        dnamed, drows = launch_backward_around(
            kernel.module(), ir, tensors, named, dict(zip(meta.rows, rows)), meta.kv_map, out,
            lse, dout, dlse, meta.scale, config, on_partial=grads.add if wanted else None,
            block_lists=meta.block_lists[:4], q_lists=meta.block_lists[4:],
            block_sizes=tuple(meta.block_sizes) if meta.block_sizes else None)
        dextras = [grads.grads[n].to(t.dtype) if n in grads.grads else None
                   for n, t in zip(meta.extras, extras)]
        dops = [dnamed.get(n) for n in meta.operands]
        drv = [drows.get(key) for key in meta.rows]
        return (None, dnamed.get("q"), dnamed.get("k"), dnamed.get("v"), *dextras, *dops, *drv)

