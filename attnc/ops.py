"""flash-linear-attention-style entry points, compiled from attnc specs.

Same names, arguments and layout as fla's functions, so a model can swap `fla.ops` for
`attnc.ops`: q, k [B, T, H, K], v [B, T, H, V], gates and betas [B, T, H(, K)], states
[N, H, K, V]; each returns `(o [B, T, H, V], final_state or None)`. `cu_seqlens` packs N
sequences along T with B = 1. The `chunk_*` functions run the chunked kernel, the
`fused_recurrent_*` ones the recurrent kernel (one step at a time: the decoding path). Both are
differentiable in every tensor argument (gates, beta and the initial state included).

    chunk_linear_attn        S += k v^T;  o = scale q^T S  (normalize=True: divided by
                             scale q . sum(k), as fla's normalize_output)
    chunk_retention          S = (1 - 2^(-5 - h)) S + k v^T      (library spec `retnet`)
    chunk_simple_gla         S = exp(g) S + k v^T                (`simple_gla`)
    chunk_gla                S = diag(exp(g)) S + k v^T          (`gla`)
    chunk_delta_rule         S += beta k (v - S^T k)^T           (`delta_net`)
    chunk_gated_delta_rule   S = exp(g) S; S += beta k (v - S^T k)^T   (`gated_delta_net`)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnc

_LINEAR = """
linear linear_attn_plain {
  state S[i, j]
  S[i, j] = S[i, j] + k[i] * v[j]
  o[j] = sum(i) q[i] * scale * S[i, j]
}
"""
# fla's normalize_output: o / (q * scale . cumsum(k) + 1e-10)
_LINEAR_NORMALIZED = """
linear linear_attn_normalized {
  state S[i, j], z[i]
  S[i, j] = S[i, j] + k[i] * v[j]
  z[i] = z[i] + k[i]
  o[j] = (sum(i) q[i] * scale * S[i, j]) / (sum(i) q[i] * scale * z[i] + 1e-10)
}
"""

__all__ = [f"{mode}_{name}" for name in ("linear_attn", "retention", "simple_gla", "gla",
                                         "delta_rule", "gated_delta_rule")
           for mode in ("chunk", "fused_recurrent")]


def _core(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ...] -> the kernels' [B, H, T, ...] (a view)."""
    return x.transpose(1, 2)


def _run(spec: str, algorithm: str, q, k, v, inputs: dict, scale, initial_state,
         output_final_state, cu_seqlens, state: str = "S"):
    kernel = attnc.compile(spec)
    _operands(q=q, k=k, v=v)
    lead = tuple(q.shape[:3])
    for name, x in inputs.items():  # gates and betas: [B, T, H] or [B, T, H, K]
        rank = _RANKS[name][spec]
        if not torch.is_tensor(x) or x.dim() != rank or tuple(x.shape[:3]) != lead:
            layout = "[B, T, H]" if rank == 3 else "[B, T, H, K]"
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a {layout} tensor (fla's layout) with q's "
                             f"B, T, H = {lead}, got {got}")
    if initial_state is not None and not torch.is_tensor(initial_state):
        raise ValueError("initial_state must be a [N, H, K, V] tensor or None, got "
                         f"{type(initial_state).__name__}")
    _flag("output_final_state", output_final_state)
    init: torch.Tensor | dict[str, torch.Tensor] | None = initial_state
    if initial_state is not None and len(kernel.states) > 1:
        init = {state: initial_state}
    o, final = kernel(_core(q), _core(k), _core(v), scale=scale, initial_state=init,
                      output_final_state=True, cu_seqlens=cu_seqlens, algorithm=algorithm,
                      **{n: _core(x) for n, x in inputs.items()})
    if isinstance(final, dict):
        final = final[state]
    return _core(o), (final if output_final_state else None)


# Dimensions of each gate or beta argument, by spec: a vector gate for gla, scalars otherwise.
_RANKS = {"g": {"simple_gla": 3, "gla": 4, "gated_delta_net": 3},
          "beta": {"delta_net": 3, "gated_delta_net": 3}}


def _operands(**tensors) -> None:
    for name, x in tensors.items():
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D] (fla's layout), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _l2(q, k, on: bool):
    _flag("use_qk_l2norm_in_kernel", on)
    _operands(q=q, k=k)  # before normalizing them
    return (F.normalize(q, dim=-1), F.normalize(k, dim=-1)) if on else (q, k)


def _linear_attn(algorithm):
    def run(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
            cu_seqlens=None):
        _flag("normalize", normalize)
        spec = _LINEAR_NORMALIZED if normalize else _LINEAR
        return _run(spec, algorithm, q, k, v, {}, scale, initial_state, output_final_state,
                    cu_seqlens)
    return run


def _retention(algorithm):
    def run(q, k, v, scale=None, initial_state=None, output_final_state=False,
            cu_seqlens=None):
        return _run("retnet", algorithm, q, k, v, {}, scale, initial_state, output_final_state,
                    cu_seqlens)
    return run


def _gated(spec, algorithm):
    def run(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
            cu_seqlens=None):
        return _run(spec, algorithm, q, k, v, {"g": g}, scale, initial_state,
                    output_final_state, cu_seqlens)
    return run


def _delta(algorithm):
    def run(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
            cu_seqlens=None, use_qk_l2norm_in_kernel=False):
        q, k = _l2(q, k, use_qk_l2norm_in_kernel)
        return _run("delta_net", algorithm, q, k, v, {"beta": beta}, scale, initial_state,
                    output_final_state, cu_seqlens)
    return run


def _gated_delta(algorithm):
    def run(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
            cu_seqlens=None, use_qk_l2norm_in_kernel=False):
        q, k = _l2(q, k, use_qk_l2norm_in_kernel)
        return _run("gated_delta_net", algorithm, q, k, v, {"g": g, "beta": beta}, scale,
                    initial_state, output_final_state, cu_seqlens)
    return run


def _named(fn, name: str):
    fn.__name__ = fn.__qualname__ = name
    kind = "chunked" if name.startswith("chunk_") else "recurrent"
    fn.__doc__ = f"fla-compatible `{name}` on attnc's {kind} kernel (see attnc.ops)."
    return fn


chunk_linear_attn = _named(_linear_attn("chunked"), "chunk_linear_attn")
fused_recurrent_linear_attn = _named(_linear_attn("recurrent"), "fused_recurrent_linear_attn")
chunk_retention = _named(_retention("chunked"), "chunk_retention")
fused_recurrent_retention = _named(_retention("recurrent"), "fused_recurrent_retention")
chunk_simple_gla = _named(_gated("simple_gla", "chunked"), "chunk_simple_gla")
fused_recurrent_simple_gla = _named(_gated("simple_gla", "recurrent"),
                                    "fused_recurrent_simple_gla")
chunk_gla = _named(_gated("gla", "chunked"), "chunk_gla")
fused_recurrent_gla = _named(_gated("gla", "recurrent"), "fused_recurrent_gla")
chunk_delta_rule = _named(_delta("chunked"), "chunk_delta_rule")
fused_recurrent_delta_rule = _named(_delta("recurrent"), "fused_recurrent_delta_rule")
chunk_gated_delta_rule = _named(_gated_delta("chunked"), "chunk_gated_delta_rule")
fused_recurrent_gated_delta_rule = _named(_gated_delta("recurrent"),
                                          "fused_recurrent_gated_delta_rule")
