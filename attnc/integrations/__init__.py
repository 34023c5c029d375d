"""Adapters that make attnc kernels the attention of model code written elsewhere:
`attnc.integrations.transformers` (Hugging Face transformers' attention and mask interfaces,
optional extra `attnc[transformers]`) and `attnc.integrations.hf_paged` (a transformers cache
whose keys and values live in an attnc.PagedKVCache)."""

_SUBMODULES = ("transformers", "hf_paged")


def __getattr__(name):
    # imported on first use: `import attnc` must not import transformers
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"attnc.integrations.{name}")
    raise AttributeError(f"module 'attnc.integrations' has no attribute {name!r}")
