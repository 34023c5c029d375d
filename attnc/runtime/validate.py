"""Argument checks both families share: each raises ValueError naming the argument and saying
what was expected, before anything launches."""

from __future__ import annotations

from typing import Any

import torch

import attnc.backends.triton as triton_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def operands(kernel: str, layout: dict[str, str], **tensors: Any) -> None:
    """q, k, v (by name) are 4-D tensors (`layout[name]` spells the expected shape) of one
    supported dtype on one supported device."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{kernel}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{kernel}: {name} must be 4-D {layout[name]}, got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{kernel}: {name} has dtype {t.dtype}; expected float32, "
                             "float16 or bfloat16")
    (first, lead), *_ = tensors.items()
    for name, t in tensors.items():
        if t.device != lead.device:
            raise ValueError(f"{kernel}: {name} is on {t.device}, {first} is on {lead.device}")
    dtypes = [t.dtype for t in tensors.values()]
    if len(set(dtypes)) != 1:
        raise ValueError(f"{kernel}: {', '.join(tensors)} must share a dtype, got "
                         f"{', '.join(str(d) for d in dtypes)}")
    device(kernel, lead.device)


def device(kernel: str, where: torch.device) -> None:
    """Kernels run on CUDA, or on the CPU through Triton's interpreter."""
    if where.type == "cpu" and not triton_backend.interpreting():
        raise ValueError(f"{kernel}: tensors are on the CPU but this process runs Triton "
                         "natively; use CUDA tensors, or set TRITON_INTERPRET=1 before "
                         "importing attnc to run on the CPU through Triton's interpreter")
    if where.type == "meta":  # no data to run on; fake tensors carry shapes and a device
        raise ValueError(f"{kernel}: device meta is not supported (cuda or cpu); for output "
                         "shapes without running, call it on FakeTensorMode tensors (as "
                         "torch.compile traces it)")
    if where.type not in ("cpu", "cuda"):
        raise ValueError(f"{kernel}: device {where} is not supported (cuda or cpu)")


def known(kernel: str, given, expected: tuple[str, ...]) -> None:
    """Every keyword tensor is one the spec declares."""
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise ValueError(f"{kernel}: unknown input {unknown[0]!r}; this kernel takes "
                         f"{', '.join(expected) or 'no extra inputs'}")


def scale(kernel: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{kernel}: scale must be a Python number or None, got {value!r}")


def spec_tensor(kernel: str, decl, t: Any, want: tuple[int, ...], where: torch.device) -> None:
    """A spec's param or input `decl` (attnc.ir.cascade.TensorDecl) given as `t`: a real tensor
    of shape `want` on `where`, floating point when it is a param."""
    from attnc.ir.cascade import TensorKind
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{kernel}: {decl.name} must be a torch.Tensor")
    if tuple(t.shape) != want:
        raise ValueError(f"{kernel}: {decl.name} has shape {tuple(t.shape)}, expected {want} "
                         f"([{', '.join(map(str, decl.dims))}])")
    if t.device != where:
        raise ValueError(f"{kernel}: {decl.name} is on {t.device}, q is on {where}")
    if decl.kind is TensorKind.PARAM and not t.is_floating_point():
        raise ValueError(f"{kernel}: param {decl.name} must be floating point, got {t.dtype}")
    if t.is_complex():
        raise ValueError(f"{kernel}: {decl.name} must be real, got {t.dtype}")
