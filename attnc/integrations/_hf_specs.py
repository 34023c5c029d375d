"""Which attnc kernel runs a transformers attention layer (for attnc/integrations/transformers.py).

A registration either has no spec (attnc writes the model's own attention from what the layer
passes: causal, a sliding window `n <= m and m - n < W`, a logit soft-cap `c * tanh(s / c)`)
or a spec (a library name, DSL text or a `.attn` path) that every layer runs. A layer's sliding
window and soft-cap then become that spec's options `window` and `cap`; a spec without the
option, or whose caller fixed it to another value, is refused here (never silently ignored).
Kernels are compiled once per (registration, window, cap) and kept.

Never: decides anything about masks, caches or positions (attnc/integrations/_hf_masks.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import attnc
from attnc.pipeline import frontend, read_spec


@dataclass(frozen=True)
class LayerKernel:
    """A layer's kernel and what the attention function must know about its spec."""

    kernel: attnc.Kernel
    own: bool            # attnc wrote the spec from the model's layer (no spec registered)
    bidirectional: bool  # the spec has no mask: it may run layers that are not causal


class Registration:
    """One registered name: the spec (None: the model's own attention) and its options."""

    def __init__(self, name: str, spec: str | None, options: dict):
        self.name = name
        self.spec = spec
        self.options = dict(options)
        self._kernels: dict[tuple, LayerKernel] = {}
        self._lock = threading.Lock()
        if spec is not None:
            self.declared = _declared_options(spec, self.options)
            self.layer_kernel(None, None)  # refuse a spec that cannot run a model now

    def layer_kernel(self, window: int | None, cap: float | None) -> LayerKernel:
        """The kernel for a layer with this sliding window and soft-cap (None: none)."""
        key = (window, cap)
        with self._lock:
            found = self._kernels.get(key)
        if found is None:
            found = self._own(window, cap) if self.spec is None else self._given(window, cap)
            with self._lock:
                found = self._kernels.setdefault(key, found)
        return found

    def _own(self, window: int | None, cap: float | None) -> LayerKernel:
        options: dict[str, object] = {}
        lines = []
        if window is not None:
            lines.append("option window = 1")
            options["window"] = window
        if cap is not None:
            lines.append("option cap = 1.0")
            lines.append("score = cap * tanh(dot(q, k) * scale / cap)")
            options["cap"] = cap
        lines.append("mask = n <= m" + (" and m - n < window" if window is not None else ""))
        text = "attention hf_layer {\n  " + "\n  ".join(lines) + "\n}\n"
        return LayerKernel(_softmax_kernel(text, options, self.name), True, False)

    def _given(self, window: int | None, cap: float | None) -> LayerKernel:
        assert self.spec is not None
        options = dict(self.options)
        for option, value, what in (("window", window, "sliding_window"),
                                    ("cap", cap, "softcap (attn_logit_softcapping)")):
            if value is None:
                continue
            if option not in self.declared:
                raise ValueError(
                    f"attnc attention {self.name!r}: the model's layer has {what}={value}, but "
                    f"spec {_short(self.spec)} has no option `{option}` to honor it; register a "
                    f"spec with `option {option}` (or spec=None: the model's own attention)")
            if option in self.options and self.options[option] != value:
                raise ValueError(
                    f"attnc attention {self.name!r}: {option}={self.options[option]} was "
                    f"registered, but the model's layer has {what}={value}")
            options[option] = value
        kernel = _softmax_kernel(self.spec, options, self.name)
        spec = frontend(read_spec(self.spec), options)[1]
        return LayerKernel(kernel, False, getattr(spec, "mask", None) is None)


def _declared_options(spec: str, options: dict) -> tuple[str, ...]:
    """The options a spec declares (its frontend checks the given ones exist)."""
    try:
        ir = frontend(read_spec(spec), options)[1]
    except (attnc.SpecError, OSError) as err:
        raise ValueError(f"spec: {err}") from err
    declared = getattr(ir, "options", None)
    if declared is None:
        raise ValueError(f"spec {_short(spec)} is not a softmax attention spec (an `attention` "
                         "block); transformers layers need one")
    return tuple(name for name, _ in declared)


def _softmax_kernel(spec: str, options: dict, name: str) -> attnc.Kernel:
    kernel = attnc.compile(spec, **options)
    if not isinstance(kernel, attnc.Kernel):
        raise ValueError(f"attnc attention {name!r}: spec {_short(spec)} compiles to a "
                         f"{type(kernel).__name__}; transformers layers need a softmax-family "
                         "attnc.Kernel (an `attention` block)")
    if kernel.inputs:
        raise ValueError(f"attnc attention {name!r}: spec {_short(spec)} needs tensors "
                         f"{list(kernel.inputs)} that a transformers layer does not provide")
    return kernel


def _short(spec: str) -> str:
    text = spec.strip().splitlines()[0] if spec.strip() else spec
    return repr(text if len(text) <= 60 else text[:57] + "...")
