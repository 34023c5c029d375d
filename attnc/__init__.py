"""attnc: a compiler for attention variants.

    kernel = attnc.compile(spec_text_or_path, **options)
    out = kernel(q, k, v, scale=None, return_lse=False, **inputs)
    attnc.load("sliding_window", window=256); attnc.variants()

FlexAttention's API, on the same compiler:

    out = attnc.flex_attention(q, k, v, score_mod=..., block_mask=...)
    block_mask = attnc.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN)
    attnc.and_masks / attnc.or_masks / attnc.noop_mask / attnc.BlockMask

Any other normalizer or cascade (sigmoid, l1, standardized, Sinkhorn, sinks, gates, scans, ...)
compiles to an `attnc.CascadeKernel`: its schedule's stage kernels, called the same way.

State-update (linear) attention: `linear` specs compile to an `attnc.LinearKernel`
(kernel(q, k, v, initial_state=..., output_final_state=True, cu_seqlens=..., **inputs)), and
`attnc.ops` has flash-linear-attention-style functions (chunk_gla, fused_recurrent_gla, ...), and
`attnc.sparse` content-sparse attention (moba, vertical_slash).
"""

from __future__ import annotations

__version__ = "0.1.0"

import sys
import threading

from attnc.errors import CompileError, SpecError

__all__ = ["compile", "load", "variants", "Kernel", "SpecError", "CompileError", "__version__",
           "flex_attention", "create_block_mask", "BlockMask", "and_masks", "or_masks",
           "noop_mask", "LinearKernel", "CascadeKernel", "BranchedKernel", "GatherKernel",
           "BlockGatherKernel", "MixingKernel", "PagedKVCache", "ops", "sparse", "nn",
           "serving", "integrations"]

# Loaded on first use: importing attnc stays cheap (no torch, Triton or sympy until needed).
_LAZY = {"Kernel": "attnc.runtime.softmax", "flex_attention": "attnc.flex",
         "create_block_mask": "attnc.block_mask", "BlockMask": "attnc.block_mask",
         "and_masks": "attnc.block_mask", "or_masks": "attnc.block_mask",
         "noop_mask": "attnc.block_mask", "LinearKernel": "attnc.runtime.linear",
         "CascadeKernel": "attnc.runtime.cascade", "BranchedKernel": "attnc.runtime.branches",
         "GatherKernel": "attnc.runtime.gather", "BlockGatherKernel": "attnc.runtime.gather",
         "MixingKernel": "attnc.runtime.mixing", "PagedKVCache": "attnc.paged_cache"}
_MODULES = ("ops", "sparse", "nn", "serving", "integrations")

if "torch" in sys.modules:  # pick Triton's mode (interpreter without CUDA) before others import it
    import attnc.backends.triton  # noqa: F401

_MEMO: dict = {}
_MEMO_LOCK = threading.Lock()


def compile(spec, **options):
    """Compile DSL text or a `.attn` path (or library name); options override `option` defaults.

    Launch options `block_m`, `block_n`, `num_warps`, `num_stages` fix the tile configuration.
    """
    from attnc import cache
    from attnc.pipeline import read_spec
    from attnc.runtime import compile_spec

    src = read_spec(spec)
    memo = cache.digest(src.text, src.filename, repr(sorted(options.items())),
                        str(cache.cache_dir()))
    with _MEMO_LOCK:
        if memo in _MEMO:
            return _MEMO[memo]
    kernel = compile_spec(src, dict(options))
    with _MEMO_LOCK:
        return _MEMO.setdefault(memo, kernel)


def load(name: str, **options):
    """Compile the library variant `variants/NAME.attn`."""
    from attnc.library import variant_path
    from attnc.library import variants as names

    if not isinstance(name, str):
        raise ValueError(f"name must be a library variant's name (a str), got "
                         f"{type(name).__name__}")
    if variant_path(name) is None:
        shown = repr(name) if len(name) <= 80 else repr(name[:60]) + f"... ({len(name)} chars)"
        raise ValueError(f"no library variant {shown}; available: {', '.join(names())}")
    return compile(name, **options)


def variants() -> list[str]:
    """Names of the library's variants."""
    from attnc.library import variants as names

    return names()


def __getattr__(name):
    import importlib
    if name in _MODULES:
        return importlib.import_module(f"attnc.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnc' has no attribute {name!r}")
