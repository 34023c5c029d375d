"""Compiled general cascades (a CascadePlan: several stage kernels) as differentiable callables.

`CascadeKernel(q, k, v, *, scale=None, return_lse=False, **inputs)` checks its arguments as a
softmax Kernel does (attnc.runtime.softmax.check_call), then launches the forward's stage kernels
in order: each reads the operands, params, inputs and the fp32 buffers earlier stages wrote
([B, H, M|N(, D|Dv)], one per tensor that crosses stages; nothing of rank [M, N] exists). The
backward launches the backward cascade's stages on the saved buffers and dO; dk and dv come out
per query head and are summed over each GQA group, and a param's gradient leaves the kernels as
per-row partial sums that are scatter-summed in a fixed order (attnc.scatter): deterministic.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy
import torch

from attnc.backends.eager.evaluate import Evaluator, gather
from attnc.backends.triton import interpreting
from attnc.backends.triton.cascade.stage import LOWP, buffers, role
from attnc.backends.triton.contract import Bind
from attnc.expr import symbols as S
from attnc.ir.cascade import ScatterSum, TensorKind
from attnc.ir.stage_kernel import CascadePlan, StageKernel
from attnc.pipeline import IR, FrontendIR, Source
from attnc.runtime.base import CompiledKernel
from attnc.runtime.softmax import check_call, prepare_call_checks

LAUNCH_OPTIONS = ("block_m", "block_n", "num_warps")


def _pow2(x: int) -> int:
    return max(16, 1 << max(0, x - 1).bit_length())


class CascadeKernel(CompiledKernel):
    """A compiled general cascade: `kernel(q, k, v, *, scale=None, return_lse=False,
    **inputs)`; differentiable in q, k, v and every `param` when the cascade has a backward."""

    def __init__(self, src: Source, options: dict, frontend_ir: FrontendIR,
                 trail: list[tuple[str, IR]], launch_overrides: dict,
                 autotune: bool | None = None):
        super().__init__(src, options, frontend_ir, trail, autotune)
        assert isinstance(self.final_ir, CascadePlan)
        self.plan: CascadePlan = self.final_ir
        self.kernel_ir = self.plan  # what check_call reads: inputs and loads
        if getattr(frontend_ir, "block_sparse", False):
            raise ValueError(f"{self.name}: block_sparse=True applies to softmax kernels; a "
                             "general cascade bounds its loops by its own mask statement")
        if autotune:
            raise ValueError(f"{self.name}: autotune=True applies to softmax and linear kernels; "
                             "a general cascade's stage kernels run at block_m / block_n "
                             "(default 32) and num_warps")
        unknown = sorted(set(launch_overrides) - set(LAUNCH_OPTIONS))
        if unknown:
            raise ValueError(f"{unknown[0]} does not apply to a general cascade's kernels "
                             f"(their launch options: {', '.join(LAUNCH_OPTIONS)})")
        self._overrides = launch_overrides  # checked by launch_options (compile_spec)
        self.inputs = tuple(d.name for d in self.plan.inputs)
        self.block_sparse = False
        prepare_call_checks(self, src, frontend_ir)

    def __repr__(self) -> str:
        extra = f", inputs={list(self.inputs)}" if self.inputs else ""
        return f"attnc.CascadeKernel({self.name!r}, {len(self.plan.forward)} kernels{extra})"

    def __call__(self, q, k, v, *, scale=None, return_lse=False, block_mask=None, **inputs):
        if not isinstance(return_lse, bool):
            raise ValueError(f"{self.name}: return_lse must be True or False, got "
                             f"{return_lse!r}")
        if return_lse and self.plan.lse is None:
            raise ValueError(f"{self.name}: return_lse=True, but this cascade has no lse (only "
                             "a softmax-type normalizer defines one)")
        if block_mask is not None:
            raise ValueError(f"{self.name}: a general cascade takes no block_mask (its mask "
                             "statement bounds its loops)")
        extras = check_call(self, q, k, v, scale, inputs)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, lse = _Apply.apply(self, scale, q, k, v, *extras)
        return (out, lse) if return_lse else out

    # --- launching --------------------------------------------------------------------------
    def _launch(self, sk: StageKernel, backward: bool, memory: dict[str, torch.Tensor],
                named: dict[str, torch.Tensor], sizes: dict[str, int], scale: float,
                dtype: torch.dtype, save: bool = True) -> None:
        """Run one stage: allocate its writes (and partial-sum buffers) in `memory`, launch;
        without `save`, what only the backward reads is neither allocated nor stored."""
        B, H, M, N, D, Dv = (sizes[x] for x in ("B", "H", "M", "N", "D", "DV"))
        extent = {"m": M, "n": N, "e": D, "f": Dv}
        dev = next(iter(memory.values())).device
        for name, ranks in sk.writes:
            shape = (B, H, *(extent[r] for r in ranks))
            if name in sk.saves and not save:
                shape = (0,) * len(shape)  # the kernel's stores of it are compiled out
            memory[name] = torch.empty(shape, dtype=torch.float32, device=dev)
        P = extent[sk.parallel]
        for name, j in buffers(sk):
            memory[f"{name}#{j}"] = torch.empty((B, H, P), dtype=torch.float32, device=dev)
        blocks = {"m": self._overrides.get("block_m", 32), "n": self._overrides.get("block_n", 32)}
        for name in sk.stage.checkpoints:  # a scan's carry per (row, loop tile); 0 if unvisited
            assert sk.loop is not None
            tiles = -(-extent[sk.loop] // blocks[sk.loop])
            memory[f"{name}@carry"] = torch.zeros((B, H, P, tiles), dtype=torch.float32,
                                                  device=dev)
        pool: dict[Bind, Any] = {
            Bind("B"): B, Bind("H"): H, Bind("M"): M, Bind("N"): N, Bind("D"): D,
            Bind("DV"): Dv, Bind("GROUP"): sizes["GROUP"], Bind("P_SIZE"): P,
            Bind("scale"): scale, Bind("BLOCK_P"): blocks[sk.parallel],
            Bind("BLOCK_L"): blocks[sk.loop] if sk.loop else 16,
            Bind("BLOCK_D"): _pow2(D), Bind("BLOCK_DV"): _pow2(Dv),
            Bind("IEEE"): dtype == torch.float32, Bind("UPCAST"): interpreting(),
            Bind("LOWP"): LOWP[str(dtype).removeprefix("torch.")], Bind("SAVE"): save}
        for name, t in list(memory.items()) + list(named.items()):
            if "#" in name:
                grad, term = name.split("#")
                pool[Bind("buffer", grad, int(term))] = t
                continue
            if name.endswith("@carry"):
                scan = name.removesuffix("@carry")
                pool[Bind("checkpoint", scan)] = t
                for i, st in enumerate(t.stride()):
                    pool[Bind("cstride", scan, i)] = st
                continue
            pool[Bind("tensor", name)] = t
            for i, st in enumerate(t.stride()):
                pool[Bind("stride", name, i)] = st
        module = self.module()
        contract = module.contracts[role(backward, sk.index)]
        values = {p.bind: pool[p.bind] for p in contract.params}
        opts = {"num_warps": self._overrides["num_warps"]} if "num_warps" in self._overrides \
            else None
        with _quiet():
            module.launch(contract.role, values, grid={"P_SIZE": P}, options=opts)

    def forward_memory(self, q, k, v, extras, scale, save: bool = True
                       ) -> dict[str, torch.Tensor]:
        """Run the forward's stages; `save`: also store what the backward reads."""
        named = dict(zip(self.inputs, extras))
        memory = {"Q": q, "K": k, "V": v}
        sizes = _sizes(q, k, v)
        for sk in self.plan.forward:
            self._launch(sk, False, memory, named, sizes, scale, q.dtype, save)
        return memory

    def backward_grads(self, q, k, v, extras, scale, residuals: dict[str, torch.Tensor],
                       dout, dlse, wanted: list[bool]) -> list[torch.Tensor | None]:
        plan = self.plan
        if not plan.has_backward:
            raise RuntimeError(f"{self.name}: no backward: {plan.no_backward}")
        named = dict(zip(self.inputs, extras))
        memory: dict[str, torch.Tensor] = {"Q": q, "K": k, "V": v}
        for saved, what in plan.saved:
            if what == "dO":
                memory[saved] = dout.contiguous()
            elif what == "dLSE":
                memory[saved] = (dlse if dlse is not None else torch.zeros(
                    q.shape[:3], dtype=torch.float32, device=q.device)).float().contiguous()
            elif what in residuals:
                memory[saved] = residuals[what]
        sizes = _sizes(q, k, v)
        for sk in plan.backward:
            self._launch(sk, True, memory, named, sizes, scale, q.dtype)
        grads = dict(plan.grads)
        B, H = q.shape[:2]
        Hk = k.shape[1]

        def heads(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            # dk, dv per query head, summed over each GQA group
            return t.view(B, Hk, H // Hk, *t.shape[2:]).sum(2).to(like.dtype)
        out: list[torch.Tensor | None] = [
            memory[grads["dq"]].to(q.dtype) if "dq" in grads else torch.zeros_like(q),
            heads(memory[grads["dk"]], k) if "dk" in grads else torch.zeros_like(k),
            heads(memory[grads["dv"]], v) if "dv" in grads else torch.zeros_like(v)]
        for decl, t, flag in zip(plan.inputs, extras, wanted):
            name = grads.get(f"d_{decl.name}")
            if not flag or decl.kind is not TensorKind.PARAM:
                out.append(None)
            elif name is None:
                out.append(torch.zeros_like(t))
            else:
                out.append(_param_grad(plan, name, memory, named, sizes).to(t.dtype))
        return out


def _quiet():
    """Triton's interpreter runs a kernel as numpy code, which warns about the inf and nan of
    padding rows (0 / 0 where no key is visible) that the kernel masks off when it stores;
    compiled kernels compute the same values silently."""
    return numpy.errstate(all="ignore") if interpreting() else contextlib.nullcontext()


def _sizes(q, k, v) -> dict[str, int]:
    B, H, M, D = q.shape
    return {"B": B, "H": H, "M": M, "N": k.shape[2], "D": D, "DV": v.shape[3],
            "GROUP": H // k.shape[1]}


def _param_grad(plan: CascadePlan, name: str, memory, named, sizes) -> torch.Tensor:
    """A param's gradient from its ScatterSum's per-row partial sums: each term's buffer
    [B, H, P] is scatter-summed at the term's index, evaluated over (b, h, p)."""
    from attnc.scatter import scatter_sum
    sk, node = next((sk, nd) for sk in plan.backward for nd in sk.nodes
                     if isinstance(nd, ScatterSum) and nd.name == name)
    param = named[node.param]
    B, H = sizes["B"], sizes["H"]
    dev = param.device
    grad = torch.zeros(param.shape, dtype=torch.float64, device=dev)
    P = sizes["M" if sk.parallel == "m" else "N"]
    syms = {S.B: B, S.H: H, S.M: sizes["M"], S.N: sizes["N"],
            S.b: torch.arange(B, device=dev).view(-1, 1, 1),
            S.h: torch.arange(H, device=dev).view(1, -1, 1),
            S.RANKS[sk.parallel]: torch.arange(P, device=dev).view(1, 1, -1)}
    for j, (index, _) in enumerate(node.terms):
        values = memory[f"{name}#{j}"]

        def access(acc):
            return gather(named[str(acc.base)], [ev(x) for x in acc.indices])
        ev = Evaluator(syms, values, access=access)
        grad += scatter_sum(values, [ev(x) for x in index], tuple(param.shape))
    return grad


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: CascadeKernel, scale: float, q, k, v, *extras):
        # inference (no input needs a gradient) stores none of the backward's residuals
        memory = kernel.forward_memory(q, k, v, extras, scale, save=any(ctx.needs_input_grad))
        plan = kernel.plan
        out = memory[plan.out].to(q.dtype)
        lse = memory[plan.lse] if plan.lse else torch.empty(0, device=q.device)
        residuals = [what for _, what in plan.saved if what in memory
                     and what not in ("Q", "K", "V")]
        ctx.kernel, ctx.scale, ctx.n_extras = kernel, scale, len(extras)
        ctx.residual_names = residuals
        ctx.save_for_backward(q, k, v, *extras, *(memory[r] for r in residuals))
        if plan.lse is None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, *rest = ctx.saved_tensors
        extras, saved = rest[:ctx.n_extras], rest[ctx.n_extras:]
        wanted = list(ctx.needs_input_grad[5:])
        grads = ctx.kernel.backward_grads(q, k, v, extras, ctx.scale,
                                          dict(zip(ctx.residual_names, saved)), dout, dlse,
                                          wanted)
        return (None, None, *grads)
