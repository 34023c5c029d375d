"""A transformers `Cache` whose keys and values live in an `attnc.PagedKVCache`.

    from attnc.integrations import hf_paged, transformers as attnc_hf
    attnc_hf.register("attnc_swa", "sliding_window", window=W)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnc_swa")
    cache = hf_paged.PagedCache.for_model(model, num_pages=64, page_size=16)
    out = model.generate(input_ids, attention_mask=mask, cache=cache)

Row b of the model's batch is sequence `cache.sequences[b]` of the PagedKVCache `cache.kv`
(new sequences at the first update, or ones given, e.g. forks of a prefilled prompt). Each layer's
`update(key [B, Hkv, T, D], value, layer_idx)` appends the T new rows of every sequence, left
padding included: the cache holds exactly the rows DynamicCache would hold, so the lengths,
masks and positions transformers computes stay valid. It returns stand-ins shaped like
DynamicCache's keys and values [B, Hkv, N, D] that hold no data but carry a `PagedView` (the
layer's page pools, the page table, the per-sequence lengths); an attention function gets it
with `paged_view(key)` and reads K/V through the table with `kernel.paged`
(`attnc.integrations.transformers` does). The stand-ins' one element is NaN: an attention
function that ignores the view computes NaN, never plausible numbers.

Never: copies the pages into contiguous tensors, or reorders / crops / repeats batch rows
(beam search, assisted decoding and contrastive search raise NotImplementedError).

Continuous batching (`model.generate_batch`, transformers' own paged cache):
`enable_continuous_batching(model, spec, **options)` makes an attnc kernel the model's attention
there. transformers 5.24 serves continuous batching only with "sdpa", "paged|eager" or an
implementation whose name contains "flash" (and resolves such a name to a flash-attention
package when a model is built with it), so the function registers a name containing "flash"
and sets it on the model's config directly. Such an implementation gets no mask: per batch it
gets packed queries [1, Hq, Tq, D] and each request's keys and values packed [1, Hkv, Tk, D]
(transformers' cache gathers them by its read index before the call), with cu_seq_lens_q /
cu_seq_lens_k (request r's rows) and position_ids. `continuous_batching_attention(kernel)` runs
one `kernel.paged` call over them: the packed keys are a pool of one-row pages (page_size 1),
request r's page table lists its rows, and positions come from position_ids, so a sliding
layer's trimmed keys (k_start > 0) stay correct. Reading transformers' pages in place would need
its block table, which it builds for flash-attention 2/3 on CUDA only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# before transformers, which imports Triton: without CUDA attnc switches it to its interpreter
import attnc.backends.triton  # noqa: F401, I001
from transformers.cache_utils import Cache, CacheLayerMixin

from attnc.paged_cache import PagedKVCache

CB_NAME = "attnc_flash_cb"

# layer types whose keys and values the paged cache holds in full (a window is the kernel's job)
_ATTENTION_LAYERS = ("full_attention", "sliding_attention")
_VIEW = "_attnc_paged_view"


@dataclass(frozen=True)
class PagedView:
    """What `kernel.paged` needs to read one layer's keys and values of a batch."""

    k_pages: torch.Tensor      # [num_pages, page_size, Hkv, D]
    v_pages: torch.Tensor      # [num_pages, page_size, Hkv, Dv]
    page_table: torch.Tensor   # [B, max_pages] int32
    kv_lens: torch.Tensor      # [B] int32


def paged_view(tensor) -> PagedView | None:
    """The PagedView a PagedCache's update returned `tensor` with, None for any other tensor."""
    return getattr(tensor, _VIEW, None)


def _stand_in(view: PagedView, like: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """A [B, Hkv, length, dim] tensor of one NaN element carrying `view`."""
    B, H = like.shape[:2]
    out = torch.full((1, 1, 1, 1), float("nan"), dtype=like.dtype,
                     device=like.device).expand(B, H, length, dim)
    setattr(out, _VIEW, view)
    return out


class PagedLayer(CacheLayerMixin):
    """One model layer's share of a PagedCache (transformers' per-layer cache interface)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: PagedCache, layer: int):
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the PagedKVCache holds the pages."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner._append(self.layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner._rows(self.layer)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # every row stays (no window eviction): the mask spans all of them from position 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        raise NotImplementedError("PagedCache pages stay on their device (no offloading)")

    def prefetch(self):
        raise NotImplementedError("PagedCache pages stay on their device (no offloading)")

    def reset(self) -> None:
        raise NotImplementedError("PagedCache cannot be reset; free its sequences "
                                  "(cache.free()) and build a new one")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PagedCache does not reorder batch rows (beam search); fork "
                                  "sequences with PagedKVCache.fork instead")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedCache does not drop tokens (assisted decoding, "
                                  "contrastive search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedCache does not repeat batch rows; fork sequences "
                                  "with PagedKVCache.fork instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("PagedCache does not select batch rows")


class PagedCache(Cache):
    """A transformers Cache over `kv` (a PagedKVCache with fields `k` [Hkv, D] and `v`
    [Hkv, Dv], one layer per model layer): batch row b is sequence `sequences[b]`. Without
    `sequences`, the first update makes one new sequence per batch row. Given sequences must
    hold the same number of tokens (transformers' batches are rectangular)."""

    def __init__(self, kv: PagedKVCache, sequences: Sequence[int] | None = None):
        if not isinstance(kv, PagedKVCache):
            raise ValueError(f"kv must be an attnc.PagedKVCache, got {type(kv).__name__}")
        missing = [name for name in ("k", "v") if name not in kv.fields]
        if missing:
            raise ValueError(f"kv must have fields 'k' and 'v' (per-token [Hkv, D]); it has "
                             f"{', '.join(kv.fields)}")
        if sequences is not None:
            sequences = list(sequences)
            if not sequences:
                raise ValueError("sequences must name at least one sequence (or be None)")
            lengths = {kv.length(seq) for seq in sequences}
            if len(lengths) > 1:
                raise ValueError(f"sequences must hold the same number of tokens, they hold "
                                 f"{[kv.length(seq) for seq in sequences]}")
        super().__init__(layers=[PagedLayer(self, i) for i in range(kv.num_layers)])
        self.kv = kv
        self.sequences: list[int] = sequences or []  # empty until the first update

    @classmethod
    def for_model(cls, model, num_pages: int, page_size: int, *,
                  dtype: torch.dtype | None = None, device=None) -> PagedCache:
        """A PagedCache over a new PagedKVCache sized for `model` (a transformers decoder whose
        layers are all softmax attention), in the model's dtype and device by default."""
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or []
        other = sorted(set(layer_types) - set(_ATTENTION_LAYERS))
        if other:
            raise ValueError(f"model has {other} layers; a PagedCache holds softmax-attention "
                             f"keys and values only ({', '.join(_ATTENTION_LAYERS)})")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = PagedKVCache(num_pages, page_size, {"k": (kv_heads, head_dim),
                                                 "v": (kv_heads, head_dim)},
                          num_layers=config.num_hidden_layers, dtype=dtype or model.dtype,
                          device=device if device is not None else model.device)
        return cls(kv)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or \
                not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx must be in [0, {len(self.layers)}) (the "
                             f"PagedKVCache's layers), got {layer_idx!r}")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def free(self) -> None:
        """Return this cache's sequences to the PagedKVCache (pages shared with forks stay)."""
        for seq in self.sequences:
            self.kv.free(seq)
        self.sequences = []

    def _rows(self, layer: int) -> int:
        if not self.sequences:
            return 0
        return self.kv.length(self.sequences[0], layer)

    def _append(self, layer: int, key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        for name, x in (("key_states", key), ("value_states", value)):
            if x.dim() != 4:
                raise ValueError(f"{name} must be [B, Hkv, T, D], got shape {tuple(x.shape)}")
        if not self.sequences:
            self.sequences = [self.kv.new_sequence() for _ in range(key.shape[0])]
        if key.shape[0] != len(self.sequences):
            raise ValueError(f"key_states has batch {key.shape[0]}, this cache holds "
                             f"{len(self.sequences)} sequences")
        # the pages hold the model's dtype: a cache of another dtype is refused by append
        for b, seq in enumerate(self.sequences):
            self.kv.append(seq, layer, k=key[b].transpose(0, 1), v=value[b].transpose(0, 1))
        page_table, kv_lens = self.kv.table(self.sequences, layer)
        view = PagedView(self.kv.pages(layer, "k"), self.kv.pages(layer, "v"), page_table,
                         kv_lens)
        rows = self._rows(layer)
        return (_stand_in(view, key, rows, key.shape[-1]),
                _stand_in(view, value, rows, value.shape[-1]))


# --------------------------------------------------------------------- continuous batching

def continuous_batching_attention(kernel, window: int | None = None):
    """A transformers attention function serving continuous batching's packed (varlen) calls
    through `kernel.paged`; `window` is the sliding window `kernel` implements (the model's
    `sliding_window` must match it)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is None or cu_k is None or kwargs.get("position_ids") is None:
            raise ValueError("this attention serves continuous batching (generate_batch) only: "
                             "it needs cu_seq_lens_q, cu_seq_lens_k and position_ids")
        _refuse(attention_mask, dropout, window, kwargs)
        return _varlen(kernel, query, key, value, cu_q.long(), cu_k.long(),
                       kwargs["position_ids"][0], scaling), None

    return attention


def enable_continuous_batching(model, spec, name: str = CB_NAME, **options):
    """Make `spec` `model`'s attention for `model.generate_batch` (see the module docstring)
    and return its kernel. `spec`: a library name, `.attn` path or spec text, compiled with
    `options`, or a kernel with a `paged` method (then `window` is the only option). A model
    whose layers slide needs `window` equal to its sliding_window. `model.generate` with the
    same model needs its implementation set back (`model.set_attn_implementation(...)`)."""
    import attnc
    from transformers import AttentionInterface, AttentionMaskInterface

    if not isinstance(name, str) or "flash" not in name or \
            any(ch.isdigit() for ch in name.partition("flash")[2]):
        raise ValueError(f"name must contain 'flash' with no digit after it (transformers' "
                         f"continuous batching serves flash-named implementations; a digit would "
                         f"name a flash-attention version), got {name!r}")
    if isinstance(spec, str):
        kernel = attnc.compile(spec, **options)
    elif set(options) - {"window"}:
        raise ValueError(f"options: a compiled kernel takes only window=, got {sorted(options)}")
    else:
        kernel = spec
    if not callable(getattr(kernel, "paged", None)):
        raise ValueError(f"spec: {kernel!r} has no paged forward (kernel.paged); continuous "
                         "batching needs a softmax-family kernel")
    attention = continuous_batching_attention(kernel, options.get("window"))
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _no_mask)
    # the setter, not set_attn_implementation: that resolves a flash name to a flash package
    model.config._attn_implementation = name
    return kernel


def _no_mask(*args, **kwargs):
    """Continuous batching's flash-style calls carry cu_seq_lens, never a mask."""
    return None


def _refuse(attention_mask, dropout, window, kwargs) -> None:
    """What the model passes that this attention cannot honor: ValueError naming it."""
    if attention_mask is not None:
        raise ValueError("attention_mask: continuous batching's flash-style calls carry none; "
                         "got a mask this attention cannot honor")
    if dropout:
        raise ValueError(f"dropout: attnc kernels have no attention dropout, got {dropout}")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not served by continuous_batching_attention")
    sliding = kwargs.get("sliding_window")
    if sliding is not None and sliding != window:
        raise ValueError(f"sliding_window: the model's layer slides over {sliding} keys; compile "
                         f"a spec with that window (window={sliding}), got window={window}")


def _varlen(kernel, query, key, value, cu_q, cu_k, positions, scale):
    """Packed queries and keys of R requests through one kernel.paged call; [1, Tq, Hq, Dv]."""
    device = query.device
    q_lens, kv_lens = cu_q.diff(), cu_k.diff()
    M, W = int(q_lens.max()), int(kv_lens.max())
    Tq, Tk = query.shape[2], key.shape[2]
    rows = cu_q[:-1, None] + torch.arange(M, device=device)             # [R, M]
    rows = rows.clamp(max=Tq - 1)
    q = query[0][:, rows].transpose(0, 1)                               # [R, Hq, M, D]
    table = (cu_k[:-1, None] + torch.arange(W, device=device)).clamp(max=Tk - 1)
    k_pages = key[0].transpose(0, 1).unsqueeze(1)                       # [Tk, 1, Hkv, D]
    v_pages = value[0].transpose(0, 1).unsqueeze(1)
    q_start = positions[cu_q[:-1]].long()
    k_start = q_start + q_lens - kv_lens                               # a trimmed window > 0
    out = kernel.paged(q, k_pages, v_pages, table.int(), kv_lens.int(),
                       q_start=q_start.int(), k_start=k_start.int(), q_lens=q_lens.int(),
                       scale=scale)                                     # [R, Hq, M, Dv]
    packed = out.new_zeros(Tq, out.shape[1], out.shape[3])
    keep = torch.arange(M, device=device)[None, :] < q_lens[:, None]
    packed[rows[keep]] = out.transpose(1, 2)[keep]
    return packed.unsqueeze(0)
