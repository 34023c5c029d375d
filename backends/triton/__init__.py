"""Triton backend. On a machine without CUDA, kernels run through Triton's interpreter: the
switch must be set before any kernel is defined, so it is set here, before Triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
