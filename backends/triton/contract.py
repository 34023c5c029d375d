"""What code generation hands the launchers and the AOT check: one contract per kernel.

A `KernelContract` is a kernel's entry point, its typed signature and its grid rule. The code
generator declares each generated kernel's signature here once and prints the `def` line from
it; a launcher never passes arguments by position: it gathers its values under `Bind` keys (a
role such as "Q" or "stride_qb", or a declared tensor, its strides, a state, a partial-sum
buffer) and `bind` maps them to the kernel's parameter names, refusing a missing or an unused
value. The AOT check builds its signatures from the same contracts (`aot_signature`).
`GeneratedModule` is one generated source file and the contracts of the kernels in it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class ParamType(enum.Enum):
    """A parameter's type as Triton's AOT compiler spells it; DATA follows the call's dtype."""

    DATA = "*data"        # q, k, v, the output and their gradients
    FP32_PTR = "*fp32"    # lse, delta, float params, states, partial sums
    INDEX_PTR = "*i64"    # an integer `input` (ids)
    I32_PTR = "*i32"      # block lists, cu_seqlens, chunk offsets
    INT = "i32"           # sizes, strides, counts
    FLOAT = "fp32"        # the softmax scale
    CONSTEXPR = "constexpr"

    def aot(self, dtype: str) -> str:
        """The AOT signature's type, with DATA as `dtype` ("bf16", "fp16", "fp32")."""
        return f"*{dtype}" if self is ParamType.DATA else self.value


@dataclass(frozen=True)
class Bind:
    """The launch value a parameter takes: `role` alone names an internal value ("Q",
    "stride_qb", "BLOCK_M", ...); with `of`, a value of a spec's tensor, state or load:
    role "tensor" / "stride" (with `dim`) / "init" / "final" / "buffer" and so on."""

    role: str
    of: str = ""
    dim: int = -1

    def __str__(self) -> str:
        if not self.of:
            return self.role
        return f"{self.role}({self.of}{'' if self.dim < 0 else f', {self.dim}'})"


@dataclass(frozen=True)
class Param:
    name: str  # as the generated source spells it
    type: ParamType
    bind: Bind

    @property
    def declaration(self) -> str:
        return f"{self.name}: tl.constexpr" if self.type is ParamType.CONSTEXPR else self.name


def arg(name: str, type: ParamType) -> Param:
    """An internal parameter, bound by its own name."""
    return Param(name, type, Bind(name))


@dataclass(frozen=True)
class GridRule:
    """How a kernel is parallelized: `doc` says it in words, `axes(values)` computes the launch
    grid from the launch values (sizes, constexprs and the launcher's extras) by name."""

    doc: str
    axes: Callable[[Mapping[str, int]], tuple[int, ...]]


@dataclass(frozen=True)
class KernelContract:
    role: str  # which kernel of the module: "forward", "dq", "recurrent", ...
    entry: str  # the @triton.jit function's name
    params: tuple[Param, ...]
    grid: GridRule
    doc: str = ""

    def bind(self, values: Mapping[Bind, object]) -> dict[str, object]:
        """Keyword arguments for a launch: each parameter's value from `values` by its Bind.
        Raises ValueError naming a parameter with no value or a value no parameter takes."""
        missing = [str(p.bind) for p in self.params if p.bind not in values]
        unused = sorted(str(b) for b in set(values) - {p.bind for p in self.params})
        if missing or unused:
            raise ValueError(f"{self.entry}: "
                             + (f"no value for {', '.join(missing)}" if missing else "")
                             + ("; " if missing and unused else "")
                             + (f"values for no parameter: {', '.join(unused)}" if unused else ""))
        return {p.name: values[p.bind] for p in self.params}

    def aot_signature(self, dtype: str, overrides: Mapping[str, str] | None = None
                      ) -> dict[str, str]:
        """{name: AOT type} of the non-constexpr parameters; `overrides` by parameter name."""
        sig = {p.name: p.type.aot(dtype) for p in self.params
               if p.type is not ParamType.CONSTEXPR}
        sig.update(overrides or {})
        return sig

    def constexprs(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.type is ParamType.CONSTEXPR)

    def describe(self) -> str:
        lines, line = [], "    signature: ("
        for i, p in enumerate(self.params):
            item = f"{p.name}: {p.type.value}" + (", " if i < len(self.params) - 1 else ")")
            if len(line) + len(item.rstrip()) > 96 and not line.endswith("("):
                lines.append(line.rstrip())
                line = " " * 16
            line += item
        return "\n".join([f"{self.entry} ({self.role}){': ' + self.doc if self.doc else ''}",
                          f"    grid: {self.grid.doc}", *lines, line])


@dataclass(frozen=True)
class GeneratedModule:
    """One generated source file, the contracts of its kernels, and how it spelled the names
    the spec chose ({name: spelling}, see names.py)."""

    source: str
    kernels: tuple[KernelContract, ...]
    names: Mapping[str, str]

    def kernel(self, role: str) -> KernelContract:
        for k in self.kernels:
            if k.role == role:
                return k
        raise KeyError(f"no {role} kernel; this module has "
                       f"{', '.join(k.role for k in self.kernels)}")

    def has(self, role: str) -> bool:
        return any(k.role == role for k in self.kernels)

    def describe(self) -> str:
        """The kernels, as `attnc show SPEC --stage kernel` lists them."""
        return "generated kernels:\n" + "\n".join("  " + k.describe().replace("\n", "\n  ")
                                                   for k in self.kernels) + "\n"
