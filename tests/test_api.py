"""The public API's surface: what `import attnc` alone gives, and how a spec argument is read."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    with pytest.raises(ValueError, match="a spec is DSL text"):
        read_spec(42)
