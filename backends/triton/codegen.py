"""Code generation's entry points, for both families: the kernel module of a compiled IR.

`generate(ir, header)` prints the Triton source of a softmax kernel IR (AttentionKernel), a
general cascade's plan of stage kernels (CascadePlan) or a linear plan (ScanPlan) and returns it
with its kernels' contracts. `contracts(ir, names)`
rebuilds just the contracts, for a module read back from the cache, with the spellings its
generation chose (`GeneratedModule.names`): a cache hit generates no code.
"""

from __future__ import annotations

from collections.abc import Mapping

from attnc.backends.triton.cascade import stage
from attnc.backends.triton.contract import GeneratedModule, KernelContract
from attnc.backends.triton.linear import forward as linear_forward
from attnc.backends.triton.linear import recurrent_backward
from attnc.backends.triton.softmax import backward as softmax_backward
from attnc.backends.triton.softmax import forward as softmax_forward
from attnc.ir.kernel import AttentionKernel
from attnc.ir.linear_kernel import Algorithm, ScanBackward, ScanPlan
from attnc.ir.stage_kernel import CascadePlan

KernelIR = AttentionKernel | CascadePlan | ScanPlan


def generate(ir: KernelIR, header: str = "") -> GeneratedModule:
    if isinstance(ir, ScanPlan):
        return linear_forward.generate(ir, header)
    if isinstance(ir, CascadePlan):
        return stage.generate(ir, header)
    return softmax_forward.generate(ir, header)


def contracts(ir: KernelIR, names: Mapping[str, str]) -> tuple[KernelContract, ...]:
    """The contracts `generate(ir)` returns, spelled with `names` (its `names`)."""
    if isinstance(ir, CascadePlan):
        return stage.contracts(ir, names)
    if isinstance(ir, ScanPlan):
        nm = linear_forward.ScanNames(ir.scan, names)
        found = [linear_forward.forward_contract(ir.scan, Algorithm.RECURRENT, nm)]
        if ir.chunked:
            found.append(linear_forward.forward_contract(ir.scan, Algorithm.CHUNKED, nm))
        if ir.backward is ScanBackward.RECURRENT:
            found.append(recurrent_backward.backward_contract(ir.scan, nm))
    else:
        knm = softmax_forward.KernelNames(ir, names)
        found = [softmax_forward.forward_contract(ir, knm)]
        if ir.grad is not None:
            found += [softmax_backward.PREPROCESS, softmax_backward.dq_contract(ir, knm),
                      softmax_backward.dkdv_contract(ir, knm)]
    return tuple(found)
