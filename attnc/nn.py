"""Attention layers for `torch.nn` models, computed by attnc kernels compiled from a spec.

    layer = attnc.nn.Attention(hidden_size=512, num_heads=8, num_kv_heads=2, spec="rope")
    y = layer(x)                                   # x, y [B, T, hidden]; training, autograd
    cache = attnc.nn.KVCache()                     # decoding: one cache for every layer
    y = layer(x_new, cache=cache)                  # appends this layer's keys, `kernel.paged`

    mixer = attnc.nn.LinearAttention(hidden_size=512, num_heads=4, spec="gla")
    y, state = mixer(x)                            # fla-style layer, final recurrent state
    y, state = mixer(x_next, state=state)          # or cache=attnc.nn.LinearCache()

This module owns the projections, the head layout and the caches; the attention itself is
always the compiled kernel's (attnc.compile memoizes it, so equal layers share one kernel).
What the spec declares is supplied by rule, never guessed per variant:

* a `param` whose shape resolves from the layer (H = query heads, D / DK = key head dim, DV =
  value head dim, options) becomes an `nn.Parameter` in `layer.spec_params`: ones for the
  gains of an `l2norm`, zeros otherwise (no bias, no sink, no decay: re-initialise what the
  model needs). A param sized by B, M, N or T is a forward keyword like an input.
* an `input` named `pos*` of shape [b, m] (query rows) or [b, n] (key rows) receives the token
  positions (`positions=`, default 0..T-1 after what the cache holds).
* a linear spec's per-step `g` is a log decay computed from x as fla does (logsigmoid of a
  projection, divided by `gate_logit_normalizer`; a low-rank projection for a per-feature g),
  `beta` is sigmoid of a projection; every other input is a forward keyword tensor.

Decoding is forward only: with a cache the layer calls `kernel.paged` on the cache (the
contiguous one as pages of one sequence each, or an `attnc.PagedKVCache`), one launch per step.
Keys are stored after the spec's key prologue (rope, l2norm) through
`attnc.serving.apply_prologue`, so the kernel never re-rotates a cached key. This module must
not compute attention in torch, nor read another layer's cache entry.

torch.compile(fullgraph=True) traces a plain spec's layer whole, training and decoding (the
kernel and kernel.paged are custom ops). A spec with something around the score (rope,
qk_norm), a cascade, and a linear kernel launch from Python inside a torch.autograd.Function:
the layer calls them torch.compiler.disable'd, a graph break there (fullgraph=True refuses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.nn.functional as F
from torch import nn

import attnc
from attnc.expr import symbols as S
from attnc.ir.cascade import TensorKind

__all__ = ["Attention", "KVCache", "LinearAttention", "LinearCache"]

def _compile(spec: str, options: dict, who: str):
    if not isinstance(spec, str):
        raise ValueError(f"{who}: spec must be a library name, DSL text or a .attn path (str), "
                         f"got {type(spec).__name__}")
    return attnc.compile(spec, **options)


def _positive(**values: Any) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _shape(dims, sizes: dict) -> tuple[int, ...] | None:
    """The declared dims as ints when the layer sizes them (`sizes` by symbol), else None."""
    out = []
    for dim in dims:
        value = sympy.sympify(dim).subs(sizes)
        if not value.is_Integer:
            return None
        out.append(int(value))
    return tuple(out)


def _keywords(who: str, spec: str, inputs: dict, expected: list[str]) -> None:
    """The forward's keyword tensors are exactly the spec tensors the layer does not supply."""
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise ValueError(f"{who}: unexpected keyword {unknown[0]!r}; spec {spec!r} takes "
                         f"{expected or 'none'}")
    missing = [n for n in expected if n not in inputs]
    if missing:
        raise ValueError(f"{who}: spec {spec!r} needs the keyword tensor {missing[0]!r}")


def _head_dim(hidden_size: int, num_heads: int, head_dim: int | None) -> int:
    if head_dim is not None:
        return head_dim
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads "
                         f"({num_heads}), or give head_dim")
    return hidden_size // num_heads


def _check_x(x, hidden_size: int) -> None:
    if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != hidden_size:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be [B, T, {hidden_size}], got {got}")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * d] -> [B, heads, T, d]."""
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def _positions(positions, B: int, T: int, device) -> torch.Tensor:
    """[B, T] int64 positions: `positions` ([T] or [B, T] integers), else 0..T-1."""
    if positions is None:
        return torch.arange(T, device=device).expand(B, T)
    if not torch.is_tensor(positions) or positions.is_floating_point() or \
            positions.dim() not in (1, 2) or positions.shape[-1] != T or \
            (positions.dim() == 2 and positions.shape[0] not in (1, B)):
        got = tuple(positions.shape) if torch.is_tensor(positions) else type(positions).__name__
        raise ValueError(f"positions must be an integer tensor [T] or [B, T] with T = {T}, "
                         f"B = {B}, got {got}")
    return positions.to(device=device, dtype=torch.int64).expand(B, T)


@dataclass
class _Entry:
    k: torch.Tensor
    v: torch.Tensor
    length: int


class KVCache:
    """Contiguous keys and values of every Attention layer that is passed it, [B, Hkv, N, D]
    per layer (each layer reads and writes its own entry only). Keys are stored after the
    spec's key prologue. `max_length=None` grows by concatenation; an int preallocates
    `max_length` rows per layer on the first append and writes in place (no copy per step;
    appending past it raises ValueError). Forward only: meant for torch.no_grad() decoding."""

    def __init__(self, max_length: int | None = None):
        _positive(max_length=max_length)
        self.max_length = max_length
        self._entries: dict[nn.Module, _Entry] = {}

    def length(self, layer: nn.Module | None = None) -> int:
        """Rows cached for `layer` (None: the first layer's, i.e. tokens seen; 0 if empty)."""
        entry = (next(iter(self._entries.values()), None) if layer is None
                 else self._entries.get(layer))
        return 0 if entry is None else entry.length

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append k [B, Hkv, T, D], v [B, Hkv, T, Dv] to `layer`'s entry; returns the stored
        k, v (for a preallocated cache the whole buffers, rows from the length on unused)
        and the new length."""
        entry = self._entries.get(layer)
        T = k.shape[2]
        rows = self.max_length
        if entry is None:
            if rows is None:
                self._entries[layer] = _Entry(k, v, T)
                return k, v, T
            entry = _Entry(k.new_zeros(*k.shape[:2], rows, k.shape[3]),
                           v.new_zeros(*v.shape[:2], rows, v.shape[3]), 0)
            self._entries[layer] = entry
        if entry.k.shape[:2] != k.shape[:2] or entry.k.shape[3] != k.shape[3]:
            raise ValueError(f"cache: this layer's cached keys are {tuple(entry.k.shape)}, the "
                             f"new ones {tuple(k.shape)}: batch, heads and head dim must match")
        n = entry.length
        if rows is None:
            entry.k, entry.v = torch.cat([entry.k, k], 2), torch.cat([entry.v, v], 2)
        else:
            if n + T > rows:
                raise ValueError(f"cache: max_length={self.max_length} rows, but {n} are "
                                 f"cached and {T} more were appended")
            entry.k[:, :, n:n + T] = k
            entry.v[:, :, n:n + T] = v
        entry.length = n + T
        return entry.k, entry.v, entry.length


class LinearCache:
    """The recurrent state of every LinearAttention layer passed it (the kernel's final state:
    a tensor [B, H, DK, DV], or a dict for specs with several states)."""

    def __init__(self) -> None:
        self._states: dict[nn.Module, Any] = {}

    def get(self, layer: nn.Module):
        return self._states.get(layer)

    def set(self, layer: nn.Module, state) -> None:
        self._states[layer] = state


class Attention(nn.Module):
    """Multi-head (GQA) attention over the kernel compiled from `spec` (a softmax-family
    `attention` or `cascade` spec: library name, DSL text or .attn path; `options` go to
    attnc.compile). q/k/v/o projections (`bias` on q, k, v), head_dim default
    hidden_size // num_heads, scale default 1/sqrt(head_dim).

    forward(x [B, T, hidden], *, cache=None, positions=None, seq_ids=None, **inputs):
    `cache` a KVCache (this layer's entry) or an attnc.PagedKVCache with `seq_ids` (one
    sequence per batch row; this layer's slot `layer_idx`); `inputs` the spec tensors the layer
    does not supply (module docstring)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, spec: str = "causal", *, bias: bool = False,
                 scale: float | None = None, layer_idx: int = 0, **options):
        super().__init__()
        _positive(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  head_dim=head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        head_dim = _head_dim(hidden_size, num_heads, head_dim)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        self.kernel = _compile(spec, options, "Attention")
        if isinstance(self.kernel, attnc.LinearKernel):
            raise ValueError(f"Attention: spec {self.kernel.name!r} is a linear (state-update) "
                             "spec; use attnc.nn.LinearAttention")
        ir = getattr(self.kernel, "kernel_ir", None)
        if ir is None:
            raise ValueError(f"Attention: spec {self.kernel.name!r} compiles to "
                             f"{type(self.kernel).__name__}, which this layer does not drive; "
                             "call the kernel directly")
        around = getattr(ir, "around", None)
        if around is not None and (around.operands or around.value != "v"):
            raise ValueError(f"Attention: spec {self.kernel.name!r} takes operands besides q, "
                             "k, v (or another value); call its kernel directly")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.scale, self.layer_idx = head_dim, scale, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.spec_params = nn.ParameterDict()
        self._query_positions: list[str] = []
        self._key_positions: list[str] = []
        self._forward_inputs: list[str] = []
        gains = {str(g.base) for g in (around.gains() if around is not None else ())}
        sizes = {S.H: num_heads, S.D: head_dim}
        for decl in ir.inputs:
            shape = _shape(decl.dims, sizes) if decl.kind is TensorKind.PARAM else None
            if shape is not None:
                init = torch.ones if decl.name in gains else torch.zeros
                self.spec_params[decl.name] = nn.Parameter(init(shape))
            elif decl.name.startswith("pos") and tuple(decl.dims) == (S.B, S.M):
                self._query_positions.append(decl.name)
            elif decl.name.startswith("pos") and tuple(decl.dims) == (S.B, S.N):
                self._key_positions.append(decl.name)
            else:
                self._forward_inputs.append(decl.name)
        self._prologues = around is not None and bool(around.prologues)
        # plain kernels are custom ops torch.compile traces; the others launch from Python
        # (Triton's interpreter included), which dynamo must not trace: a graph break
        traceable = type(self.kernel) is attnc.Kernel and not self.kernel.around
        self._attend = self.kernel if traceable else torch.compiler.disable(self.kernel.__call__)

    def extra_repr(self) -> str:
        return (f"spec={self.kernel.name!r}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}")

    def _spec_tensors(self, inputs: dict, dtype: torch.dtype) -> dict:
        """The params (cast to the activations' dtype) and the forward keywords, checked."""
        _keywords("Attention", self.kernel.name, inputs, self._forward_inputs)
        return {**{n: p.to(dtype) for n, p in self.spec_params.items()}, **inputs}

    def forward(self, x: torch.Tensor, *, cache: Any = None,
                positions: torch.Tensor | None = None, seq_ids: Sequence[int] | None = None,
                **inputs) -> torch.Tensor:
        _check_x(x, self.hidden_size)
        B, T, _ = x.shape
        q = _heads(self.q_proj(x), self.num_heads)
        k = _heads(self.k_proj(x), self.num_kv_heads)
        v = _heads(self.v_proj(x), self.num_kv_heads)
        tensors = self._spec_tensors(inputs, q.dtype)
        if cache is None:
            if seq_ids is not None:
                raise ValueError("seq_ids applies with an attnc.PagedKVCache only")
            pos = _positions(positions, B, T, x.device)
            tensors.update({n: pos for n in self._query_positions + self._key_positions})
            out = self._attend(q, k, v, scale=self.scale, **tensors)
        else:
            out = self._decode(q, k, v, cache, positions, seq_ids, tensors)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _prologue(self, q, k, first, rows, pos, positional, tensors: dict):
        """q and k after the spec's prologues (attnc.serving.apply_prologue), the new rows
        being the rows first[b].. of the whole sequence: position inputs are laid out over
        the whole sequence's rows, the new rows' positions at their rows."""
        from attnc.serving import apply_prologue
        whole = pos.new_zeros(pos.shape[0], int(rows.max()) + 1).scatter(1, rows, pos)
        named = {**tensors, **{n: whole for n in positional}}
        return (apply_prologue(self.kernel, "q", q, start=first, **named),
                apply_prologue(self.kernel, "k", k, start=first, **named))

    def _decode(self, q, k, v, cache, positions, seq_ids, tensors: dict) -> torch.Tensor:
        """New rows against the cache through `kernel.paged` (forward only)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("Attention: a call with a cache is forward only (kernel.paged); "
                             "run decoding under torch.no_grad()")
        if not hasattr(self.kernel, "paged"):
            raise ValueError(f"Attention: spec {self.kernel.name!r} compiles to "
                             f"{type(self.kernel).__name__}, which has no paged (cached) form")
        B, T = q.shape[0], q.shape[2]
        paged = isinstance(cache, attnc.PagedKVCache)
        if paged:
            seqs = _seq_ids(seq_ids, B)
            start = [cache.length(s, self.layer_idx) for s in seqs]
        elif isinstance(cache, KVCache):
            if seq_ids is not None:
                raise ValueError("seq_ids applies with an attnc.PagedKVCache only")
            start = [cache.length(self)] * B
        else:
            raise ValueError(f"cache must be an attnc.nn.KVCache or an attnc.PagedKVCache, got "
                             f"{type(cache).__name__}")
        first = torch.tensor(start, device=q.device)
        rows = first[:, None] + torch.arange(T, device=q.device)
        pos = rows if positions is None else _positions(positions, B, T, q.device)
        positional = set(self._query_positions + self._key_positions)
        if self._prologues:
            q, k = self._prologue(q, k, first, rows, pos, positional, tensors)
        tensors = {n: t for n, t in tensors.items() if n not in positional}
        kw = {"scale": self.scale, "prologues_applied": self._prologues, **tensors}
        if paged:
            for b, s in enumerate(seqs):
                cache.append(s, self.layer_idx, k=k[b].transpose(0, 1), v=v[b].transpose(0, 1))
            return cache.attend(self.kernel, q, seqs, self.layer_idx, **kw)
        ck, cv, n = cache.append(self, k, v)
        table = torch.arange(B, dtype=torch.int32, device=q.device)[:, None]
        lens = torch.full((B,), n, dtype=torch.int32, device=q.device)
        return self.kernel.paged(q, ck.permute(0, 2, 1, 3), cv.permute(0, 2, 1, 3), table,
                                 lens, **kw)


def _seq_ids(seq_ids, B: int) -> list[int]:
    if seq_ids is None or len(seq_ids) != B:
        raise ValueError(f"seq_ids: an attnc.PagedKVCache needs one sequence id per batch row "
                         f"({B}), got {seq_ids!r}")
    return [int(s) for s in seq_ids]


class LinearAttention(nn.Module):
    """A flash-linear-attention-style layer over the kernel compiled from the linear `spec`
    (gla, simple_gla, delta_net, gated_delta_net, retnet, linear_attn, ... or DSL text):
    q/k/v/o projections, the gate and beta projections the spec's inputs need (module
    docstring), `qk_norm` l2-normalizing q and k (None: on for delta-rule specs, the ones with
    a `beta`, as fla does), and a per-head RMSNorm of the output (`output_norm`).

    forward(x [B, T, hidden], *, state=None, cache=None, **inputs) -> (y [B, T, hidden],
    final state): `state` the previous call's final state, or `cache` a LinearCache holding it
    (read, then replaced)."""

    def __init__(self, hidden_size: int, num_heads: int, spec: str = "gla", *,
                 head_dim: int | None = None, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: float = 16.0, qk_norm: bool | None = None,
                 output_norm: bool = True, norm_eps: float = 1e-5, **options):
        super().__init__()
        _positive(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim,
                  gate_low_rank_dim=gate_low_rank_dim)
        head_dim = _head_dim(hidden_size, num_heads, head_dim)
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer!r}")
        self.kernel = _compile(spec, options, "LinearAttention")
        if not isinstance(self.kernel, attnc.LinearKernel):
            raise ValueError(f"LinearAttention: spec {self.kernel.name!r} is not a linear "
                             "(state-update) spec; use attnc.nn.Attention")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        width = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = nn.Linear(hidden_size, width, bias=False)
        self.v_proj = nn.Linear(hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)
        self.spec_params = nn.ParameterDict()
        self.gates = nn.ModuleDict()  # spec input name -> projection of x
        self._forward_inputs: list[str] = []
        sizes = {S.H: num_heads, S.D: head_dim, S.DK: head_dim, S.DV: head_dim}
        per_step = (S.B, S.H, S.T)
        for decl in self.kernel.scan.decls:
            dims = tuple(decl.dims)
            shape = _shape(dims, sizes) if decl.kind is TensorKind.PARAM else None
            if shape is not None:
                self.spec_params[decl.name] = nn.Parameter(torch.zeros(shape))
            elif decl.name in ("g", "beta") and dims == per_step:
                self.gates[decl.name] = nn.Linear(hidden_size, num_heads)
            elif decl.name == "g" and dims in (per_step + (S.DK,), per_step + (S.D,)):
                self.gates[decl.name] = nn.Sequential(
                    nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                    nn.Linear(gate_low_rank_dim, width))
            else:
                self._forward_inputs.append(decl.name)
        self.qk_norm = "beta" in self.gates if qk_norm is None else bool(qk_norm)
        self.norm = nn.RMSNorm(head_dim, eps=norm_eps) if output_norm else None

    def extra_repr(self) -> str:
        return f"spec={self.kernel.name!r}, heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: torch.Tensor, *, state: Any = None, cache: LinearCache | None = None,
                **inputs) -> tuple[torch.Tensor, Any]:
        _check_x(x, self.hidden_size)
        if cache is not None:
            if not isinstance(cache, LinearCache):
                raise ValueError(f"cache must be an attnc.nn.LinearCache, got "
                                 f"{type(cache).__name__}")
            if state is not None:
                raise ValueError("give state or cache, not both")
            state = cache.get(self)
        _keywords("LinearAttention", self.kernel.name, inputs, self._forward_inputs)
        B, T, _ = x.shape
        q = _heads(self.q_proj(x), self.num_heads)
        k = _heads(self.k_proj(x), self.num_heads)
        v = _heads(self.v_proj(x), self.num_heads)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        tensors = {**{n: p.to(q.dtype) for n, p in self.spec_params.items()}, **inputs}
        for name, proj in self.gates.items():
            z = proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
            if isinstance(proj, nn.Linear):  # one value per (b, h, t)
                z = z.squeeze(-1)
            tensors[name] = (z.sigmoid() if name == "beta"
                             else F.logsigmoid(z.float()) / self.gate_logit_normalizer)
        o, final = self.kernel(q, k, v, initial_state=state, output_final_state=True, **tensors)
        if self.norm is not None:
            o = self.norm(o)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, -1).to(x.dtype))
        if cache is not None:
            cache.set(self, final)
        return y, final

