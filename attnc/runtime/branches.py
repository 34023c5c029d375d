"""A block of branches (attnc/ir/branches.py) as one callable: `BranchedKernel`.

Each branch compiles, through the ordinary pipeline (`attnc.runtime.compile_ir`), to its own
softmax `Kernel`; a call runs them one after another and merges their outputs in torch:

    kernel(q, k, v, *, scale=None, return_lse=False, **tensors)

passes each branch q, its keys and values (k and v, or the operands its `k = kc` / `v = vc`
renamed) and the params, inputs and operands its spec declares. `combine = softmax` merges by
log-sum-exp: lse = log Σ_i exp(lse_i), out = Σ_i exp(lse_i − lse) · out_i, computed against the
rows' largest lse_i so that a row no branch lets see a key gets out 0 and lse −inf, and finite
gradients (never NaN). `combine = gates` returns Σ_i out_i, each branch kernel having multiplied
its output by its gate (the spec's `around.gate`, so a query tile whose gates are all 0 may skip
its keys); it has no single lse, so return_lse=True is refused. The merge runs in fp32 (at
least) and the output takes q's dtype.

Gradients: torch autograd through the merge, and through each branch kernel's own backward
(its lse is differentiable; a gate's params get theirs from the kernel), so q's gradient is the
sum over the branches.

Cost, honestly: k branches are k forward launches (and 3k backward: preprocess, dq, dk/dv each)
plus a torch merge reading every out_i once. One kernel for all branches would need the
branches to share a query tile's program: loop over each branch's key tiles in turn with one
running max and sum (the online softmax already is an lse merge), each branch with its own key
pointers, mask and bounds; that is a code generator change, not done here.
"""

from __future__ import annotations

import math

import torch

from attnc import cache
from attnc.errors import CompileError
from attnc.ir.branches import Branch, Branches, Combine
from attnc.ir.cascade import origin_of
from attnc.pipeline import Source, show
from attnc.runtime import validate
from attnc.runtime.softmax import Kernel


class BranchedKernel:
    """A compiled block of branches: `kernels` holds each branch's Kernel (in branch order),
    `source` their generated sources, `ir(stage)` each branch's IR after a stage."""

    def __init__(self, src: Source, options: dict, ir: Branches, launch_overrides: dict,
                 tune: bool | None = None):
        from attnc.runtime import compile_ir  # the package imports this module
        self.spec = src
        self.name = ir.name
        self.branches_ir = ir
        self._options = options
        kernels = []
        for br in ir.branches:
            kern = compile_ir(br.spec, src, dict(options), dict(launch_overrides), tune)
            if not isinstance(kern, Kernel):  # pragma: no cover - lowering admits softmax only
                where = origin_of(ir.origins, f"branch {br.name}")
                raise CompileError(f"branch {br.name} did not compile to a softmax kernel",
                                   source=src.text, filename=src.filename,
                                   line=where.line if where else 0,
                                   column=where.column if where else 0)
            kernels.append(kern)
        self.kernels: tuple[Kernel, ...] = tuple(kernels)
        self.inputs = ir.tensors
        self.key = cache.digest(*(k.key for k in self.kernels))
        self.cache_hit = all(k.cache_hit for k in self.kernels)
        self.source = "\n".join(f"# branch {br.name}\n{k.source}"
                                for br, k in zip(ir.branches, self.kernels))
        # per branch: its keys' and values' call arguments (None: the kernel takes no v, its
        # value being an operand) and its keyword tensors, read at every call
        self._calls = [(br.keys, br.values if br.spec.around.value == "v" else None,
                        _branch_tensors(br)) for br in ir.branches]

    def __repr__(self) -> str:
        names = ", ".join(br.name for br in self.branches_ir.branches)
        return (f"attnc.BranchedKernel({self.name!r}, branches=[{names}], "
                f"combine={self.branches_ir.combine.value})")

    def ir(self, stage: str = "kernel") -> str:
        """Each branch's IR after a stage under `# branch NAME` (`cascade`: the Branches IR,
        `parse`: the block's parse tree)."""
        if stage == "cascade":
            return str(self.branches_ir)
        if stage == "parse":
            return show(self.spec, stage, self._options)
        return "\n".join(f"# branch {br.name}\n{k.ir(stage).rstrip(chr(10))}\n"
                         for br, k in zip(self.branches_ir.branches, self.kernels))

    def __call__(self, q, k, v, *, scale=None, return_lse=False, **tensors):
        ir = self.branches_ir
        if not isinstance(return_lse, bool):
            raise ValueError(f"{self.name}: return_lse must be True or False, got "
                             f"{return_lse!r}")
        if return_lse and ir.combine is Combine.GATES:
            raise ValueError(f"{self.name}: return_lse: a gated mix of separately normalized "
                             "branches (combine = gates) has no single log-sum-exp")
        validate.known(self.name, tensors, self.inputs)
        for name in self.inputs:
            if name not in tensors:
                raise ValueError(f"{self.name}: missing {name!r}")
        validate.operands(self.name, {"q": "[B, H, M, D]"}, q=q)
        args = {"k": k, "v": v, **tensors}
        joint = ir.combine is Combine.JOINT
        outs, lses = [], []
        for br, kern, (keys, values, own) in zip(ir.branches, self.kernels, self._calls):
            try:
                # gated branches take no lse: without one (and without gradients) a kernel
                # skips the query tiles whose gates are all 0
                result = kern(q, args[keys], None if values is None else args[values],
                              scale=scale, return_lse=joint, **{n: args[n] for n in own})
            except ValueError as err:
                renamed = "".join(f" ({role} = {arg})" for role, arg in
                                  (("k", br.keys), ("v", br.values)) if arg != role)
                raise ValueError(f"{self.name}: branch {br.name}{renamed}: {err}") from None
            outs.append(result[0] if joint else result)
            if joint:
                lses.append(result[1])
        if not joint:
            merged = _wide(outs[0])
            for o in outs[1:]:
                merged = merged + _wide(o)
            return merged.to(q.dtype)
        out, lse = merge(outs, lses)
        out = out.to(q.dtype)
        return (out, lse) if return_lse else out


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The lse merge of normalized outputs (in fp32 at least): out = Σ exp(lse_i − lse) out_i.
    Weighed against each row's largest lse_i (detached: the result does not depend on it), a
    row whose every lse_i is −inf gets weights 0, out 0 and lse −inf; no NaN forward or
    backward."""
    stacked = torch.stack(lses)
    top = stacked.amax(0).detach()
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weights = torch.exp(stacked - top)
    total = weights.sum(0)
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, -math.inf), top + torch.log(total))
    out = sum((w / total)[..., None] * _wide(o) for w, o in zip(weights, outs))
    assert isinstance(out, torch.Tensor)
    return out, lse


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 at least (bf16 and fp16 outputs are summed in fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _branch_tensors(br: Branch) -> tuple[str, ...]:
    """The keyword tensors a branch's kernel takes: its params, inputs and operands."""
    return tuple(d.name for d in br.spec.decls) + tuple(o.name for o in br.spec.around.operands)
