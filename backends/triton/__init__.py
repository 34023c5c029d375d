"""Triton backend. On a machine without CUDA, kernels run through Triton's interpreter. The switch
must be set before Triton is first imported (Triton's own library functions are built in
interpreter form or not at import), so it is set here, and a Triton imported too early (say by
torch's create_block_mask before attnc was used) is reported instead of failing obscurely."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_interpreter() -> None:
    """Raise if kernels will be interpreted but triton.language was imported in compiled form."""
    lang = sys.modules.get("triton.language")
    if lang is None or not interpreting():
        return
    if type(lang.zeros).__name__ == "JITFunction":
        raise RuntimeError(
            "Triton was imported before attnc could switch it to its CPU interpreter (this "
            "machine has no CUDA). Import attnc (or attnc.backends.triton) before anything that "
            "imports Triton, e.g. torch's create_block_mask, or set TRITON_INTERPRET=1 in the "
            "environment before starting Python.")
