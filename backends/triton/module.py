"""A kernel module ready to launch: the imported Python module and its kernels' contracts.

`launch(role, values)` binds the launch values to the kernel's parameters by name (see
contract.py), computes the grid from the kernel's grid rule and launches it. Generated modules
and the static core kernels (backends/triton/linear/core.py) are launched the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from attnc.backends.triton.contract import Bind, GeneratedModule, KernelContract


class KernelModule:
    def __init__(self, contracts: tuple[KernelContract, ...], module: ModuleType):
        self.contracts = {c.role: c for c in contracts}
        self.module = module

    @classmethod
    def of(cls, generated: GeneratedModule, module: ModuleType) -> KernelModule:
        return cls(generated.kernels, module)

    def has(self, role: str) -> bool:
        return role in self.contracts

    def launch(self, role: str, values: Mapping[Bind, Any],
               grid: Mapping[str, int] | None = None,
               options: Mapping[str, int] | None = None) -> None:
        """Launch the `role` kernel on `values` (by Bind); `grid` adds launch facts its grid
        rule reads besides the kernel's own arguments; `options` are Triton's (num_warps)."""
        contract = self.contracts[role]
        kwargs = contract.bind(values)
        facts = {b.role: v for b, v in values.items() if not b.of}
        axes = contract.grid.axes({**facts, **(grid or {})})
        getattr(self.module, contract.entry)[axes](**kwargs, **(options or {}))
