"""attnc kernels as a Hugging Face transformers attention implementation (optional extra
`attnc[transformers]`).

    from attnc.integrations import transformers as attnc_hf
    attnc_hf.register("attnc")                                   # the model's own attention
    attnc_hf.register("attnc_swa", "sliding_window", window=W)  # one spec for every layer
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnc")

`register(name, spec=None, **options)` registers an attention function in transformers'
AttentionInterface and a mask function (attnc/integrations/_hf_masks.py) in its
AttentionMaskInterface under `name`. What a layer passes is honored or refused with a ValueError
naming it, never ignored:

- `scaling` -> the kernel's scale; GQA (fewer key/value heads) natively;
- `sliding_window` W and `softcap` c -> the kernel's mask `m - n < W` and score `c * tanh(s/c)`
  (attnc/integrations/_hf_specs.py);
- `s_aux` (gpt-oss sinks) -> `out * sigmoid(lse - s_aux[h])` in fp32, differentiable through the
  kernel's lse;
- the padding mask and cache offsets -> per-row positions (position 0 = a row's first real
  token); `position_ids` must equal them (for the model's own attention, whose mask sees only
  m - n: up to a constant per row); other (packed, custom) positions are refused;
- refused: dropout != 0, output_attentions, 4-D masks, mask overlays, packed and varlen
  (`cu_seq_lens_*`) batches, `position_bias`, `is_causal=False` unless the spec has no mask,
  and any other argument with a value.

Training and prefill without padding (or with right padding only, for the model's own causal
attention) call the kernel directly (forward and backward). Decoding from a cache and left
padding go through `kernel.paged` over the contiguous cache (one page per row), an attnc paged
cache (attnc.integrations.hf_paged) through its pages: forward only, a backward through it
raises ValueError.

Never: repeats key/value heads, falls back to another attention implementation, or builds a
[queries, keys] mask (except once per forward to identify a mask function it does not know).
"""

from __future__ import annotations

import sys
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

import attnc.backends.triton  # noqa: F401  (Triton's mode is chosen before transformers loads it)
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from attnc.integrations import _hf_masks
from attnc.integrations._hf_specs import Registration

__all__ = ["register", "registered"]

# transformers' own names: registering one of these would replace it for every model
_RESERVED = frozenset(AttentionInterface._global_mapping) | frozenset(
    AttentionMaskInterface._global_mapping) | {"eager", "paged|eager"}
_REGISTERED: dict[str, Registration] = {}
_LOCK = threading.Lock()

# kwargs a layer may pass that do not change the attention's math
_INERT = frozenset({"use_cache", "output_hidden_states", "output_router_logits",
                    "num_items_in_batch", "return_dict", "cache_position"})
# checked equal to the positions the kernel uses, once per (position_ids, mask, M, N)
_POSITIONS_OK: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register(name: str, spec: str | None = None, **options) -> str:
    """Register attnc attention as transformers attention implementation `name` (also its mask
    function). `spec` None: each layer runs the model's own attention (causal, its sliding window,
    soft-cap and sinks); else a library variant's name, DSL text or `.attn` path run by every
    layer, with `options` (a layer's sliding window / soft-cap set its `window` / `cap`).
    Returns `name`; registering a name again replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in _RESERVED or "flash" in name or "|" in name or "/" in name:
        raise ValueError(f"name {name!r} is transformers' own or has a meaning to it ('flash', "
                         "'|', '/' select other code paths); choose another name")
    if spec is None and options:
        raise ValueError(f"options {sorted(options)} need a spec; without one attnc runs the "
                         "model's own attention")
    if spec is not None and not isinstance(spec, str):
        raise ValueError(f"spec must be a library variant's name, DSL text or a .attn path (a "
                         f"str), got {type(spec).__name__}")
    reg = Registration(name, spec, options)
    bidirectional_ok = spec is not None and reg.layer_kernel(None, None).bidirectional

    def attnc_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        sliding_window=None, softcap=None, s_aux=None, **kwargs):
        return _attention(reg, module, query, key, value, attention_mask, dropout, scaling,
                          sliding_window, softcap, s_aux, kwargs)

    with _LOCK:
        AttentionInterface.register(name, attnc_attention)
        AttentionMaskInterface.register(name, _hf_masks.make_mask_function(name,
                                                                           bidirectional_ok))
        _REGISTERED[name] = reg
    return name


def registered() -> dict[str, str | None]:
    """The names registered here and their specs (None: the model's own attention)."""
    with _LOCK:
        return {name: reg.spec for name, reg in _REGISTERED.items()}


def _attention(reg: Registration, module, query, key, value, attention_mask, dropout, scaling,
               sliding_window, softcap, s_aux, kwargs: dict):
    where = f"attnc attention {reg.name!r}"
    causal = _check_arguments(where, module, dropout, kwargs)
    layer = reg.layer_kernel(None if sliding_window is None else int(sliding_window),
                             None if softcap is None else float(softcap))
    if not causal and not layer.bidirectional:
        raise ValueError(f"{where}: the layer is not causal (is_causal=False); register a spec "
                         "without a mask (e.g. 'full') to run it")
    B, Hq, M, _ = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    _check_tensors(where, reg.name, Hq, Hkv, M, N, attention_mask, s_aux)
    left_padded = attention_mask is not None and _hf_masks.facts(attention_mask,
                                                                 where).left_padded
    lay = _hf_masks.layout(attention_mask, B, M, N, query.device)
    _check_positions(where, kwargs.get("position_ids"), lay, attention_mask, B, M, N,
                     shift_ok=layer.own)
    view = _paged_view(key)
    # Without a cache or padding the plain call is exact; with right padding too for the
    # model's own (causal) attention: real queries never reach the padding keys after them.
    if view is None and M == N and (attention_mask is None or (
            layer.own and not left_padded and attention_mask.shape[1] == N)):
        res = layer.kernel(query, key, value, scale=scaling, return_lse=s_aux is not None)
        out = res if s_aux is None else _with_sinks(res, s_aux, query.dtype)
        return out.transpose(1, 2).contiguous(), None
    out = _paged(layer.kernel, query, key, value, view, lay, scaling, s_aux)
    inputs = [t for t in (query, key, value, s_aux) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        why = ("a KV cache" if M != N or view is not None else
               "left padding" if left_padded else "padding and a registered spec")
        return _ForwardOnly.apply(out, where, why, *inputs), None
    return out.transpose(1, 2).contiguous(), None


def _check_tensors(where: str, name: str, Hq: int, Hkv: int, M: int, N: int, attention_mask,
                   s_aux) -> None:
    if Hq % Hkv:
        raise ValueError(f"{where}: {Hq} query heads are not a multiple of {Hkv} key heads")
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor)
                                           and attention_mask.dim() == 2):
        raise ValueError(f"{where}: attention_mask must come from the mask function registered "
                         f"with {name!r} (None or a 2-D key mask); a 4-D or custom mask "
                         f"({getattr(attention_mask, 'shape', type(attention_mask).__name__)}) "
                         "cannot be honored by attnc kernels")
    if attention_mask is not None and attention_mask.shape[1] < max(M, N):
        raise ValueError(f"{where}: attention_mask covers {attention_mask.shape[1]} tokens, "
                         f"fewer than the {N} keys and {M} queries")
    if s_aux is not None and tuple(s_aux.shape) != (Hq,):
        raise ValueError(f"{where}: s_aux (sinks) must have shape [{Hq}], got "
                         f"{tuple(s_aux.shape)}")


def _paged(kernel, query, key, value, view, lay, scaling, s_aux) -> torch.Tensor:
    """`kernel.paged` over the contiguous cache (one page per row) or an attnc paged cache's
    view, on detached inputs (it has no backward), [B, Hq, M, Dv]."""
    q, k, v = (t.detach() for t in (query, key, value))
    if view is None:
        k_cache, v_cache = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        table = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)[:, None]
    else:
        k_cache, v_cache, table = view.k_pages, view.v_pages, view.page_table
    res = kernel.paged(q, k_cache, v_cache, table, lay.kv_lens, q_start=lay.q_start,
                       k_start=lay.k_start, scale=scaling, return_lse=s_aux is not None)
    return res if s_aux is None else _with_sinks(res, s_aux.detach(), q.dtype)


def _check_arguments(where: str, module, dropout, kwargs: dict) -> bool:
    """Refuse what the kernel cannot honor; returns whether the layer is causal."""
    if dropout:
        raise ValueError(f"{where}: attention dropout {dropout} is not supported (attnc kernels "
                         "have no dropout); set the config's attention_dropout to 0")
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        raise ValueError(f"{where}: output_attentions=True needs the attention weights, which "
                         "attnc kernels never materialize; use attn_implementation='eager'")
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"{where}: position_bias (an additive score bias) is not supported; "
                         "write it into an attnc spec instead")
    varlen = [k for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                          "seq_idx", "block_table") if kwargs.get(k) is not None]
    if varlen:
        raise ValueError(f"{where}: packed / varlen batches ({', '.join(varlen)}) are not "
                         "supported; pass a padded batch with an attention_mask")
    known = _INERT | {"position_ids", "output_attentions", "position_bias", "is_causal"}
    unknown = sorted(k for k, v in kwargs.items() if k not in known and v is not None)
    if unknown:
        raise ValueError(f"{where}: the layer passes {', '.join(unknown)}, which attnc does not "
                         "know how to honor")
    causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if causal is None else causal)


def _paged_view(key):
    """The attnc paged cache's view a key stand-in carries (attnc.integrations.hf_paged; without
    that module loaded no attnc paged cache exists)."""
    hf_paged = sys.modules.get("attnc.integrations.hf_paged")
    return None if hf_paged is None else hf_paged.paged_view(key)


def _check_positions(where, position_ids, lay, mask, B: int, M: int, N: int,
                     shift_ok: bool) -> None:
    """position_ids must be the positions the kernel uses at rows that are real tokens; with
    `shift_ok` (a spec whose mask sees only m - n) up to a constant per row, as eager attention
    on left-padded rows numbered from the padding."""
    if position_ids is None:
        return
    seen = _POSITIONS_OK.setdefault(position_ids, set())
    key = (id(mask), M, N, shift_ok)
    if key in seen:
        return
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or \
            position_ids.shape[1] != M:
        raise ValueError(f"{where}: position_ids must be [batch, {M}], got "
                         f"{tuple(position_ids.shape)} (multi-axis positions are not supported)")
    expected = lay.q_start[:, None].long() + torch.arange(M, device=lay.q_start.device)
    real = (expected >= 0) & (expected < (lay.k_start + lay.kv_lens)[:, None])
    shift = position_ids.to(expected.device).long() - expected
    if shift_ok:  # each row's shift is its first real row's
        shift = shift - shift.gather(1, real.to(torch.int8).argmax(1, keepdim=True))
    if bool(shift.masked_fill(~real, 0).any()):
        raise ValueError(f"{where}: position_ids differ from the token positions the kernel "
                         "masks with (position 0 = a row's first real token, counting up"
                         + (", or any other start" if shift_ok else "") + "); custom "
                         "positions and packed sequences are not supported")
    seen.add(key)


def _with_sinks(res, s_aux: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out * exp(lse) / (exp(lse) + exp(sink[h])): the softmax with a sink logit, in fp32."""
    out, lse = res
    keep = torch.sigmoid(lse - s_aux.float()[None, :, None])
    return (out.float() * keep[..., None]).to(dtype)


class _ForwardOnly(torch.autograd.Function):
    """The paged path's output [B, M, H, Dv] in a graph whose backward explains the refusal."""

    @staticmethod
    def forward(ctx, out, where, why, *inputs):
        ctx.message = (f"{where}: no gradients through attention with {why} (the paged kernel "
                       "is forward only); train without a cache, without left padding (right "
                       "padding works with the model's own attention)")
        return out.transpose(1, 2).clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, *grads):
        raise ValueError(ctx.message)
