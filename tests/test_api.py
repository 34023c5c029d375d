"""The public API's surface: what `import attnc` alone gives, how a spec argument is read, and
what the library's entries check of their options and calls."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import attnc
from attnc.pipeline import read_spec


def test_import_attnc_alone_reaches_every_documented_name():
    """attnc.sparse, attnc.ops and the lazily imported names work after `import attnc`
    alone, in a fresh process."""
    code = ("import attnc\n"
            "assert callable(attnc.sparse.moba) and callable(attnc.sparse.vertical_slash)\n"
            "assert callable(attnc.ops.chunk_gla)\n"
            "for name in attnc.__all__:\n"
            "    getattr(attnc, name)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        attnc.nonexistent  # noqa: B018


@pytest.mark.parametrize("text", [
    "attention causal\n  mask = n <= m\n",           # the brace forgotten
    "attention causal {\n  mask = n <= m\n",         # the closing brace forgotten
    "  # a comment first\nattention causal {\n  mask = n <=\n}\n",
    "attention causal",                               # one line: still spec text, by its keyword
])
def test_spec_text_is_told_from_a_name_by_its_shape(text):
    """Several lines, a brace, or a block keyword first make spec text: a malformed one gets a
    located parse error, never "no spec file named ..."."""
    assert read_spec(text).filename == "<spec>"
    with pytest.raises(attnc.SpecError) as err:
        attnc.compile(text)
    assert err.value.line > 0 and "no spec file" not in str(err.value)


def test_names_and_paths_are_files_or_library_variants(tmp_path):
    path = tmp_path / "mine.attn"
    path.write_text("attention mine {\n  mask = n <= m\n}\n")
    assert read_spec(str(path)).filename == str(path)
    assert read_spec(path).filename == str(path)
    assert read_spec("causal").filename == "variants/causal.attn"
    with pytest.raises(attnc.SpecError, match="no spec file or library variant named 'nope'"):
        read_spec("nope")
    with pytest.raises(ValueError, match="spec must be DSL text"):
        read_spec(42)


# --- library options and call requirements (attnc.library.ENTRIES) ------------------------------

@pytest.mark.parametrize("name, options, message", [
    ("neighborhood_1d", {"kernel_size": 0}, "kernel_size must be an integer >= 1, got 0"),
    ("neighborhood_1d", {"kernel_size": -3}, "kernel_size must be an integer >= 1, got -3"),
    ("sliding_window", {"window": 0}, "window must be an integer >= 1"),
    ("streaming", {"sinks": -1}, "sinks must be an integer >= 0"),
    ("streaming", {"window": 0}, "window must be an integer >= 1"),
    ("prefix_lm", {"prefix": -2}, "prefix must be an integer >= 0"),
    ("rel_bias", {"max_distance": -1}, "max_distance must be an integer >= 0"),
    ("dilated", {"dilation": 0}, "dilation must be an integer >= 1"),
    ("dilated", {"window": 0}, "window must be an integer >= 1"),
    ("chunked_local", {"chunk": 0}, "chunk must be an integer >= 1"),
    ("softcap", {"cap": 0.0}, "cap must be a finite number > 0"),
    ("softcap", {"cap": math.inf}, "cap must be a finite number > 0"),
    ("hedgehog", {"features": 0}, "features must be an integer >= 1"),
    ("linear_attn", {"eps": -1e-6}, "eps must be a finite number >= 0"),
    ("lightning", {"eps": math.nan}, "eps must be a finite number >= 0"),
])
def test_library_options_outside_their_domain_raise(name, options, message):
    """Such options compiled before and ran to zeros or NaN (a window of no keys, % 0)."""
    with pytest.raises(ValueError, match=message):
        attnc.load(name, **options)
    with pytest.raises(ValueError, match=message):  # the same entry by name through compile
        attnc.compile(name, **options)


def test_every_library_option_has_a_domain():
    """A variant added with an option but no domain would be unchecked again."""
    from attnc.library import ENTRIES, variant_path
    from attnc.pipeline import frontend
    for name in attnc.variants():
        _, ir = frontend(read_spec(name))
        declared = {option for option, _ in ir.options}
        entry = ENTRIES.get(name)
        assert declared == (set(entry.options) if entry else set()), name
        assert variant_path(name) is not None


def test_library_domains_bound_only_the_library_entry():
    """The rules belong to the library file: edge values inside the domain run, and a user spec
    with the same option name is the user's to define."""
    assert attnc.load("streaming", sinks=0, window=1).name == "streaming"
    assert attnc.load("prefix_lm", prefix=0).name == "prefix_lm"
    own = "attention mine {\n  option window = 4\n  mask = n <= m and m - n < window\n}\n"
    assert attnc.compile(own, window=0).name == "mine"


def test_neighborhood_needs_as_many_keys_as_its_kernel_size():
    """With N < kernel_size the clamped window ran silently over fewer keys."""
    from tests.reference import neighborhood_1d
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen) for _ in range(3))
    wide = attnc.load("neighborhood_1d", kernel_size=64)
    with pytest.raises(ValueError, match=r"neighborhood_1d: k: the call needs N >= kernel_size "
                                         r".*got N = 32 with kernel_size = 64"):
        wide(q, k, v)
    # exactly kernel_size keys is allowed, and is plain attention over all of them
    fits = attnc.load("neighborhood_1d", kernel_size=32)
    out, lse = fits(q, k, v, return_lse=True)
    ref, ref_lse = neighborhood_1d(q, k, v, kernel_size=32)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-5)
