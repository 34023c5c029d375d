"""transformers' mask hook for attnc attention, and what the mask means for the kernel call (for
attnc/integrations/transformers.py).

transformers builds a mask per forward through the mask interface registered under the
attention's name (masking_utils.create_causal_mask & co. call it with the sizes the cache
reports). attnc kernels compute their own mask from positions, so the hook only accepts what a
kernel can reproduce and passes on what it needs:

- the pattern must be transformers' plain causal, sliding-window causal (`local_size` W:
  `kv <= q and q - kv < W`) or bidirectional mask; overlays (or/and mask functions, e.g. image
  tokens), packed sequences, block overlays and chunked attention are refused;
- the new tokens must be the last ones (DynamicCache and caches like it; StaticCache is refused);
- padding must be left and/or right padding (one run of real tokens per row).

It returns None (no padding, keys start at index 0) or a [B, kv_offset + kv_length] boolean key
mask in the index space of the whole sequence so far: the attention function learns from its
width where its keys start (a sliding-window cache drops the oldest keys) and from the mask
where each row's tokens are. `layout` turns that into the kernel's per-row positions:
key row r of row b has position `k_start[b] + r`, query row i `q_start[b] + i`, position 0
being the row's first real token (so left padding lies at negative positions).

Never: evaluates the model's mask per query and key when transformers' own mask functions are
recognized; reads the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers import masking_utils


@dataclass(frozen=True)
class MaskFacts:
    """What the hook learned about a key mask it returned."""

    left_padded: bool  # some row starts with padding


@dataclass(frozen=True)
class Layout:
    """Per-row positions of a kernel call (int32 [B] each)."""

    k_start: torch.Tensor
    q_start: torch.Tensor
    kv_lens: torch.Tensor


_FACTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def make_mask_function(name: str, bidirectional_ok: bool):
    """The mask-interface function registered with attention `name`. `bidirectional_ok`: the
    registered spec may run bidirectional layers (it has no mask of its own)."""

    def attnc_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=masking_utils.causal_mask_function, attention_mask=None,
                   local_size: int | None = None, use_vmap: bool = False, device="cpu",
                   **kwargs):
        where = f"attnc attention {name!r}"
        if use_vmap:
            raise ValueError(f"{where}: the model adds or/and mask overlays (e.g. bidirectional "
                             "image tokens); attnc kernels compute their own mask and cannot "
                             "honor them")
        pattern = _pattern(mask_function, local_size, batch_size, q_length, kv_length,
                           q_offset, kv_offset, torch.device(device))
        if pattern is None:
            raise ValueError(f"{where}: the model's mask is not a plain causal, sliding-window "
                             "or bidirectional mask (packed sequences, block or chunked "
                             "attention); attnc cannot honor it")
        if pattern == "bidirectional" and not bidirectional_ok:
            raise ValueError(f"{where}: the model asks for bidirectional attention "
                             "(is_causal=False); register a spec without a mask (e.g. 'full')")
        width = kv_offset + kv_length
        if not isinstance(q_offset, int) or q_offset != width - q_length:
            raise ValueError(f"{where}: the cache's new tokens are not its last ones (query "
                             f"offset {q_offset}, {width} keys, {q_length} queries): use a "
                             "DynamicCache (StaticCache and offset caches are not supported)")
        return _key_mask(where, attention_mask, batch_size, width, kv_offset,
                         torch.device(device))

    return attnc_mask


def _pattern(fn, local_size, B, M, N, q_offset, kv_offset, dev: torch.device) -> str | None:
    """'causal', 'sliding' or 'bidirectional' when `fn` is that mask (for `local_size`), else
    None. transformers' own functions are recognized without evaluating them."""
    if fn is masking_utils.causal_mask_function and local_size is None:
        return "causal"
    if fn is masking_utils.bidirectional_mask_function and local_size is None:
        return "bidirectional"
    if local_size is not None and _is_sliding_causal(fn, local_size):
        return "sliding"
    # an unrecognized composition: decide from its values over this call's indices
    qi = (torch.arange(M, device=dev) + q_offset).view(1, 1, M, 1)
    ki = (torch.arange(N, device=dev) + kv_offset).view(1, 1, 1, N)
    try:
        got = fn(torch.arange(B, device=dev).view(B, 1, 1, 1), torch.zeros(1, 1, 1, 1,
                 dtype=torch.long, device=dev), qi, ki)
    except (RuntimeError, IndexError, TypeError):
        return None
    got = torch.as_tensor(got).to(torch.bool).expand(B, 1, M, N)
    causal = ki <= qi
    expected = {"causal": causal} if local_size is None else {
        "sliding": causal & (qi - ki < local_size)}
    if local_size is None:
        expected["bidirectional"] = torch.ones_like(causal)
    for kind, want in expected.items():
        if torch.equal(got, want.expand(B, 1, M, N)):
            return kind
    return None


def _is_sliding_causal(fn, window: int) -> bool:
    """`fn` is masking_utils.sliding_window_causal_mask_function(window)."""
    if getattr(fn, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return False
    parts = _closure(fn).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return False
    overlay, causal = parts
    return (causal is masking_utils.causal_mask_function
            and getattr(overlay, "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask"
            and _closure(overlay).get("sliding_window") == window)


def _closure(fn) -> dict:
    cells = getattr(fn, "__closure__", None) or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _key_mask(where: str, attention_mask, B: int, width: int, kv_offset: int,
              device: torch.device):
    """None (no padding, keys from index 0), or the [B, width] boolean key mask."""
    if attention_mask is None:
        if kv_offset == 0:
            return None
        mask = torch.ones(B, width, dtype=torch.bool, device=device)
        _FACTS[mask] = MaskFacts(left_padded=False)
        return mask
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"{where}: attention_mask must be a 2-D [batch, keys] padding mask, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask))}")
    mask = attention_mask.to(torch.bool)
    if mask.shape[0] != B or mask.shape[1] > width:
        raise ValueError(f"{where}: attention_mask has shape {tuple(mask.shape)}; expected "
                         f"[{B}, <= {width}]")
    if mask.shape[1] < width:  # as transformers: keys past the mask are padding
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    found, padded = _analyze(where, mask)
    if not padded and kv_offset == 0:
        return None
    _FACTS[mask] = found
    return mask


def _analyze(where: str, mask: torch.Tensor) -> tuple[MaskFacts, bool]:
    """The facts of a [B, width] key mask, and whether it pads anything (one sync)."""
    first, count, last = _runs(mask)
    holes, padded, left = torch.stack([
        ((count > 0) & (last - first + 1 != count)).any(), (count != mask.shape[1]).any(),
        (first > 0).any()]).tolist()
    if holes:
        raise ValueError(f"{where}: attention_mask has padding between real tokens; attnc "
                         "supports left and/or right padding only")
    return MaskFacts(left_padded=bool(left)), bool(padded)


def _runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: index of the first True, number of Trues, index of the last True."""
    ints = mask.to(torch.int32)
    first = ints.argmax(dim=1)
    last = mask.shape[1] - 1 - ints.flip(1).argmax(dim=1)
    return first, ints.sum(dim=1), last


def facts(mask: torch.Tensor, where: str) -> MaskFacts:
    """The facts of a [B, width] boolean key mask (analyzed now if the hook did not make it)."""
    found = _FACTS.get(mask)
    if found is None:
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"{where}: attention_mask must be a 2-D boolean key mask (from the "
                             f"mask function registered with this attention), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        found = _FACTS.setdefault(mask, _analyze(where, mask)[0])
    return found


def layout(mask: torch.Tensor | None, B: int, M: int, N: int, device) -> Layout:
    """The kernel's positions for a call with M queries and N keys (both the last ones of the
    key mask's index space), memoized per mask: every layer of a forward shares it."""
    if mask is None:
        full = torch.full((B,), N, dtype=torch.int32, device=device)
        return Layout(torch.zeros_like(full), full - M, full)
    key = (M, N, str(device))
    memo = _LAYOUTS.setdefault(mask, {})
    if key not in memo:
        width = mask.shape[1]
        first, count, _ = _runs(mask)
        kv_offset, q_offset = width - N, width - M
        lens = (first + count - kv_offset).clamp(0, N)
        memo[key] = Layout(*(t.to(device=device, dtype=torch.int32)
                             for t in (kv_offset - first, q_offset - first, lens)))
    return memo[key]
