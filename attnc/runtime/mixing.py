"""Head-mixing kernels: attention blocks with `premix` and/or `postmix` (talking heads, DCMHA).

`MixingKernel(q, k, v, *, scale=None, return_lse=False, **tensors)` has attnc.Kernel's call
convention. The runtime evaluates each mixing expression with torch
(attnc/backends/eager/evaluate.py) into a [B, M, Hq, Hq] fp32 coefficient tensor (an expanded
view when it reads neither b nor m) and runs the generated kernels
(backends/triton/softmax/mixing.py, whose docstring defines the meaning, masks included, and
derives the backward): one program per (b, query tile) over all Hq <= 16 query heads.
`return_lse` returns the log-normalizer of the mixed scores per head. The forward and backward
are torch custom ops (as attnc.Kernel's), so a call works under torch.compile(fullgraph=True).

Gradients: q, k, v, and each coefficient tensor (the dq kernel writes it, [B, M, Hq, Hq] fp32,
each program its own rows, so deterministically); torch autograd chains the coefficients into
the params the mixing reads. dk and dv are written per query head and summed over a GQA group
by torch. A param the score or mask reads is not differentiated: a backward that would need it
raises RuntimeError naming it.

Refused at compile time with a hint: a mixing expression that reads the key n (or anything but
b, h, g, m, sizes and tensors indexed by them), other `around` statements (operands, prologues,
gate, kv_head, gathered keys) combined with mixing, block-sparse compilation, the kv_splits and
num_stages launch options and autotuning. At call time: more than 16 query heads (ValueError
naming q).
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import sympy
import torch

from attnc import cache
from attnc.backends.eager.evaluate import Evaluator, gather
from attnc.backends.triton import interpreting
from attnc.backends.triton.contract import Bind, GeneratedModule
from attnc.backends.triton.softmax import mixing as codegen
from attnc.backends.triton.softmax.launch import pow2
from attnc.errors import CompileError
from attnc.expr import symbols as S
from attnc.ir.around import Around, g
from attnc.ir.cascade import origin_of
from attnc.ir.kernel import AttentionKernel
from attnc.pipeline import IR, FrontendIR, Source, format_ir, stage_text
from attnc.runtime import validate
from attnc.runtime.base import CompiledKernel
from attnc.runtime.softmax import check_call, prepare_call_checks

_OPS: dict[str, object] = {}
_KERNELS: dict[str, MixingKernel] = {}
_LOCK = threading.Lock()
_SYMBOLS = {S.b, S.h, S.m, g, S.B, S.H, S.M, S.N, S.scale}


def mixes(ir: IR) -> bool:
    """Whether `ir` is a kernel whose heads mix (premix or postmix): this module's kernel."""
    around = ir.around if isinstance(ir, AttentionKernel) else Around()
    return around.premix is not None or around.postmix is not None


def check_mixing(k: AttentionKernel, src: Source, frontend_ir: FrontendIR) -> None:
    """Refuse what the mixing kernel does not do, at the statement when the spec says where."""
    def refuse(what: str, msg: str, hint: str) -> CompileError:
        err = CompileError(f"{k.name}: {msg}", tensor=what, hint=hint)
        where = origin_of(getattr(frontend_ir, "origins", ()), what)
        return err if where is None else err.located(src.text, src.filename, where.line,
                                                     where.column)
    plain = replace(k.around, premix=None, postmix=None)
    if not plain.plain:
        # the statement: the first field that is not plain (the block when none is located)
        field = next(f for f in ("gate", "kv_head", "gather", "prologues", "operands", "dots",
                                 "value") if getattr(plain, f) != getattr(Around(), f))
        raise refuse(field, "head mixing (premix/postmix) combines with no other statement around "
                     "the score yet (operands, q/k/v prologues, gate, kv_head, gathered keys)",
                     "apply the prologue or gate in torch around the call, or drop the mixing")
    if k.block_sparse:
        raise refuse("", "a head-mixing kernel cannot be block-sparse",
                     "compile it without block_sparse=True")
    for kind in ("premix", "postmix"):
        ex = getattr(k.around, kind)
        if ex is None:
            continue
        extra = sympy.sympify(ex).free_symbols - _SYMBOLS - {
            s for acc in ex.atoms(sympy.Indexed) for s in acc.free_symbols}
        reads = {s for acc in ex.atoms(sympy.Indexed) for i in acc.indices
                 for s in sympy.sympify(i).free_symbols} - _SYMBOLS
        if extra | reads:
            raise refuse(kind, f"{kind} reads {sorted(map(str, extra | reads))[0]}: mixing "
                         "coefficients are one [Hq, Hq] matrix per (b, m)",
                         "write the coefficients as an expression of h, g, b and m (params and "
                         "inputs indexed by them)")


def coefficients(ex: sympy.Expr, tensors: dict[str, torch.Tensor], B: int, H: int, M: int,
                 N: int, scale: float, device: torch.device) -> torch.Tensor:
    """The mixing expression as [B, M, Hq, Hq] fp32 (h the mixed-into head, g the other): an
    expanded view where it reads neither b nor m. Differentiable in the params it reads."""
    def axis(n: int, dim: int) -> torch.Tensor:
        return torch.arange(n, device=device).view([-1 if i == dim else 1 for i in range(4)])
    syms = {S.b: axis(B, 0), S.m: axis(M, 1), S.h: axis(H, 2), g: axis(H, 3), S.B: B, S.H: H,
            S.M: M, S.N: N, S.scale: scale}
    like = torch.empty(0, dtype=torch.float32, device=device)

    def access(acc: sympy.Indexed) -> torch.Tensor:
        t = tensors[str(acc.base)]
        return gather(t.float() if t.is_floating_point() else t, [ev(i) for i in acc.indices])
    ev = Evaluator(syms, like, access=access)
    value = ev.floating(ev(ex)).to(torch.float32)
    while value.dim() < 4:
        value = value.unsqueeze(0)
    return value.expand(B, M, H, H)


class MixingKernel(CompiledKernel):
    """A compiled head-mixing attention variant (see the module docstring)."""

    SALT = "triton-mixing"

    def __init__(self, src: Source, options: dict, frontend_ir: FrontendIR,
                 trail: list[tuple[str, IR]], launch_overrides: dict,
                 tune: bool | None = None):
        final = trail[-1][1]
        assert isinstance(final, AttentionKernel) and mixes(final)
        check_mixing(final, src, frontend_ir)
        if "kv_splits" in launch_overrides or "num_stages" in launch_overrides:
            raise ValueError("kv_splits and num_stages do not apply to a head-mixing kernel "
                             "(its launch options are block_m, block_n, num_warps)")
        if tune:
            raise ValueError("autotune does not apply to a head-mixing kernel yet; pass "
                             "block_m / block_n to choose its tiles")
        self.kernel_ir: AttentionKernel = final
        self._overrides = launch_overrides
        super().__init__(src, options, frontend_ir, trail, tune=False)
        self.inputs = tuple(d.name for d in final.inputs)
        prepare_call_checks(self, src, frontend_ir)
        self._op = _make_op(self)

    def __repr__(self) -> str:
        extra = f", inputs={list(self.inputs)}" if self.inputs else ""
        return f"attnc.MixingKernel({self.name!r}{extra})"

    def _codegen(self, final, header: str) -> GeneratedModule:
        return codegen.generate(final, header=header)

    def _contracts(self, final, names: dict) -> tuple:
        return codegen.contracts(final, names)

    def ir(self, stage: str = "kernel") -> str:
        if stage == "kernel":
            return format_ir(self.kernel_ir).rstrip("\n") + "\n\n" + self.generated.describe()
        if stage in (name for name, _ in self._trail):
            return stage_text(self._trail, self._frontend_ir, stage)
        return super().ir(stage)

    def config(self, q: torch.Tensor) -> dict:
        """Tiles: the compile options', else 16 rows by 32 keys on the interpreter and by 16 on
        a GPU (a program holds every head: 16 x 16 rows of q, a key tile per head)."""
        gpu = q.device.type == "cuda"
        bm = min(self._overrides.get("block_m", 16), pow2(q.shape[2]))
        return {"BLOCK_M": bm, "BLOCK_N": self._overrides.get("block_n", 16 if gpu else 32),
                "num_warps": self._overrides.get("num_warps", 8 if gpu else 4)}

    def __call__(self, q, k, v, *, scale=None, return_lse=False, **tensors):
        if not isinstance(return_lse, bool):
            raise ValueError(f"{self.name}: return_lse must be True or False, got "
                             f"{return_lse!r}")
        extras = check_call(self, q, k, v, scale, tensors)
        B, H, M, _ = q.shape
        if H > codegen.MAX_HEADS:
            raise ValueError(f"{self.name}: q has {H} heads; a head-mixing kernel spans every "
                             f"query head in one program and takes at most "
                             f"{codegen.MAX_HEADS}")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        named = dict(zip(self.inputs, extras))
        mixes = [coefficients(ex, named, B, H, M, k.shape[2], scale, q.device)
                 for ex in (self.kernel_ir.around.premix, self.kernel_ir.around.postmix)
                 if ex is not None]
        # params only the mixing reads get their gradients through the coefficients
        loaded = {ld.tensor for ld in self.kernel_ir.loads}
        extras = [t if d.name in loaded else t.detach()
                  for d, t in zip(self.kernel_ir.inputs, extras)]
        out, lse = self._op(q, k, v, mixes, extras, scale)
        return (out, lse) if return_lse else out

    def _values(self, q, k, v, scale: float, mixes: list[torch.Tensor],
                extras: list[torch.Tensor], **more: torch.Tensor) -> dict[Bind, object]:
        """Every launch value of the three kernels (each launch takes the ones it declares)."""
        B, H, M, D = q.shape
        Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
        cfg = self.config(q)
        ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        values: dict[Bind, object] = {Bind(n): x for n, x in dict(
            Q=q, K=k, V=v, B=B, H=H, M=M, N=N, D=D, DV=Dv, GROUP=H // Hkv, scale=scale,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_H=codegen.BLOCK_H,
            BLOCK_D=pow2(D), BLOCK_DV=pow2(Dv), IEEE=ieee, UPCAST=interpreting(),
            **more).items()}
        for name, t, letters in (("q", q, "bhmd"), ("k", k, "bhnd"), ("v", v, "bhnd"),
                                 ("o", more.get("Out"), "bhmd"), ("do", more.get("DO"), "bhmd")):
            if t is not None:
                values.update({Bind(f"stride_{name}{r}"): s for r, s in zip(letters, t.stride())})
        kinds = [c for c in codegen.MIXES if getattr(self.kernel_ir.around, c[0]) is not None]
        for (_, ptr, prefix), t in zip(kinds, mixes):
            values[Bind(ptr)] = t
            values.update({Bind(f"{prefix}_s{r}"): s for r, s in zip("bmhg", t.stride())})
        for d, t in zip(self.kernel_ir.inputs, extras):
            values[Bind("tensor", d.name)] = t
            values.update({Bind("stride", d.name, i): s for i, s in enumerate(t.stride())})
        return values

    def _launch(self, role: str, q: torch.Tensor, values: dict[Bind, object]) -> None:
        mod = self.module()
        wanted = {p.bind for p in mod.contracts[role].params}
        mod.launch(role, {b: x for b, x in values.items() if b in wanted},
                   options={"num_warps": self.config(q)["num_warps"]})

    def launch(self, q, k, v, scale: float, mixes: list[torch.Tensor],
               extras: list[torch.Tensor]):
        """Run the forward: out [B, Hq, M, Dv] in q's dtype and lse [B, Hq, M] fp32."""
        B, H, M, _ = q.shape
        out = torch.empty(B, H, M, v.shape[3], dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
        if M == 0 or B * H == 0:
            return out, lse
        validate.device(self.name, q.device)
        self._launch("forward", q, self._values(q, k, v, scale, mixes, extras, Out=out, Lse=lse))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, dlse, scale: float, mixes: list[torch.Tensor],
                 extras: list[torch.Tensor]) -> list[torch.Tensor]:
        """dq, dk, dv (in their dtypes), then each coefficient tensor's gradient [B, M, Hq,
        Hq] fp32 (the caller chains it into the params with torch autograd)."""
        if self.kernel_ir.grad is None:
            raise RuntimeError(f"{self.name}: no backward: {self.kernel_ir.no_backward}")
        B, H, M, D = q.shape
        Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
        f32 = dict(dtype=torch.float32, device=q.device)
        dq = torch.zeros(B, H, M, D, **f32)
        dk, dv = torch.zeros(B, H, N, D, **f32), torch.zeros(B, H, N, Dv, **f32)
        delta = torch.zeros(B, H, M, **f32)
        dmixes = {f"D{ptr}": torch.zeros(B, M, H, H, **f32) for _, ptr, _ in codegen.MIXES
                  if getattr(self.kernel_ir.around, _kind(ptr)) is not None}
        if M and N and B * H:
            values = self._values(q, k, v, scale, mixes, extras, Out=out, DO=dout.contiguous(),
                                  Lse=lse, DLse=lse if dlse is None else dlse.contiguous(),
                                  Delta=delta, DQ=dq, DKacc=dk, DVacc=dv, **dmixes)
            values[Bind("HAS_DLSE")] = dlse is not None
            self._launch("dq", q, values)
            self._launch("dkdv", q, values)
        group = H // Hkv
        dk = dk.view(B, Hkv, group, N, D).sum(2)
        dv = dv.view(B, Hkv, group, N, Dv).sum(2)
        return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *dmixes.values()]


def _kind(ptr: str) -> str:
    return next(kind for kind, p, _ in codegen.MIXES if p == ptr)


def _make_op(kernel: MixingKernel):
    """Register `attnc::<name>_mix_<hash>` (the forward) and `..._backward` once per process,
    the backward as the forward's autograd formula, so that the kernel works under
    torch.compile (the ops are opaque to dynamo; their fake implementations give the shapes).
    The backward's gradients of the coefficient tensors flow on to the params by autograd."""
    options = cache.digest(repr(sorted(kernel._overrides.items())))
    name = f"attnc::{kernel.name}_mix_{kernel.key[:12]}_{options[:8]}"
    count = len([m for m in codegen.MIXES if getattr(kernel.kernel_ir.around, m[0]) is not None])
    with _LOCK:
        _KERNELS[name] = kernel
        if name in _OPS:
            return _OPS[name]

        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mixes: list[torch.Tensor], extras: list[torch.Tensor],
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
            return _KERNELS[name].launch(q, k, v, scale, list(mixes), list(extras))

        op = torch.library.custom_op(name, forward, mutates_args=())

        @op.register_fake
        def _(q, k, v, mixes, extras, scale):
            B, H, M, _ = q.shape
            return (q.new_empty(B, H, M, v.shape[-1]),
                    q.new_empty(B, H, M, dtype=torch.float32))

        def backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mixes: list[torch.Tensor], extras: list[torch.Tensor],
                          out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                          dlse: torch.Tensor | None, scale: float) -> list[torch.Tensor]:
            return _KERNELS[name].backward(q, k, v, out, lse, dout, dlse, scale, list(mixes),
                                           list(extras))

        bwd = torch.library.custom_op(f"{name}_backward", backward_impl, mutates_args=())

        @bwd.register_fake
        def _(q, k, v, mixes, extras, out, lse, dout, dlse, scale):
            B, H, M, _ = q.shape
            return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + [
                q.new_empty(B, M, H, H, dtype=torch.float32) for _ in range(count)]

        def refuse(ctx, *grads):
            raise RuntimeError(f"{kernel.name}: double backward is not supported")

        bwd.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)

        def setup_context(ctx, inputs, output):
            q, k, v, mixes, extras, scale = inputs
            ctx.save_for_backward(q, k, v, *output, *mixes, *extras)
            ctx.scale = scale
            # params the score or mask reads: the kernels do not differentiate them
            ctx.refused = [d.name for d, t in zip(_KERNELS[name].kernel_ir.inputs, extras)
                           if t.requires_grad]

        def backward(ctx, dout, dlse):
            kernel = _KERNELS[name]
            if ctx.refused:
                raise RuntimeError(
                    f"{kernel.name}: no gradient for {ctx.refused[0]}: a head-mixing kernel "
                    "differentiates q, k, v and the mixing coefficients, not params read by the "
                    "score or mask; pass it detached (or without requires_grad)")
            q, k, v, out, lse, *rest = ctx.saved_tensors
            grads = bwd(q, k, v, rest[:count], rest[count:], out, lse, dout, dlse, ctx.scale)
            return (grads[0], grads[1], grads[2], list(grads[3:]), [None] * (len(rest) - count),
                    None)

        op.register_autograd(backward, setup_context=setup_context)
        _OPS[name] = op
        return op
