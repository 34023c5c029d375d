"""Small specs shared by the pass tests, with inputs that make their masks bite at small sizes."""

from __future__ import annotations

import torch

SPECS = {
    "full": ("attention full {\n}\n", {}),
    "causal": ("attention causal {\n  mask = n <= m\n}\n", {}),
    "window": ("attention window {\n  option window = 9\n"
               "  mask = n <= m and m - n < window\n}\n", {}),
    "alibi": ("attention alibi {\n  param slopes[h]\n"
              "  score = dot(q, k) * scale + slopes[h] * (n - m)\n  mask = n <= m\n}\n",
              {"slopes": "param"}),
    "softcap": ("attention softcap {\n  option cap = 5.0\n"
                "  score = cap * tanh(dot(q, k) * scale / cap)\n}\n", {}),
    "sinks": ("attention sinks {\n  option sinks = 3, window = 7\n"
              "  mask = n <= m and (n < sinks or m - n < window)\n}\n", {}),
    "prefix": ("attention prefix {\n  option prefix = 11\n  mask = n <= m or n < prefix\n}\n", {}),
    "chunked": ("attention chunked {\n  option chunk = 12\n"
                "  mask = n <= m and m // chunk == n // chunk\n}\n", {}),
    "document": ("attention document {\n  input doc[b, n]\n"
                 "  mask = doc[b, m] == doc[b, n] and n <= m\n}\n", {"doc": "ids"}),
    "rel_bias": ("attention rel_bias {\n  option R = 4\n  param bias[h, 2 * R + 1]\n"
                 "  score = dot(q, k) * scale + bias[h, clamp(n - m, -R, R) + R]\n}\n",
                 {"bias": "param"}),
    "natten": ("attention natten {\n  option ks = 5\n  let start = clamp(m - ks // 2, 0, N - ks)\n"
               "  mask = n >= start and n < start + ks\n}\n", {}),
    "dilated": ("attention dilated {\n  option window = 4, dilation = 3\n"
                "  mask = n <= m and m - n < window * dilation and (m - n) % dilation == 0\n}\n",
                {}),
    "late_rows": ("attention late_rows {\n  mask = n <= m - 5\n}\n", {}),
}

FUSEMAX_3PASS = """cascade attention_3pass {
  QK[m, n] = Q[m, e] * K[n, e]
  GM[m]    = max(n) QK[m, n]
  SN[m, n] = exp(QK[m, n] - GM[m])
  SD[m]    = sum(n) SN[m, n]
  A[m, n]  = SN[m, n] / SD[m]
  AV[m, f] = sum(n) A[m, n] * V[n, f]
}
"""


def make_inputs(decls, B, H, M, N, generator, dtype=torch.float64):
    """Random values for a cascade's params/inputs (params from randn, ids sorted in [0, 3))."""
    import sympy

    from attnc.expr import symbols as S
    sizes = {S.B: B, S.H: H, S.M: M, S.N: N}
    out = {}
    for d in decls:
        shape = tuple(int(sympy.sympify(x).xreplace(sizes)) for x in d.dims)
        if d.kind.value == "param":
            out[d.name] = torch.randn(shape, generator=generator, dtype=dtype)
        else:
            out[d.name] = torch.randint(0, 3, shape, generator=generator).sort(-1).values
    return out
